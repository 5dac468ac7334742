"""Write a library file row by row, straight to disk, appearing at its path only when complete.

:class:`StreamingFile` is the generic part: a temp file next to the target, space reserved up
front (a full disk fails at the start, not after an hour), positioned writes from this process or
from worker processes, then fsync and an atomic rename. A killed build leaves the target as it
was plus a temp file, which the next save or build to the same path removes (as ``Library.save``)
or a resumed build continues (:mod:`.resume`).

:class:`LibraryWriter` knows a :class:`.plan.LibraryPlan`'s layout: it writes the header and the
index maps (and general means) at once, then each module row (A*, B*, prototype) where it belongs, or copies rows
from an existing library file (``add``/``remove``) without decoding them.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path

import torch

from . import safetensors_io as sio
from .plan import LibraryPlan

_COPY_CHUNK = 64 * 2**20  # bytes per read when rows must be re-laid (rank padding changes)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor (any dtype, bf16 included), without a copy when contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class StreamingFile:
    """A file of known size written at offsets, committed atomically to ``path`` (see module doc).
    ``adopt``: a dead build's temp file of that size to continue (:mod:`.resume`) instead of a new one."""

    def __init__(self, path: Path, size: int, adopt: Path | None = None):
        sio._check_target(path)
        self.path, self.size = path, size
        self.done = self.adopted = False
        if adopt is not None:
            try:
                self.temp = sio._claim_temp(adopt, path)  # before the cleanup below could remove it
                self.fd = os.open(self.temp, os.O_WRONLY)
                self.adopted = True
            except FileNotFoundError:  # another build claimed it first: start a new file
                pass
        sio._remove_stale_temps(path)
        if self.adopted:
            return
        self.fd, self.temp = sio._open_temp(path)
        try:
            self._reserve(size)
        except BaseException:
            self.abort()
            raise

    def _reserve(self, size: int) -> None:
        try:
            os.posix_fallocate(self.fd, 0, size)
            return
        except OSError as e:
            if e.errno == errno.ENOSPC:
                free = shutil.disk_usage(self.path.parent).free
                raise OSError(
                    errno.ENOSPC,
                    f"cannot write {str(self.path)!r}: it needs {size:,} bytes and {free:,} are free on that disk",
                    str(self.path),
                ) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        except AttributeError:  # no posix_fallocate on this platform
            pass
        os.ftruncate(self.fd, size)  # sparse: the space is claimed as rows are written

    def pwrite(self, data, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def commit(self) -> None:
        """fsync, rename over ``path``, fsync the folder. The file is complete only after this."""
        if os.fstat(self.fd).st_size != self.size:
            raise RuntimeError(
                f"internal error: {self.temp} has {os.fstat(self.fd).st_size} bytes, expected {self.size}"
            )
        os.fsync(self.fd)
        os.close(self.fd)
        self.done = True
        try:
            os.replace(self.temp, self.path)
        except BaseException:
            _unlink(self.temp)
            raise
        sio._fsync_dir(self.path.parent)

    def keep(self) -> None:
        """Close, leaving the temp file for a resumed build (:mod:`.resume`); ``path`` is untouched."""
        if not self.done:
            self.done = True
            os.close(self.fd)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            os.close(self.fd)
            _unlink(self.temp)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class RowTarget:
    """Where each module row lives in a planned file: picklable, so worker processes can write rows
    into the temp file through their own descriptor."""

    def __init__(self, temp: Path, plan: LibraryPlan, layout: sio.Layout):
        self.temp = temp
        self.r = plan.r_max
        self.dtype = plan.dtype
        self.shapes = {m: (p.d_in, p.d_out) for m, p in plan.modules.items()}
        self.begin = {name: layout.data_start + b for name, (b, _) in layout.offsets.items()}
        self._fd: int | None = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def open(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.temp, os.O_WRONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def padded(self, module: str, a_star: torch.Tensor, b_star: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-padded copies ([r, d_in], [d_out, r]) of one adapter's aligned factors."""
        d_in, d_out = self.shapes[module]
        rank = a_star.shape[0]
        a = torch.zeros(self.r, d_in, dtype=self.dtype)
        b = torch.zeros(d_out, self.r, dtype=self.dtype)
        a[:rank] = a_star
        b[:, :rank] = b_star
        return a, b

    def write_row(self, module: str, row: int, a_star: torch.Tensor, b_star: torch.Tensor) -> None:
        """Write one adapter's aligned factors (true rank, the plan's dtype) into ``row`` of ``module``."""
        self.open()
        a, b = self.padded(module, a_star, b_star)
        d_in, d_out = self.shapes[module]
        item = self.dtype.itemsize
        pwrite_all(self._fd, tensor_bytes(a), self.begin[f"{module}::a_star"] + row * self.r * d_in * item)
        pwrite_all(self._fd, tensor_bytes(b), self.begin[f"{module}::b_star"] + row * d_out * self.r * item)
        pwrite_all(self._fd, tensor_bytes(a[0]), self.begin[f"{module}::prototypes"] + row * d_in * item)


class LibraryWriter:
    """The file of ``plan`` at ``path``: header, index maps and general means written on creation,
    rows after; ``adopt`` continues a dead build's temp file that already holds this plan's header,
    index maps and general means, byte for byte (:func:`.resume.find_resumable` compared them)."""

    def __init__(self, path: Path, plan: LibraryPlan, adopt: Path | None = None, layout: sio.Layout | None = None):
        self.plan = plan
        self.layout = plan.layout() if layout is None else layout  # ``layout``: plan.layout(), when known
        self.file = StreamingFile(Path(path), self.layout.size, adopt)
        try:
            if not self.file.adopted:  # an adopted file holds them already: find_resumable adopts no other
                self.file.pwrite(self.layout.head, 0)
                for name, t in plan.fixed_tensors().items():
                    self.file.pwrite(tensor_bytes(t), self.layout.data_start + self.layout.offsets[name][0])
            self.target = RowTarget(self.file.temp, plan, self.layout)
        except BaseException:
            self.file.abort()
            raise

    def __enter__(self) -> LibraryWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.target.close()
        if kind is None:
            self.file.commit()
        else:
            self.file.abort()

    def copy_rows(self, module: str, dst_row: int, source: RowSource, src_row: int, count: int) -> None:
        """Copy ``count`` rows of ``module`` from an existing library file (same dtype), re-padding
        the rank when it differs. Rows must only carry zero padding beyond the new rank."""
        plan = self.plan.modules[module]
        item, r_new = self.plan.dtype.itemsize, self.plan.r_max
        for field, row_shape in (
            ("a_star", (r_new, plan.d_in)),
            ("b_star", (plan.d_out, r_new)),
            ("prototypes", (plan.d_in,)),
        ):
            row_bytes = item * math.prod(row_shape)
            dst = self.layout.data_start + self.layout.offsets[f"{module}::{field}"][0] + dst_row * row_bytes
            if field == "prototypes" or source.rank(module) == r_new:
                source.copy_range(module, field, src_row, count, self.file.fd, dst)
            else:
                for first in range(0, count, max(1, _COPY_CHUNK // max(1, row_bytes))):
                    n = min(count - first, max(1, _COPY_CHUNK // max(1, row_bytes)))
                    rows = source.read_rows(module, field, src_row + first, n)
                    self.file.pwrite(tensor_bytes(_repad(rows, field, r_new, source, module)), dst + first * row_bytes)


def _repad(rows: torch.Tensor, field: str, r_new: int, source: RowSource, module: str) -> torch.Tensor:
    """[n, r_old, d_in] -> [n, r_new, d_in] (a_star) or [n, d_out, r_old] -> [n, d_out, r_new] (b_star)."""
    dim = 1 if field == "a_star" else 2
    r_old = rows.shape[dim]
    if r_new < r_old:
        cut = rows.narrow(dim, r_new, r_old - r_new)
        if bool(cut.any()):
            raise source.fail(
                f"module {module!r}: {field} has non-zero values beyond the rank its 'ranks' "
                f"gives (columns {r_new}..{r_old - 1}); cannot re-pad it"
            )
        return rows.narrow(dim, 0, r_new)
    shape = list(rows.shape)
    shape[dim] = r_new
    out = torch.zeros(shape, dtype=rows.dtype)
    out.narrow(dim, 0, r_old).copy_(rows)
    return out


class RowSource:
    """Rows of an existing library file, read (or copied by the kernel) without a memory map."""

    def __init__(self, stored):
        self.stored = stored
        self.fd = os.open(stored.path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)

    def fail(self, message: str):
        return self.stored.fail(message)

    def rank(self, module: str) -> int:
        return self.stored.modules[module].rank

    def _entry(self, module: str, field: str) -> sio.Entry:
        return self.stored.modules[module].entries[field]

    def _row_bytes(self, entry: sio.Entry) -> int:
        return (entry.end - entry.begin) // max(1, entry.shape[0])

    def copy_range(self, module: str, field: str, first: int, count: int, dst_fd: int, dst: int) -> None:
        entry = self._entry(module, field)
        size = self._row_bytes(entry)
        src = self.stored.header.data_start + entry.begin + first * size
        copy_file_range(self.fd, src, dst_fd, dst, count * size)

    def read_rows(self, module: str, field: str, first: int, count: int) -> torch.Tensor:
        entry = self._entry(module, field)
        size = self._row_bytes(entry)
        data = os.pread(self.fd, count * size, self.stored.header.data_start + entry.begin + first * size)
        if len(data) != count * size:
            raise self.fail(f"module {module!r}: {field} is truncated (the file changed while reading?)")
        return torch.frombuffer(bytearray(data), dtype=entry.torch_dtype).view(count, *entry.shape[1:])


def copy_file_range(src_fd: int, src: int, dst_fd: int, dst: int, nbytes: int) -> None:
    """Copy bytes between files in the kernel (a reflink on filesystems that share blocks), falling
    back to reads and writes where the call is missing or refused."""
    while nbytes > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, nbytes, src, dst)
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
                errno.EPERM,
            ):
                raise
            n = 0
        if n == 0:  # unsupported here, or the source ended early: copy the rest by hand
            chunk = os.pread(src_fd, min(nbytes, _COPY_CHUNK), src)
            if not chunk:
                raise OSError(errno.EIO, "library file ended while copying its rows (changed while reading?)")
            pwrite_all(dst_fd, chunk, dst)
            n = len(chunk)
        src, dst, nbytes = src + n, dst + n, nbytes - n

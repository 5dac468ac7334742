"""The safetensors container, read and written by this package itself.

Reading: every header field is checked (dtype, shape, offsets in bounds, sizes that match,
no two tensors sharing bytes), so a damaged or hostile file gets an error that says what is
wrong instead of a crash or a silent read of another tensor's bytes. Writing: byte-identical
output for equal inputs, and atomic replacement of the target (temp file in the same folder,
fsync, rename), which no safetensors version guarantees for every version we allow.

Callers turn :class:`SafetensorsProblem` into their own error type naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import secrets
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The format's own limit; also keeps a hostile length field from making us read gigabytes as JSON.
MAX_HEADER_BYTES = 100 * 1024 * 1024
TEMP_SUFFIX = ".lag-tmp"


class SafetensorsProblem(ValueError):
    """What is wrong with a safetensors file (the caller adds which file)."""


@dataclass(frozen=True)
class Entry:
    """One tensor's header entry, checked."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int
    size: int


def json_type(value) -> str:
    """The JSON name of a parsed JSON value's type, for messages."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


#: what json.loads raises on text it cannot take: JSONDecodeError and UnicodeDecodeError (ValueErrors),
#: a ValueError for an integer past Python's digit limit, RecursionError for deep nesting
JSON_ERRORS = (ValueError, RecursionError)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: Path) -> Header:
    """Parse and check the header of the safetensors file at ``path`` (an existing file)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise SafetensorsProblem(f"too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise SafetensorsProblem(
                f"truncated or not a safetensors file (its header length field says "
                f"{header_len} bytes in a {size}-byte file)"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except JSON_ERRORS as e:
        raise SafetensorsProblem(f"not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsProblem(f"not a safetensors file: its header is a JSON {json_type(header)}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsProblem(f"header field '__metadata__' must be an object of strings, got {metadata!r:.80}")
    data_start = 8 + header_len
    entries = {name: _check_entry(name, info, size - data_start) for name, info in header.items()}
    _check_layout(entries.values(), size - data_start)
    return Header(entries, metadata, data_start, size)


def _check_entry(name: str, info, data_size: int) -> Entry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsProblem(f"{where}: header entry is a JSON {json_type(info)}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise SafetensorsProblem(f"{where}: header entry has no {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsProblem(f"{where}: unsupported dtype {dtype!r:.40}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise SafetensorsProblem(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r:.80}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsProblem(
            f"{where}: 'data_offsets' must be [begin, end] with 0 <= begin <= end, got {offsets!r:.80}"
        )
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise SafetensorsProblem(
            f"{where}: shape {shape} of {dtype} needs {nbytes} bytes but 'data_offsets' {offsets} span {end - begin}"
        )
    if end > data_size:
        raise SafetensorsProblem(f"truncated: {where} ends at data byte {end} of {data_size}")
    return Entry(name, dtype, tuple(shape), begin, end)


def _check_layout(entries, data_size: int) -> None:
    """The tensors tile the data exactly, as the format requires: no shared bytes, no gaps."""
    spans = sorted((e.begin, e.end, e.name) for e in entries if e.end > e.begin)
    position, previous = 0, None
    for begin, end, name in spans:
        if begin < position:
            raise SafetensorsProblem(f"tensors {previous!r} and {name!r} overlap ('data_offsets' share bytes)")
        if begin > position:
            raise SafetensorsProblem(f"data bytes [{position}, {begin}) before tensor {name!r} belong to no tensor")
        position, previous = end, name
    if position != data_size:
        raise SafetensorsProblem(
            f"{data_size - position} data bytes after the last tensor belong to no tensor "
            "(truncated header or appended data?)"
        )


def map_tensors(path: Path, header: Header) -> dict[str, torch.Tensor]:
    """Zero-copy tensors over a private (copy-on-write) memory map of the file.

    The map reads the file as it is when a page is first touched: the file must not change while
    these tensors live (``lag_triton.patch`` copies what it keeps).
    """
    with open(path, "rb") as fh:
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if header.size else b""
    return {name: _tensor(buffer, header.data_start + e.begin, e) for name, e in header.entries.items()}


def read_tensors(path: Path, header: Header, names) -> dict[str, torch.Tensor]:
    """Copies of the named tensors, read with plain file reads (no map is left behind)."""
    out = {}
    with open(path, "rb") as fh:
        for name in names:
            e = header.entries[name]
            fh.seek(header.data_start + e.begin)
            buffer = bytearray(e.end - e.begin)
            if fh.readinto(buffer) != len(buffer):
                raise SafetensorsProblem(f"truncated: tensor {name!r} could not be read in full")
            out[name] = _tensor(buffer, 0, e)
    return out


def _tensor(buffer, offset: int, e: Entry) -> torch.Tensor:
    """The tensor of entry ``e`` whose bytes start at ``offset`` in ``buffer``."""
    dtype = e.torch_dtype
    count = (e.end - e.begin) // dtype.itemsize
    if count == 0:
        return torch.empty(e.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, offset=offset, count=count).view(e.shape)


# -- writing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where everything goes in a safetensors file, known before any tensor data exists.

    ``head`` is the 8-byte length plus the JSON header; ``offsets[name]`` is (begin, end) of the
    tensor's bytes relative to ``data_start``; ``order`` is the order of the tensors in the data.
    """

    head: bytes
    order: list[str]
    offsets: dict[str, tuple[int, int]]

    @property
    def data_start(self) -> int:
        return len(self.head)

    @property
    def size(self) -> int:
        return self.data_start + max((end for _, end in self.offsets.values()), default=0)


def plan_layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> Layout:
    """The layout of a file holding tensors ``name -> (dtype, shape)`` and ``metadata``.

    Larger items first keeps every tensor aligned to its item size (as safetensors orders them);
    names break ties, so equal inputs give equal bytes whatever the dict order. A streaming writer
    and :func:`write` share this, so both produce the same bytes for the same tensors.
    """
    for name, (dtype, _) in specs.items():
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store here")
    order = sorted(specs, key=lambda n: (-specs[n][0].itemsize, n))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offsets, offset = {}, 0
    for name in order:
        dtype, shape = specs[name]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = (offset, offset + nbytes)
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return Layout(struct.pack("<Q", len(raw)) + raw, order, offsets)


def _serialised_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    layout = plan_layout({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, metadata)
    return layout.head, layout.order


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(parent)!r} is not a folder")


def check_output_path(path: Path) -> None:
    """Raise OSError (naming ``path``) unless a file can be written and renamed to ``path``."""
    _check_target(path)
    fd, temp = _open_temp(path)  # the only reliable test for read-only mounts, ACLs, quotas
    os.close(fd)
    os.unlink(temp)


#: bytes a temp file name adds after its prefix: the owner (a pid, or _SET_ASIDE), 8 hex digits,
#: TEMP_SUFFIX, and a journal's ".journal" (:func:`.resume.journal_path`), with room to spare
_TEMP_TAIL_BYTES = 48
_NAME_MAX = 255  # bytes in a file name (ext4, xfs, btrfs, APFS, tmpfs)


def _temp_prefix(path: Path) -> str:
    """The start of every temp file name for ``path`` on this host: its name and the host's, or,
    where they would leave a temp name too long for the filesystem (a long output name, a long pod
    hostname), a shortened name and a digest of both (the same for the same path and host)."""
    prefix = f".{path.name}.{socket.gethostname()}."
    if len(os.fsencode(prefix)) + _TEMP_TAIL_BYTES <= _NAME_MAX:
        return prefix
    digest = hashlib.sha256(os.fsencode(prefix)).hexdigest()[:16]
    short = os.fsencode(path.name)[:96].decode("utf-8", errors="ignore")
    return f".{short}~{digest}."


def _temp_name(path: Path, owner: str) -> Path:
    """A fresh temp file name for ``path``: ``owner`` is the writing process's pid, or _SET_ASIDE
    (what :func:`stale_temps` parses back)."""
    return path.parent / f"{_temp_prefix(path)}{owner}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _open_temp(path: Path) -> tuple[int, Path]:
    temp = _temp_name(path, str(os.getpid()))
    try:
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), temp
    except OSError as e:
        raise type(e)(e.errno, f"cannot write {str(path)!r}: {e.strerror}", str(path.parent)) from None


_SET_ASIDE = "kept"  # in place of the pid: a failed build's temp file, kept for a resumed build


def stale_temps(path: Path) -> list[Path]:
    """Temp files that a killed save or build to ``path`` on this host left behind (its pid is
    gone), and those a failed build set aside (:func:`set_aside_temp`)."""
    prefix = _temp_prefix(path)
    try:
        names = sorted(os.listdir(path.parent))
    except OSError:
        return []
    out = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid == _SET_ASIDE or (pid.isdigit() and not _pid_alive(int(pid))):
            out.append(path.parent / name)
    return out


def set_aside_temp(path: Path) -> Path:
    """A new name for a temp file of ``path`` that this process gives up but keeps (a failed build
    that can be resumed): one that :func:`stale_temps` lists although this process lives on."""
    return _temp_name(path, _SET_ASIDE)


def _remove_stale_temps(path: Path) -> None:
    for temp in stale_temps(path):
        try:
            os.unlink(temp)
        except OSError:
            pass


def _claim_temp(temp: Path, path: Path) -> Path:
    """Rename a dead process's temp file for ``path`` to one of this process (so that no other
    writer removes it as stale); raises FileNotFoundError if another process claimed it first."""
    claimed = _temp_name(path, str(os.getpid()))
    os.rename(temp, claimed)
    return claimed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours (EPERM), or cannot tell: leave its file alone
        return True
    return True


def _write_tensor(fh, t: torch.Tensor) -> None:
    if t.numel():
        fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: ``path`` holds either its old bytes or all the new ones
    (:func:`replace_with`)."""
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here")
    head, order = _serialised_header(tensors, metadata)

    def fill(fh) -> None:
        fh.write(head)
        for name in order:
            _write_tensor(fh, tensors[name])

    replace_with(path, fill)


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (:func:`replace_with`)."""
    replace_with(path, lambda fh: fh.write(data))


def replace_with(path: Path, fill) -> None:
    """``fill(fh)`` writes a temp file in the target folder, which is fsynced and renamed over
    ``path`` (then the folder is fsynced). On any error the temp file is removed; one left by a
    killed process is removed by the next write to the same path."""
    _check_target(path)
    _remove_stale_temps(path)
    fd, temp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

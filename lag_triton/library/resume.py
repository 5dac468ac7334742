"""Resuming a killed streaming build (or ``add``): its temp file plus a journal of the adapters it holds.

A streaming build (:mod:`.build`) writes every adapter's rows at offsets fixed by the plan, into
a temp file next to the output. Beside it, a journal lists the adapters whose rows are complete:
one JSON line per adapter — its index, folder, and the size and mtime of its config and weights
file — appended only after the temp file was fsynced, so a line never claims rows a crash could
lose (lines are batched, one fsync a second at most). A build that is killed (SIGKILL, the OOM
killer, a lost session) leaves both under its pid; one that fails or is interrupted (an adapter
error, Ctrl-C) renames them with "kept" in place of the pid (:func:`set_aside`), so that a resumed
build in the same process finds them too. ``build_library(..., resume=True)`` looks for:

- such a temp file for the same output, with this build's size and header (names, modules, their
  shapes, r_max, dtype, base model, the general adapters' names and modules) and this build's bytes
  of the tensors fixed before any adapter is aligned (:meth:`.plan.LibraryPlan.fixed_tensors`):
  every module's ``adapter_ids`` and ``ranks``, and the general means. The header alone does not
  say which row of a module holds which adapter, nor what the means are: adapters that trade
  modules while every module keeps its count, or general adapters retrained in place, leave it
  unchanged, and the rows kept would then sit under other adapters or hold another subtraction;
- the journal lines whose index, folder and file stamps still match: those adapters are not
  aligned again; every other adapter is, as in a fresh build. A stamp is taken before the adapter
  is read, so an adapter saved again while it was being aligned fails to match and is aligned again.

The result has the same bytes as a build from the start. Without a match, the build starts from the
first adapter (warning when that throws a dead build's rows away). A temp file a build adopts is
renamed to its own pid first, so no other build removes it as stale meanwhile, and its new journal
starts with the adapters carried over (so a resumed build killed again resumes as well); the next
build or save to that output without ``resume`` removes what dead builds left, as it always has.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import safetensors_io as sio
from .peft_reader import PeftAdapter
from .writer import tensor_bytes

_JOURNAL = ".journal"
_SYNC_SECONDS = 1.0  # at most one fsync of the data (and one journal write) per second


def journal_path(temp: Path) -> Path:
    """The journal beside a temp file (a temp file name too, so stale-temp cleanup removes it)."""
    return temp.with_name(temp.name.removesuffix(sio.TEMP_SUFFIX) + _JOURNAL + sio.TEMP_SUFFIX)


def adapter_stamp(folder: Path) -> list[int]:
    """(size, mtime_ns) of an adapter's config and weights file: what must not have changed."""
    out = []
    for file in (folder / "adapter_config.json", PeftAdapter(folder, {}).weights_file()):
        st = os.stat(file)
        out += [st.st_size, st.st_mtime_ns]
    return out


Stamp = list[int] | None  # adapter_stamp, or None where it could not be taken (never matches again)


def stamp_before_reading(folder: Path) -> Stamp:
    """The stamp to journal for an adapter about to be read: taken first, so that a save of the
    adapter while it is read leaves the journal an older stamp, and a resumed build aligns it again.
    None where the files cannot be stat'ed: opening the adapter then raises the error that names it."""
    try:
        return adapter_stamp(folder)
    except Exception:
        return None


def _key(folder: Path) -> str:
    return os.path.abspath(folder)  # a relative folder means the same adapter only from the same cwd


class BuildJournal:
    """Records adapters whose rows are in the temp file (``data_fd``), durably (module docstring).
    ``folders``: adapter index -> folder; ``carried``: index -> the verified journal line of each
    adapter whose rows an adopted file holds (:func:`find_resumable`), recorded again as it was."""

    def __init__(self, temp: Path, data_fd: int, folders: dict[int, Path], carried: dict[int, str] | None = None):
        self.path = journal_path(temp)
        self.data_fd = data_fd
        self.folders = folders
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        carried = carried or {}
        self.pending: list[str] = [carried[index] for index in sorted(carried)]
        self.entries = len(self.pending)  # adapters recorded, pending lines included
        self.last_sync = time.monotonic()
        self.flush()

    def done(self, index: int, stamp: Stamp) -> None:
        """Record adapter ``index`` as written, with the stamp its files had before it was read."""
        self.pending.append(json.dumps({"index": index, "folder": _key(self.folders[index]), "stamp": stamp}))
        self.entries += 1
        if time.monotonic() - self.last_sync >= _SYNC_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        os.fsync(self.data_fd)  # the rows first: a line must never claim rows a crash could lose
        data = memoryview(("\n".join(self.pending) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data) :]
        self.pending = []
        self.last_sync = time.monotonic()

    def close(self, *, keep: bool) -> None:
        """Flush and close; the journal is removed unless ``keep`` (a build that may be resumed)."""
        try:
            if keep:
                self.flush()
        finally:
            os.close(self.fd)
            if not keep:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass


def unresumable(temps: list[Path]) -> list[Path]:
    """Of the dead temp files of one output (:func:`.safetensors_io.stale_temps`), those no build can
    resume: temp files without a journal, and journals without their temp file."""
    names = {t.name for t in temps}
    out = []
    for temp in temps:
        if temp.name.endswith(_JOURNAL + sio.TEMP_SUFFIX):
            if temp.name.removesuffix(_JOURNAL + sio.TEMP_SUFFIX) + sio.TEMP_SUFFIX not in names:
                out.append(temp)
        elif journal_path(temp).name not in names:
            out.append(temp)
    return out


def set_aside(temp: Path, path: Path) -> Path:
    """Rename a failed build's temp file of ``path`` and its journal so that a resumed build finds
    them, in this process too (whose pid is alive); returns the temp file's new name."""
    kept = sio.set_aside_temp(path)
    os.rename(journal_path(temp), journal_path(kept))  # the journal first: a temp file without one is never adopted
    os.rename(temp, kept)
    return kept


@dataclass(frozen=True)
class DeadBuild:
    """A dead build's temp file for this output with this build's size and header.
    ``carried``: index -> journal line of each adapter whose rows it holds unchanged; ``written``:
    adapters its journal lists; ``resumable``: False when its index maps or general means differ
    from this build's (module docstring), so none of its rows can be kept."""

    temp: Path
    carried: dict[int, str]
    written: int
    resumable: bool


def find_resumable(
    path: Path, layout: sio.Layout, fixed: dict[str, torch.Tensor], folders: dict[int, Path]
) -> DeadBuild | None:
    """The dead build's temp file for ``path`` that this build (``layout``, and ``fixed``, the
    plan's fixed tensors) could continue, and what it holds (``folders``: index -> folder of every
    adapter to build); None when no dead build left one with this size and header. One whose fixed
    tensors differ is returned only when no other matches (``resumable`` False, so that the build
    can say what it throws away); among the others the most adapters win."""
    best, best_key = None, None
    for temp in sio.stale_temps(path):
        if temp.name.endswith(_JOURNAL + sio.TEMP_SUFFIX) or not journal_path(temp).is_file():
            continue
        try:
            if os.path.getsize(temp) != layout.size:
                continue
            with open(temp, "rb") as f:
                if f.read(layout.data_start) != layout.head:
                    continue
                resumable = _holds_fixed_tensors(f, layout, fixed)
            lines = journal_lines(journal_path(temp))
        except OSError:
            continue
        carried = _unchanged(lines, folders) if resumable else {}
        written = written_adapters(lines)
        key = (resumable, len(carried), written)
        if best_key is None or key > best_key:
            best, best_key = DeadBuild(temp, carried, written, resumable), key
    return best


def written_adapters(lines: list[tuple[int, str, object, str]]) -> int:
    """How many adapters a journal's :func:`journal_lines` say are written."""
    return len({index for index, *_ in lines})


def _holds_fixed_tensors(f, layout: sio.Layout, fixed: dict[str, torch.Tensor]) -> bool:
    """Whether the file ``f`` holds at the layout's offsets the bytes the writer would write there."""
    for name, t in fixed.items():
        begin, end = layout.offsets[name]
        f.seek(layout.data_start + begin)
        if f.read(end - begin) != tensor_bytes(t):
            return False
    return True


def journal_lines(journal: Path) -> list[tuple[int, str, object, str]]:
    """(index, folder, stamp, line) of every complete line."""
    out = []
    for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            index, folder, stamp = entry["index"], entry["folder"], entry["stamp"]
        except (*sio.JSON_ERRORS, KeyError, TypeError):
            continue  # a torn last line (killed mid-write): that adapter is aligned again
        if isinstance(index, int):
            out.append((index, folder, stamp, line))
    return out


def _unchanged(lines: list[tuple[int, str, object, str]], folders: dict[int, Path]) -> dict[int, str]:
    done = {}
    for index, folder, stamp, line in lines:
        if index in folders and _key(folders[index]) == folder and stamp is not None:
            try:
                if adapter_stamp(folders[index]) == stamp:
                    done[index] = line
            except Exception:  # the adapter is gone or unreadable now: the build will say so
                continue
    return done

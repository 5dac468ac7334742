"""Resuming a killed streaming build (or ``add``): its temp file plus a journal of the adapters it holds.

A streaming build (:mod:`.build`) writes every adapter's rows at offsets fixed by the plan, into
a temp file next to the output. Beside it, a journal lists the adapters whose rows are complete:
one JSON line per adapter — its index, folder, and the size and mtime of its config and weights
file — appended only after the temp file was fsynced, so a line never claims rows a crash could
lose (lines are batched, one fsync a second at most). A build that is killed (SIGKILL, the OOM
killer, a lost session) leaves both under its pid; one that fails or is interrupted (an adapter
error, Ctrl-C) renames them with "kept" in place of the pid (:func:`set_aside`), so that a resumed
build in the same process finds them too. ``build_library(..., resume=True)`` looks for:

- such a temp file for the same output, with this build's size and exactly this build's header
  (same names, modules, shapes, ranks, dtype, base model, general means);
- the journal lines whose index, folder and file stamps still match: those adapters are not
  aligned again; every other adapter is, as in a fresh build.

The result has the same bytes as a build from the start. Without a match, the build starts from the
first adapter. A temp file a build adopts is renamed to its own pid first, so no other build
removes it as stale meanwhile, and its new journal starts with the adapters carried over (so a
resumed build killed again resumes as well); the next build or save to that output without
``resume`` removes what dead builds left, as it always has.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import safetensors_io as sio
from .peft_reader import PeftAdapter

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

    def done(self, index: int) -> None:
        folder = self.folders[index]
        self.pending.append(json.dumps({"index": index, "folder": _key(folder), "stamp": adapter_stamp(folder)}))
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


def set_aside(temp: Path, path: Path) -> Path:
    """Rename a failed build's temp file of ``path`` and its journal so that a resumed build finds
    them, in this process too (whose pid is alive); returns the temp file's new name."""
    kept = sio.set_aside_temp(path)
    os.rename(journal_path(temp), journal_path(kept))  # the journal first: a temp file without one is never adopted
    os.rename(temp, kept)
    return kept


def find_resumable(path: Path, head: bytes, size: int, folders: dict[int, Path]) -> tuple[Path, dict[int, str]] | None:
    """A dead build's temp file for ``path`` with this ``head`` and ``size``, and the adapters whose
    rows it holds unchanged: index -> their journal line (``folders``: index -> folder of every
    adapter to build); None when there is none. The most adapters win when several builds left files."""
    best = None
    for temp in sio.stale_temps(path):
        if temp.name.endswith(_JOURNAL + sio.TEMP_SUFFIX) or not journal_path(temp).is_file():
            continue
        try:
            if os.path.getsize(temp) != size:
                continue
            with open(temp, "rb") as f:
                if f.read(len(head)) != head:
                    continue
            done = _journal_entries(journal_path(temp), folders)
        except OSError:
            continue
        if best is None or len(done) > len(best[1]):
            best = (temp, done)
    return best


def _journal_entries(journal: Path, folders: dict[int, Path]) -> dict[int, str]:
    done = {}
    for line in journal.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            index, folder, stamp = entry["index"], entry["folder"], entry["stamp"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line (killed mid-write): that adapter is aligned again
        if isinstance(index, int) and index in folders and _key(folders[index]) == folder:
            try:
                if adapter_stamp(folders[index]) == stamp:
                    done[index] = line
            except Exception:  # the adapter is gone or unreadable now: the build will say so
                continue
    return done

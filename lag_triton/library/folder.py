"""Library folders: one library stored as several part files, so that ``add`` writes only the new
adapters instead of a copy of the whole library.

A library folder holds ``library.json`` and the part files it lists::

    {"format": "lag_triton.library-folder", "format_version": 1,
     "parts": ["part-000000.lag.safetensors", "part-000001.lag.safetensors"]}

Each part is a complete library file (:mod:`.stored`) over its own adapters. The folder's library
is the parts' adapters in the order listed: adapter ``i`` of part ``j`` is library adapter
``offset_j + i`` (``offset_j``: the adapters of the parts before it), and a module's rows are the
rows of every part that targets it (:class:`.stacked.StackedModuleWeights`), padded to the largest
rank of any part: the library equals one built from the same adapters in that order. Parts must
agree: distinct adapter names, one d_in x d_out and one factor dtype per module, the same general
knowledge (GKS names and means, bit for bit). The base model is decided from every adapter's, as a
build decides it.

Writers (one at a time per folder: each holds an ``flock`` on the folder's ``.lock`` file from
reading its state to its commit, and a second fails at once): a build (``build_folder``) writes one
part; ``add`` writes one new part holding only the new adapters (O(new adapters)); ``remove``
rewrites only the parts that hold removed adapters and drops the parts it empties;
``assemble_folder`` makes library files (built apart, e.g. on several machines) parts of a folder,
hard-linked where it can (no copy); ``compact_folder`` merges the parts into one part, or into one
library file (rows copied, never re-aligned). Each writes its part files under names the manifest
does not list, then replaces ``library.json`` atomically (the commit), then deletes the part files
it no longer lists and the temp files of killed writers that nothing can resume: a writer killed
before the commit leaves the library as it was. A killed or failed build or ``add`` keeps its temp
file and journal (:mod:`.resume`); the same build or ``add`` run again takes that part (``resume``
continues it, a fresh run discards it with the warning a library file's build gives); every other
writer numbers its parts after it, and a build, which replaces the folder whole, removes it once
committed (warning what it throws away).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import safetensors_io as sio
from .build import BuildReport, check_dtype, plan_build, write_library
from .plan import (
    LibraryPlan,
    ModulePlan,
    check_new_adapters,
    plan_adapters,
    single_factor_dtype,
    stored_module_plans,
)
from .resume import find_resumable, journal_lines, journal_path, unresumable, written_adapters
from .stored import (
    LibraryFormatError,
    StoredLibrary,
    check_names,
    existing_library_path,
    read_stored,
    single_base_model,
)

MANIFEST = "library.json"
FOLDER_FORMAT = "lag_triton.library-folder"
FOLDER_FORMAT_VERSION = 1
_PART = re.compile(r"part-(\d{6,})\.lag\.safetensors")


def part_name(index: int) -> str:
    return f"part-{index:06d}.lag.safetensors"


def is_library_folder(path) -> bool:
    """True for a folder that holds a ``library.json`` (what ``Library.load`` reads as a folder)."""
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


@dataclass(frozen=True)
class StoredFolder:
    """A library folder's checked manifest and its parts' checked headers (no factors read)."""

    path: Path
    files: list[str]  # the part files, in library order
    parts: list[StoredLibrary]

    def fail(self, message: str) -> LibraryFormatError:
        return LibraryFormatError(f"library folder {str(self.path)!r}: {message}")

    @property
    def names(self) -> list[str]:
        return [n for p in self.parts for n in p.names]

    @property
    def offsets(self) -> list[int]:
        """Library id of each part's first adapter."""
        out, n = [], 0
        for p in self.parts:
            out.append(n)
            n += len(p.names)
        return out

    @property
    def adapter_base_models(self) -> list[str | None]:
        return [b for p in self.parts for b in p.adapter_base_models]

    @property
    def base_model(self) -> str | None:
        return single_base_model(self.adapter_base_models)

    @property
    def r_max(self) -> int:
        return max(m.rank for p in self.parts for m in p.modules.values())

    @property
    def module_names(self) -> list[str]:
        return sorted({m for p in self.parts for m in p.modules})

    @property
    def factor_dtypes(self) -> set[torch.dtype]:
        return set().union(*(p.factor_dtypes for p in self.parts))


def read_folder(path) -> StoredFolder:
    """Read and check a library folder's manifest and every part's header, and that the parts agree
    (module docstring); reads no factors (the general means, if any, are compared). Raises
    :class:`LibraryFormatError` naming the folder and the part."""
    path = Path(path)
    manifest = path / MANIFEST

    def fail(message: str) -> LibraryFormatError:
        return LibraryFormatError(f"library folder {str(path)!r}: {message}")

    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # no such folder, or a file
        raise fail(f"it has no {MANIFEST}: not a library folder") from None
    except sio.JSON_ERRORS as e:
        raise fail(f"{MANIFEST} is not JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FOLDER_FORMAT:
        raise fail(f"{MANIFEST} is not a lag_triton library folder manifest (format {FOLDER_FORMAT!r} expected)")
    version = info.get("format_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version >= 1):
        raise fail(f"{MANIFEST}: 'format_version' must be a positive integer, got {version!r:.40}")
    if version > FOLDER_FORMAT_VERSION:
        raise fail(f"folder format version {version}; this lag_triton reads up to {FOLDER_FORMAT_VERSION}: upgrade it")
    files = info.get("parts")
    if not (isinstance(files, list) and files and all(isinstance(f, str) for f in files)):
        raise fail(f"{MANIFEST}: 'parts' must be a non-empty list of file names, got {files!r:.80}")
    for f in files:
        if f in ("", ".", "..") or "/" in f or "\\" in f or "\0" in f or f == MANIFEST:
            raise fail(f"{MANIFEST}: part {f!r} is not a plain file name in the folder")
    if len(set(files)) != len(files):
        raise fail(f"{MANIFEST} lists a part twice: {sorted(f for f in set(files) if files.count(f) > 1)[:5]}")
    for f in files:
        if not (path / f).is_file():
            raise fail(f"part {f!r}, listed in {MANIFEST}, is not a file in the folder")
    folder = StoredFolder(path, files, [read_stored(path / f) for f in files])
    _check_parts_agree(folder)
    return folder


def _check_parts_agree(folder: StoredFolder) -> None:
    owner: dict[str, str] = {}
    for f, part in zip(folder.files, folder.parts):
        for n in part.names:
            if n in owner:
                raise folder.fail(f"adapter {n!r} is in both {owner[n]!r} and {f!r}: names must be unique")
            owner[n] = f
    seen: dict[str, tuple[str, str]] = {}
    for f, part in zip(folder.files, folder.parts):
        for name, m in part.modules.items():
            dtypes = [str(m.entries[k].torch_dtype).removeprefix("torch.") for k in ("a_star", "b_star", "prototypes")]
            desc = f"{m.d_in} -> {m.d_out}, {'/'.join(dict.fromkeys(dtypes))} factors"
            first = seen.setdefault(name, (f, desc))
            if first[1] != desc:
                raise folder.fail(
                    f"module {name!r} is {desc} in {f!r} but {first[1]} in {first[0]!r}: parts must share "
                    "shapes and dtypes"
                )
    general = [p.general_knowledge() for p in folder.parts]
    base = general[0]
    for f, g in zip(folder.files[1:], general[1:]):
        same = (g is None) == (base is None) and (
            g is None
            or (
                g.names == base.names
                and g.means.keys() == base.means.keys()
                and all(torch.equal(x, y) for m in g.means for x, y in zip(g.means[m], base.means[m]))
            )
        )
        if not same:
            raise folder.fail(
                f"part {f!r} subtracts other general knowledge (GKS) than {folder.files[0]!r}: every part of "
                "a folder must be built with the same general adapters"
            )


# -- writing --------------------------------------------------------------------------------------------
def writer_entry(entry: str) -> bool:
    """True for a folder entry a library folder's writer makes, or leaves when killed or failed
    before its first commit (a part, its temp file and journal, a manifest temp file, the lock): a
    folder holding only these may be written as a library folder (a build continues or discards
    them); anything else is another folder's file."""
    return bool(_PART.fullmatch(entry)) or entry == _LOCK or entry.startswith((".part-", f".{MANIFEST}."))


def _prepare(path: Path, replace: bool = False) -> StoredFolder | None:
    """The library folder at ``path`` (None for a new one, created here); refuses a file, or a
    folder holding anything but library parts and their temp files. ``replace`` (a build, which
    replaces the folder whole): a library folder, even one whose manifest or parts are broken,
    counts as new (its commit deletes every part file it does not list)."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"library folder {str(path)!r} is a file (a library file? write a folder elsewhere)")
    if is_library_folder(path):
        return None if replace else read_folder(path)  # a build replaces it whole: nothing of it is read
    path.mkdir(parents=True, exist_ok=True)
    for stale in sio.stale_temps(path / MANIFEST):  # a writer killed while it replaced the manifest
        stale.unlink(missing_ok=True)
    other = sorted(e for e in os.listdir(path) if not writer_entry(e))
    if other:
        raise FileExistsError(
            f"folder {str(path)!r} holds {other[:3]} and no {MANIFEST}: not a library folder (choose an empty "
            "or new folder)"
        )
    return None


_LOCK = ".lock"


class FolderBusy(RuntimeError):
    """Another writer holds the library folder's lock."""


@contextlib.contextmanager
def _one_writer(path: Path, new: bool = False):
    """Hold the library folder's writer lock (``flock`` on its ``.lock`` file) from reading its
    state to its commit: a second writer fails at once instead of one commit silently dropping the
    other's part. Readers take no lock (a load that races a commit reads again). Without ``fcntl``
    (not POSIX) there is no lock: one writer at a time is then up to the caller. ``new``: a folder
    that :func:`_prepare` has just checked or made (a build's, an assemble's)."""
    if not (new or is_library_folder(path)):
        read_folder(path)  # raises what a folder that is not a library folder gets
    try:
        import fcntl
    except ImportError:
        yield
        return
    # Read-only (flock needs no write access) and 0o666 less the umask, as the parts and manifest
    # are: in a folder a group shares, every member's writer can open the lock whichever writer made it.
    try:
        fd = os.open(path / _LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    except PermissionError:  # O_CREAT on another user's file in a sticky folder (fs.protected_regular)
        fd = os.open(path / _LOCK, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(
                f"library folder {str(path)!r}: another writer (build, add, remove, assemble or compact) is at "
                "work on it; one writer at a time"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


_TEMP_PART = re.compile(r"\.part-(\d{6,})\.lag\.safetensors\..*")


def _numbers(path: Path) -> tuple[set[int], set[int]]:
    """(numbers of the part files in the folder, listed or not; numbers only temp files have)."""
    entries = os.listdir(path)
    parts = {int(m.group(1)) for m in map(_PART.fullmatch, entries) if m}
    temps = {int(m.group(1)) for m in map(_TEMP_PART.fullmatch, entries) if m}
    return parts, temps - parts


def _next_parts(path: Path, count: int) -> list[str]:
    """``count`` new part names, numbered after every part and temp file in the folder (so that no
    writer takes the name of a killed ``add``'s part, whose temp file a resume continues)."""
    parts, unfinished = _numbers(path)
    start = max(parts | unfinished, default=-1) + 1
    return [part_name(start + i) for i in range(count)]


def _part_for(path: Path, plan: LibraryPlan, folders: dict[int, Path]) -> str:
    """The part a build or ``add`` of ``plan`` writes: that of a killed or failed run of this same
    plan, found as a library file's build finds one (:func:`.resume.find_resumable`: same size and
    header), so that ``resume`` continues it and a fresh run discards it with the file's warning;
    else a new one."""
    layout, fixed = plan.layout(), plan.fixed_tensors()
    for number in sorted(_numbers(path)[1], reverse=True):
        if find_resumable(path / part_name(number), layout, fixed, folders) is not None:
            return part_name(number)
    return _next_parts(path, 1)[0]


def _discard_dead_temps(path: Path) -> None:
    """Remove what killed writers left that nothing can resume: dead temp files without a journal
    (a killed ``remove``, ``compact`` or ``assemble`` copy) and journals without their temp file."""
    for number in _numbers(path)[1]:
        for temp in unresumable(sio.stale_temps(path / part_name(number))):
            temp.unlink(missing_ok=True)


def _discard_dead_builds(path: Path) -> None:
    """Remove the temp files and journals that killed or failed builds and ``add``s left, which
    :func:`_discard_dead_temps` keeps for a resume: after a build replaced the folder whole nothing
    can resume them (as a library file's build removes what dead builds to its path left), saying
    what is thrown away as that build does."""
    for number in sorted(_numbers(path)[1]):
        temps = sio.stale_temps(path / part_name(number))
        for temp in temps:
            if journal_path(temp) not in temps:  # a journal, or a temp file without one (nothing to say)
                continue
            try:
                written = written_adapters(journal_lines(journal_path(temp)))
            except OSError:
                written = 0
            if written:
                warnings.warn(
                    f"{path}: removing what a killed run to this folder left ({written} adapters written, in "
                    f"{temp.name}): this build replaced the folder whole, so nothing can resume it",
                    stacklevel=4,
                )
        for temp in temps:
            temp.unlink(missing_ok=True)


def _commit(path: Path, files: list[str]) -> None:
    """Make ``files`` the folder's parts (atomic: the manifest is replaced whole), then delete the
    part files no longer listed (what this writer replaced, and what killed writers left)."""
    manifest = {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "parts": files}
    sio.write_bytes(path / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    for entry in os.listdir(path):
        if _PART.fullmatch(entry) and entry not in files:
            try:
                os.unlink(path / entry)
            except OSError:  # gone already, or (elsewhere than POSIX) still mapped: the next commit retries
                pass
    _discard_dead_temps(path)


def build_folder(
    paths, output, *, names=None, dtype=torch.float32, workers=None, progress=True, general_adapters=None, resume=False
) -> BuildReport:
    """:func:`.build.build_library` into the library folder ``output`` (created if missing; a folder
    library already there is replaced whole, atomically): one part holding every adapter."""
    start = time.perf_counter()
    output = Path(output)
    paths, plan = plan_build(paths, names, dtype, general_adapters)
    _prepare(output, replace=True)
    with _one_writer(output, new=True):
        part = _part_for(output, plan, dict(enumerate(paths)))
        aligned, resumed, nbytes = write_library(
            output / part, plan, paths, workers=workers, progress=progress, desc="aligning adapters", resume=resume
        )
        _commit(output, [part])
        _discard_dead_builds(output)
        n = len(plan.names)
        return BuildReport(output, n, aligned, len(plan.modules), nbytes, time.perf_counter() - start, resumed)


def add_to_folder(path, paths, *, names=None, workers=None, progress=True, resume=False) -> BuildReport:
    """Append the PEFT folders ``paths`` to the library folder ``path`` as one new part: only the
    new adapters are read, aligned and written. Checks as :func:`.grow.add_adapters` does."""
    start = time.perf_counter()
    path = Path(path)
    with _one_writer(path):
        folder = read_folder(path)
        label = f"library folder {str(path)!r}"
        paths, new_names = check_new_adapters(paths, names, label, folder.names)
        dtype = check_dtype(single_factor_dtype(folder.factor_dtypes, label, "add"))
        shapes = {}
        for part in folder.parts:
            shapes.update({name: (m.d_in, m.d_out) for name, m in part.modules.items()})
        first = len(folder.names)
        general = folder.parts[0].general_knowledge()
        # planned after the library's modules, so that a shape mismatch names the library's side
        modules, base_models = plan_adapters(
            paths, first_index=first, modules={m: ModulePlan(*s) for m, s in shapes.items()}, general=general
        )
        part_modules = {
            m: ModulePlan(p.d_in, p.d_out, [i - first for i in p.ids], p.ranks) for m, p in modules.items() if p.ids
        }
        plan = LibraryPlan(new_names, dtype, part_modules, base_models, general)
        part = _part_for(path, plan, {j: p for j, p in enumerate(paths)})
        aligned, resumed, nbytes = write_library(
            path / part, plan, paths, workers=workers, progress=progress, desc="aligning new adapters", resume=resume
        )
        _commit(path, folder.files + [part])
        n = first + len(new_names)
        modules_after = len(set(shapes) | set(part_modules))
        seconds = time.perf_counter() - start
        return BuildReport(path, n, aligned, modules_after, nbytes, seconds, resumed, untouched=first)


def remove_from_folder(path, names) -> BuildReport:
    """Drop the adapters ``names`` from the library folder ``path``: each part that holds some is
    rewritten without them (:func:`.grow.remove_adapters`), each it empties dropped, the others left
    as they are. Raises ValueError for an unknown name or for removing every adapter."""
    from .grow import remove_adapters

    start = time.perf_counter()
    path = Path(path)
    with _one_writer(path):
        folder = read_folder(path)
        removed = set(check_names([names] if isinstance(names, str) else names))
        unknown = sorted(removed - set(folder.names))
        if unknown:
            raise ValueError(f"library folder {str(path)!r} has no adapters named {unknown[:10]}")
        if not set(folder.names) - removed:
            raise ValueError(f"removing {len(removed)} adapters would leave library folder {str(path)!r} empty")
        rewrite = [f for f, p in zip(folder.files, folder.parts) if removed & set(p.names) and set(p.names) - removed]
        fresh = dict(zip(rewrite, _next_parts(path, len(rewrite))))
        files, parts, written, untouched = [], [], 0, 0
        for f, part in zip(folder.files, folder.parts):
            gone = removed & set(part.names)
            if not gone:
                files.append(f)
                parts.append(part)
                untouched += len(part.names)
            elif f in fresh:
                written += remove_adapters(path / f, sorted(gone), output=path / fresh[f]).nbytes
                files.append(fresh[f])
                parts.append(read_stored(path / fresh[f]))
        _commit(path, files)
        after = StoredFolder(path, files, parts)
        seconds = time.perf_counter() - start
        return BuildReport(path, len(after.names), 0, len(after.module_names), written, seconds, untouched=untouched)


def assemble_folder(path, libraries) -> BuildReport:
    """Make the library files ``libraries`` the next parts of the library folder ``path`` (created
    if missing), in that order: hard links where the filesystem allows (no bytes copied; lag_triton
    replaces a library file by renaming a new one over it, so a later ``add`` to the original leaves
    the part as it was), else synced copies. Every file is checked (its index maps as a load checks
    them), and against the folder's parts (one factor dtype for all), before the folder changes.
    Returns what it wrote (``nbytes``: bytes copied, 0 when all were linked)."""
    start = time.perf_counter()
    path = Path(path)
    given = [libraries] if isinstance(libraries, (str, os.PathLike)) else list(libraries)
    if not given:
        raise ValueError("no library files to assemble")
    for p in given:
        if isinstance(p, (str, os.PathLike)) and is_library_folder(p):
            raise ValueError(
                f"{str(p)!r} is a library folder; assemble takes library files (compact -o FILE merges a "
                "folder into one)"
            )
    sources = [existing_library_path(p) for p in given]
    if len(set(map(os.path.realpath, sources))) != len(sources):
        raise ValueError("a library file is given twice: its adapters' names would repeat")
    new = [read_stored(s) for s in sources]
    for stored in new:  # a header says nothing of them, and a part with bad ones breaks the folder's load
        for module in stored.modules:
            stored.index_maps(module)
    if not is_library_folder(path):  # checked before the folder is made
        _check_new_parts(path, [], [], sources, new)
        _prepare(path)
    with _one_writer(path, new=True):
        return _assemble(path, sources, new, start)


def _check_new_parts(path: Path, old: list[str], current: list[StoredLibrary], sources, new) -> None:
    """The folder ``old`` + ``sources`` is one (messages name the given files); one factor dtype."""
    candidate = StoredFolder(path, old + [str(s) for s in sources], current + new)
    _check_parts_agree(candidate)
    single_factor_dtype(
        candidate.factor_dtypes, f"library folder {str(path)!r} with {len(sources)} new parts", "a folder"
    )


def _assemble(path: Path, sources: list[Path], new: list[StoredLibrary], start: float) -> BuildReport:
    folder = _prepare(path)
    old, current = (folder.files, folder.parts) if folder else ([], [])
    _check_new_parts(path, old, current, sources, new)
    names, copied, linked = _next_parts(path, len(sources)), 0, 0
    for source, name, stored in zip(sources, names, new):
        try:
            os.link(source, path / name)
            linked += len(stored.names)
        except OSError:  # another filesystem, or one without hard links: a synced copy, renamed into place
            with open(source, "rb") as src:
                sio.replace_with(path / name, lambda fh: shutil.copyfileobj(src, fh, 2**24))
            copied += (path / name).stat().st_size
    _commit(path, old + names)
    after = StoredFolder(path, old + names, current + new)
    untouched = sum(len(p.names) for p in current)
    seconds = time.perf_counter() - start
    return BuildReport(
        path, len(after.names), 0, len(after.module_names), copied, seconds, untouched=untouched, linked=linked
    )


def compact_folder(path, output=None) -> BuildReport:
    """Merge the parts of the library folder ``path``: into one part (``output`` None; a folder of
    one part is left as it is), or into the library file ``output`` (the folder left as it is). Rows
    are copied by the kernel where the rank padding is unchanged (re-padded otherwise), never
    re-aligned: the bytes are those of one build of all the adapters in order."""
    start = time.perf_counter()
    path = Path(path)
    with _one_writer(path) if output is None else contextlib.nullcontext():  # -o only reads the folder
        return _compact(path, output, start)


def _open_parts(path: Path, locked: bool) -> tuple[StoredFolder, list[dict], list]:
    """The folder, each part's module plans (:func:`.plan.stored_module_plans`) and each part opened
    (a :class:`.writer.RowSource`, to copy from once a commit may have deleted it). ``locked``
    False (compact -o, a reader like a load): a writer that commits meanwhile deletes the parts it
    replaced, so the folder is read again, as a load reads it, until its manifest stayed the same
    from its reading to the last part opened (listed parts never change, so those are its parts)."""
    from .library import _stamp
    from .writer import RowSource

    for attempt in range(3):
        before = _stamp(path / MANIFEST)
        sources = []
        try:
            folder = read_folder(path)
            plans = [stored_module_plans(part) for part in folder.parts]
            for part in folder.parts:
                sources.append(RowSource(part))
            if locked or _stamp(path / MANIFEST) == before:
                return folder, plans, sources
        except BaseException as e:
            _close(sources)
            raced = isinstance(e, (FileNotFoundError, LibraryFormatError)) and _stamp(path / MANIFEST) != before
            if locked or attempt == 2 or not raced:  # no commit came between: a real error
                raise
            continue
        _close(sources)
    raise LibraryFormatError(
        f"library folder {str(path)!r}: writers committed while it was read, 3 times in a row; try again"
    )


def _close(sources) -> None:
    for source in sources:
        source.close()


def _compact(path: Path, output, start: float) -> BuildReport:
    from .writer import LibraryWriter

    label = f"library folder {str(path)!r}"
    if output is not None and Path(output).resolve().parent == path.resolve():
        raise ValueError(f"compact -o {str(output)!r}: write the merged library file outside {label}")
    folder, plans, sources = _open_parts(path, locked=output is None)
    try:
        if output is None and len(folder.parts) == 1:
            n = len(folder.names)
            return BuildReport(path, n, 0, len(folder.module_names), 0, time.perf_counter() - start, untouched=n)
        modules: dict[str, ModulePlan] = {}
        copies = []  # (module, first row in the merged module, part index, rows)
        for j, (part_plans, offset) in enumerate(zip(plans, folder.offsets)):
            for name, (plan, ids) in part_plans.items():
                merged = modules.setdefault(name, ModulePlan(plan.d_in, plan.d_out))
                copies.append((name, merged.num_adapters, j, len(ids)))
                merged.ids += [offset + i for i in ids]
                merged.ranks += plan.ranks
        plan = LibraryPlan(
            folder.names,
            single_factor_dtype(folder.factor_dtypes, label, "compact"),
            dict(sorted(modules.items())),
            folder.adapter_base_models,
            folder.parts[0].general_knowledge(),
        )
        target = path / _next_parts(path, 1)[0] if output is None else Path(output)
        with LibraryWriter(target, plan) as writer:
            for name, row, j, count in copies:
                writer.copy_rows(name, row, sources[j], 0, count)
    finally:
        _close(sources)
    if output is None:
        _commit(path, [target.name])
    seconds = time.perf_counter() - start
    return BuildReport(
        path if output is None else target, len(plan.names), 0, len(modules), writer.layout.size, seconds
    )

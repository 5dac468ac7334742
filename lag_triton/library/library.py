"""The LAG adapter library: aligned factors per targeted module (:mod:`.weights`), built from PEFT
folders (:mod:`.build`), saved to and memory-mapped from one safetensors file (format: :mod:`.stored`)
or from a library folder of several such files (:mod:`.folder`).

``load`` checks every field it uses and raises :class:`LibraryFormatError` naming the file and the
field; ``save`` replaces the target atomically and writes equal libraries to equal bytes, the same
bytes a streaming build (``from_peft(..., output=)``) or an in-place ``add``/``remove`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from . import safetensors_io as sio
from .build import build_in_memory, build_library
from .folder import MANIFEST, is_library_folder, read_folder
from .general import GeneralKnowledge
from .plan import library_metadata
from .stacked import StackedModuleWeights
from .stored import (
    LibraryFormatError,
    StoredLibrary,
    check_names,
    existing_library_path,
    read_stored,
    single_base_model,
)
from .weights import FIELDS, ModuleWeights

__all__ = ["Library", "LibraryFormatError"]
_TENSOR_FIELDS = FIELDS
_check_names = check_names


class Library:
    """N LoRA adapters for one base model, aligned for LAG routing (docs/design.md §1)."""

    def __init__(
        self,
        names: Sequence[str],
        modules: dict[str, ModuleWeights | StackedModuleWeights],
        *,
        base_model: str | None = None,
        source: str | None = None,
        general: GeneralKnowledge | None = None,
        adapter_base_models: Sequence[str | None] | None = None,
    ):
        """``adapter_base_models``: the base model each adapter's PEFT config declares (None: none),
        in ``names`` order, which ``add``/``remove`` need to decide ``base_model`` as a build would;
        None: every adapter declares ``base_model``."""
        self.names = _check_names(names)
        if not isinstance(modules, dict) or not modules:
            raise ValueError("a library needs at least one module (a dict of module name -> ModuleWeights)")
        for name, m in modules.items():
            if not isinstance(name, str) or not isinstance(m, (ModuleWeights, StackedModuleWeights)):
                raise TypeError(f"library modules must map str -> ModuleWeights, got {name!r} -> {type(m).__name__}")
        self.modules = dict(modules)
        if base_model is not None and not isinstance(base_model, str):
            raise TypeError(f"base_model must be a string or None, got {type(base_model).__name__}")
        self.base_model = base_model
        self.adapter_base_models = _check_adapter_base_models(adapter_base_models, self.names, base_model)
        self.source = source  # where it was loaded from, for error messages
        self.general = _check_general(general, self.modules)

    def check(self) -> None:
        """Check every value routing relies on (reads all the data): adapter ids index ``names`` once
        per module, ranks lie in [1, r], factors are finite. Raises ValueError naming module and field."""
        for name, m in self.modules.items():
            try:
                m.check_values(len(self.names))
            except ValueError as e:
                raise ValueError(f"library {self.label}, module {name!r}: {e}") from None

    # -- description ---------------------------------------------------------------------------
    def __repr__(self) -> str:
        gks = f", GKS over {len(self.general.names)} general adapters" if self.general else ""
        return (
            f"Library({len(self.names)} adapters, {len(self.modules)} modules, r_max={self.r_max}, "
            f"dtype={self.dtype}, {self.nbytes / 2**20:.1f} MiB{gks})"
        )

    @property
    def label(self) -> str:
        return repr(self.source) if self.source else f"<library of {len(self.names)} adapters>"

    @property
    def r_max(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).dtype

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.modules.values())

    def to(self, device=None, dtype: torch.dtype | None = None, *, copy: bool = False) -> Library:
        """Move/cast the factors; ``copy=True`` gives tensors that share nothing with this library (a
        folder's modules always come back as new, single tensors)."""
        modules = {name: m.to(device, dtype, copy=copy) for name, m in self.modules.items()}
        return Library(
            self.names,
            modules,
            base_model=self.base_model,
            source=self.source,
            general=self.general,
            adapter_base_models=self.adapter_base_models,
        )

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_peft(
        cls,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        names: Sequence[str] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        progress: bool = True,
        output: str | os.PathLike | None = None,
        workers: int | None = None,
        general_adapters: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        resume: bool = False,
        folder: bool = False,
    ) -> Library:
        """Align PEFT LoRA folders (a list of them, or one folder) into a library.

        Reads every folder's config and tensor headers first (so a bad adapter fails before any
        work), then loads and aligns one adapter at a time. Without ``output`` the library is
        built in memory. With ``output`` the aligned rows stream straight into that file (memory
        bounded by a few adapters whatever N is) and the library returned is ``Library.load(output,
        check_values=False)``: its values were checked as they were aligned, so the file just
        written is not read again (``patch`` checks the copies it keeps).

        ``workers``: processes that align in parallel (0: this process). With ``output``, None
        starts one per core from 16 adapters on (:func:`.build.build_library`); in memory, None
        aligns in this process (an unguarded script keeps working) and ``workers=N`` aligns in N
        processes that send each adapter's rows back. Either way the library is the same, bit for bit, and
        a script that starts workers must guard its top level with ``if __name__ == "__main__":``.

        ``general_adapters`` (PEFT folders or Hub paths): general knowledge subtraction, as PEFT's
        ``create_arrow_model(..., general_adapter_paths=...)`` with ``use_gks=True`` does it: their
        mean lora_A and lora_B are subtracted from every adapter's before it is aligned
        (:mod:`.general`); the library keeps the means, so ``add`` subtracts the same ones.
        ``resume`` (with ``output``): continue a killed or failed build of the same adapters into
        that file, aligning only the adapters it lacks (:mod:`.resume`). ``folder=True`` (with
        ``output``): write a library folder (:mod:`.folder`) there, which ``add`` grows by writing
        only the new adapters; an ``output`` that is a library folder already is replaced as one.
        Raises :class:`AdapterError` naming the folder, file and field.
        """
        if resume and output is None:
            raise ValueError("resume=True continues a build into a file: give output= as well")
        if folder and output is None:
            raise ValueError("folder=True writes a library folder: give output= (the folder) as well")
        if output is not None:
            build_library(
                paths,
                output,
                names=names,
                dtype=dtype,
                workers=workers,
                progress=progress,
                general_adapters=general_adapters,
                resume=resume,
                folder=folder,
            )
            return cls.load(output, check_values=False)
        workers = 0 if workers is None else workers  # in memory, workers are asked for (see above)
        plan, weights = build_in_memory(paths, names, dtype, progress, general_adapters, workers)
        return cls(
            plan.names,
            weights,
            base_model=plan.base_model,
            general=plan.general,
            adapter_base_models=plan.adapter_base_models,
        )

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the library to one safetensors file, atomically (``path`` keeps its old content
        until the new file is complete and synced), with the same bytes for equal libraries."""
        whole = {name: m if isinstance(m, ModuleWeights) else m.to() for name, m in self.modules.items()}
        tensors = {
            f"{module}::{f}": getattr(m, f)
            for module, m in whole.items()
            for f in _TENSOR_FIELDS
            if getattr(m, f) is not None
        }
        if self.general is not None:
            tensors.update(self.general.tensors())
        metadata = library_metadata(
            self.names, self.base_model, self.modules, self.r_max, self.dtype, self.general, self.adapter_base_models
        )
        sio.write(Path(path), tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, check_values: bool = True) -> Library:
        """Memory-map a library saved by :meth:`save` (or a library folder, :mod:`.folder`) after
        checking it.

        The factors stay in the file's private memory map (``patch`` copies what it keeps). The
        header, names, dtypes, shapes and offsets are always checked; with ``check_values`` every
        value is read once here too (ids, ranks, finite factors). ``check_values=False`` leaves that
        to ``patch``, which checks the copies it keeps anyway: a large library is then read once
        instead of twice, and with ``process_group=`` each rank reads only its own rows of the
        factors. Raises FileNotFoundError / IsADirectoryError for a bad path and
        :class:`LibraryFormatError`, naming the file and the field, for bad content.
        """
        if isinstance(path, (str, os.PathLike)) and is_library_folder(path):
            return _load_folder(Path(path), check_values)
        path = existing_library_path(path)
        return _load(path, check_values)


def _load_folder(path: Path, check_values: bool) -> Library:
    """A library folder's parts, each loaded as a file, read as one library: a module held by one
    part at offset 0 and padded to r_max is that part's module, any other a stacked view of its parts."""
    for attempt in range(3):  # a writer that commits meanwhile deletes the parts it replaced: read again
        manifest = _stamp(path / MANIFEST)
        try:
            folder = read_folder(path)
            parts = [_load(path / f, check_values, stored) for f, stored in zip(folder.files, folder.parts)]
            break
        except (FileNotFoundError, LibraryFormatError):
            if attempt == 2 or _stamp(path / MANIFEST) == manifest:  # no commit came between: a real error
                raise
    r_max, modules = folder.r_max, {}
    for name in folder.module_names:
        held = [
            (lib.modules[name], o, f) for lib, o, f in zip(parts, folder.offsets, folder.files) if name in lib.modules
        ]
        if len(held) == 1 and held[0][1] == 0 and held[0][0].rank == r_max:
            modules[name] = held[0][0]
        else:
            modules[name] = StackedModuleWeights(
                [w for w, _, _ in held], [o for _, o, _ in held], r_max, labels=[f"part {f!r}" for _, _, f in held]
            )
    return Library(
        folder.names,
        modules,
        base_model=folder.base_model,
        source=str(path),
        general=parts[0].general,
        adapter_base_models=folder.adapter_base_models,
    )


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of ``path``: a commit renames a new manifest over the old one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _load(path: Path, check_values: bool = True, stored: StoredLibrary | None = None) -> Library:
    """The library file at ``path``; ``stored``: its header, when read already (a folder's parts)."""
    stored = read_stored(path) if stored is None else stored
    tensors = sio.map_tensors(path, stored.header)
    weights = {}
    for module in stored.modules:
        parts = {f: tensors.get(f"{module}::{f}") for f in _TENSOR_FIELDS}
        parts["adapter_ids"] = parts["adapter_ids"].to(torch.int64, copy=True)
        if parts["ranks"] is not None:
            parts["ranks"] = parts["ranks"].clone()  # no cast: a narrowing cast could wrap a bad value into range
        try:
            weights[module] = ModuleWeights(**parts)
        except ValueError as e:
            raise stored.fail(f"module {module!r}: {e}") from None
    lib = Library(
        stored.names,
        weights,
        base_model=stored.base_model,
        source=str(path),
        general=stored.general_knowledge(),
        adapter_base_models=stored.base_models,
    )
    if not check_values:
        return lib
    for module, m in weights.items():
        try:
            m.check_values(len(stored.names))
        except ValueError as e:
            raise stored.fail(f"module {module!r}: {e}") from None
    return lib


def _check_adapter_base_models(base_models, names: list[str], base_model: str | None) -> list[str | None]:
    if base_models is None:
        return [base_model] * len(names)
    if isinstance(base_models, (str, bytes)) or not isinstance(base_models, Sequence):
        raise TypeError(f"adapter_base_models must be a list of strings or None, got {type(base_models).__name__}")
    base_models = list(base_models)
    if len(base_models) != len(names):
        raise ValueError(f"{len(base_models)} adapter_base_models for {len(names)} adapter names")
    for name, declared in zip(names, base_models):
        if not (declared is None or (isinstance(declared, str) and declared)):
            raise TypeError(
                f"adapter_base_models must hold non-empty strings or None; adapter {name!r} has {declared!r:.60}"
            )
    if single_base_model(base_models) != base_model:
        raise ValueError(
            f"adapter_base_models give base model {single_base_model(base_models)!r} (every adapter that "
            f"declares one must declare the same, else None), but base_model is {base_model!r}"
        )
    return base_models


def _check_general(general: GeneralKnowledge | None, modules: dict[str, ModuleWeights]) -> GeneralKnowledge | None:
    """``general`` if it holds means of every module's shape (its ranks are checked as it is built)."""
    if general is None:
        return None
    if not isinstance(general, GeneralKnowledge):
        raise TypeError(f"general must be a GeneralKnowledge or None, got {type(general).__name__}")
    for name, m in modules.items():
        mean = general.means.get(name)
        if mean is None:
            raise ValueError(f"the general knowledge has no means for module {name!r}")
        if (mean[0].shape[1], mean[1].shape[0]) != (m.d_in, m.d_out):  # not m.a_star: a stacked module joins its parts
            raise ValueError(
                f"module {name!r}: the general means are {mean[0].shape[1]} x {mean[1].shape[0]} (d_in x d_out), "
                f"the factors {m.d_in} x {m.d_out}"
            )
    return general

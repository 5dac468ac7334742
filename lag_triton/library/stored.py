"""The library file format, read without reading the factors: header, names, modules, index maps.

File layout: tensors ``<module>::<field>`` (fields in :mod:`.weights`), and string metadata
``format`` = "lag_triton.library", ``format_version``, and ``library`` = a JSON object with
``names`` (the adapters, in id order), ``modules``, ``base_model``, ``r_max`` and ``dtype``.
Format version 2 adds the general knowledge subtracted from every adapter (:mod:`.general`):
``library.general`` = {``names``: the general adapters, ``modules``} and float32 tensors
``general::<module>::lora_A`` [r, d_in] and ``::lora_B`` [d_out, r]; a library without it is
written as version 1, byte for byte as before.

``base_model`` is the base model the adapters' configs declare when those that declare one agree,
else null. In any version, ``library.base_models`` may list, in ``names`` order, the base model each
adapter declares (null: none); it is written only where ``base_model`` does not say it already
(adapters that declare different base models, or some that declare none), so that ``add`` and
``remove`` set the ``base_model`` a build of their adapters would. Readers that predate it ignore
it and read ``base_model`` as before (so it needs no new version); without it, every adapter is
taken to declare ``base_model``.

:func:`read_stored` checks every header field it uses and raises :class:`LibraryFormatError`
naming the file and the field. ``Library.load``, ``lag_triton info`` and the in-place
``add``/``remove`` all start here, so they accept and refuse exactly the same files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import safetensors_io as sio
from .general import FIELDS as GENERAL_FIELDS
from .general import MEAN_DTYPE, GeneralKnowledge, tensor_name
from .weights import FIELDS, check_index_maps

FORMAT = "lag_triton.library"
FORMAT_VERSION = 2  # the newest this reads and writes (a library with general knowledge)
PLAIN_FORMAT_VERSION = 1  # what a library without general knowledge is written as
FILE_DTYPES = {
    **{f: ("F64", "F32", "F16", "BF16") for f in ("a_star", "b_star", "prototypes")},
    "adapter_ids": ("I64", "I32"),
    "ranks": ("I32", "I64"),
}
REQUIRED_FIELDS = FIELDS[:4]  # ranks is optional


class LibraryFormatError(ValueError):
    """A file that is not a (complete, consistent) lag_triton library."""


def check_names(names) -> list[str]:
    """``names`` as a list of unique strings, else TypeError/ValueError saying what is wrong."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"adapter names must be a list of strings, got {type(names).__name__}")
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        bad = next(n for n in names if not isinstance(n, str))
        raise TypeError(f"adapter names must be strings, got {bad!r} ({type(bad).__name__})")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = sorted({n for n in names if n in seen or seen.add(n)})
        raise ValueError(f"adapter names must be unique; repeated: {dup[:10]}")
    return names


@dataclass(frozen=True)
class StoredModule:
    """One module's tensors in a library file (header entries; no data read)."""

    name: str
    entries: dict[str, sio.Entry]  # field -> entry; "ranks" may be absent

    @property
    def num_adapters(self) -> int:
        return self.entries["a_star"].shape[0]

    @property
    def rank(self) -> int:
        return self.entries["a_star"].shape[1]

    @property
    def d_in(self) -> int:
        return self.entries["a_star"].shape[2]

    @property
    def d_out(self) -> int:
        return self.entries["b_star"].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(e.end - e.begin for e in self.entries.values())


@dataclass(frozen=True)
class StoredLibrary:
    """A library file's checked header: what ``info`` prints and what ``add``/``remove`` rewrite."""

    path: Path
    header: sio.Header
    names: list[str]
    modules: dict[str, StoredModule]  # in the order of the metadata's 'modules'
    base_model: str | None
    general: tuple[list[str], list[str]] | None = None  # GKS: (general adapter names, modules with means)
    base_models: list[str | None] | None = None  # the optional 'base_models' (module docstring)

    @property
    def adapter_base_models(self) -> list[str | None]:
        """The base model each adapter declares: 'base_models', or ``base_model`` for every adapter
        of a file without it (all a file written before it existed says)."""
        return list(self.base_models) if self.base_models is not None else [self.base_model] * len(self.names)

    def fail(self, message: str) -> LibraryFormatError:
        return LibraryFormatError(f"library file {str(self.path)!r}: {message}")

    @property
    def factor_dtypes(self) -> set[torch.dtype]:
        return {m.entries[f].torch_dtype for m in self.modules.values() for f in ("a_star", "b_star", "prototypes")}

    def general_knowledge(self) -> GeneralKnowledge | None:
        """The general means (GKS) the library was built with, read from the file once (a folder's
        load compares every part's, then loads them); None without."""
        if self.general is None:
            return None
        if "_general_knowledge" not in self.__dict__:
            names, modules = self.general
            try:  # a SafetensorsProblem is a ValueError too
                tensors = sio.read_tensors(
                    self.path, self.header, [tensor_name(m, f) for m in modules for f in GENERAL_FIELDS]
                )
                means = {m: tuple(tensors[tensor_name(m, f)] for f in GENERAL_FIELDS) for m in modules}
                object.__setattr__(self, "_general_knowledge", GeneralKnowledge(names, means))  # frozen dataclass
            except ValueError as e:
                raise self.fail(str(e)) from None
        return self.__dict__["_general_knowledge"]

    def index_maps(self, module: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(adapter_ids int64, ranks int64 or None) of ``module``, read from the file and checked:
        ids index ``names`` once each, in increasing order, ranks lie in [1, r]."""
        m = self.modules[module]
        wanted = [f"{module}::adapter_ids"] + ([f"{module}::ranks"] if "ranks" in m.entries else [])
        try:
            tensors = sio.read_tensors(self.path, self.header, wanted)
        except sio.SafetensorsProblem as e:
            raise self.fail(str(e)) from None
        ids = tensors[wanted[0]].to(torch.int64)
        ranks = tensors[wanted[1]].to(torch.int64) if len(wanted) > 1 else None
        try:  # what a load checks, so that info, add, remove and assemble refuse what a load refuses
            check_index_maps(ids, ranks, m.rank, len(self.names))
        except ValueError as e:
            raise self.fail(f"module {module!r}: {e}") from None
        return ids, ranks


def read_stored(path: Path) -> StoredLibrary:
    """Read and check a library file's header and metadata (not its tensor data)."""

    def fail(message: str) -> LibraryFormatError:
        return LibraryFormatError(f"library file {str(path)!r}: {message}")

    try:
        header = sio.read_header(path)
    except sio.SafetensorsProblem as e:
        raise fail(str(e)) from None
    info = _library_metadata(header.metadata, fail)
    try:
        names = check_names(info["names"])
    except (TypeError, ValueError) as e:
        raise fail(f"'names': {e}") from None
    modules = info["modules"]
    if not (
        isinstance(modules, list)
        and modules
        and all(isinstance(m, str) for m in modules)
        and len(set(modules)) == len(modules)
    ):
        raise fail(f"'modules' must be a non-empty list of distinct module names, got {modules!r:.80}")
    base_model = info.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise fail(f"'base_model' must be a string or null, got {base_model!r:.40}")
    base_models = _base_models(info, names, base_model, fail)
    general, general_entries = _general(info, header, modules, fail)
    expected = {f"{m}::{f}": (m, f) for m in modules for f in FIELDS}
    stray = sorted(set(header.entries) - set(expected) - set(general_entries))
    if stray:
        raise fail(f"tensor {stray[0]!r} belongs to no module listed in 'modules'")
    per_module: dict[str, dict[str, sio.Entry]] = {m: {} for m in modules}
    for name, entry in header.entries.items():
        if name in general_entries:
            continue
        module, field = expected[name]
        if entry.dtype not in FILE_DTYPES[field]:
            raise fail(
                f"module {module!r}: tensor {field!r} has dtype {entry.dtype}; expected one of {FILE_DTYPES[field]}"
            )
        per_module[module][field] = entry
    for module, entries in per_module.items():
        missing = [f for f in REQUIRED_FIELDS if f not in entries]
        if missing:
            raise fail(f"module {module!r} lacks tensors {missing}")
        _check_shapes(module, entries, fail)
        if general is not None:
            means = tuple(general_entries[tensor_name(module, f)].shape for f in GENERAL_FIELDS)
            if (means[0][1], means[1][0]) != (entries["a_star"].shape[2], entries["b_star"].shape[1]):
                raise fail(
                    f"module {module!r}: its general means are {means[0][1]} x {means[1][0]} (d_in x d_out), "
                    f"its factors {entries['a_star'].shape[2]} x {entries['b_star'].shape[1]}"
                )
    stored_modules = {m: StoredModule(m, per_module[m]) for m in modules}
    return StoredLibrary(path, header, names, stored_modules, base_model, general, base_models)


def single_base_model(adapter_base_models) -> str | None:
    """The base model when every adapter that names one names the same, else None (as ``from_peft``)."""
    named = set(filter(None, adapter_base_models))
    return next(iter(named)) if len(named) == 1 else None


def _base_models(info: dict, names: list[str], base_model: str | None, fail) -> list[str | None] | None:
    """The optional 'base_models', checked: one non-empty string or null per name, agreeing with 'base_model'."""
    base_models = info.get("base_models")
    if base_models is None:
        return None
    if not (
        isinstance(base_models, list)
        and len(base_models) == len(names)
        and all(b is None or (isinstance(b, str) and b) for b in base_models)
    ):
        raise fail(
            f"'base_models' must list, for each of the {len(names)} adapters, its base model (a non-empty "
            f"string) or null, got {base_models!r:.80}"
        )
    implied = single_base_model(base_models)
    if implied != base_model:
        raise fail(
            f"'base_models' (the base model each adapter declares) give base model {implied!r}, "
            f"but 'base_model' is {base_model!r}"
        )
    return base_models


def _general(info: dict, header: sio.Header, modules: list[str], fail) -> tuple[tuple | None, dict[str, sio.Entry]]:
    """((general adapter names, modules with means), their tensors' entries), or (None, {}) for a
    library without GKS; checked: every library module has float32 means [r, d_in] and [d_out, r]."""
    general = info.get("general")
    if general is None:
        return None, {}
    if not (isinstance(general, dict) and isinstance(general.get("names"), list) and general["names"]):
        raise fail(f"'general' must be an object with a non-empty 'names' list, got {general!r:.80}")
    if not all(isinstance(n, str) for n in general["names"]):
        raise fail("'general': 'names' must be strings")
    targets = general.get("modules")
    if not (
        isinstance(targets, list) and all(isinstance(m, str) for m in targets) and len(set(targets)) == len(targets)
    ):
        raise fail(f"'general': 'modules' must be a list of distinct module names, got {targets!r:.80}")
    missing = sorted(set(modules) - set(targets))
    if missing:
        raise fail(f"module {missing[0]!r} has no general means, though the library subtracts general knowledge")
    entries = {}
    for module in targets:
        for field in GENERAL_FIELDS:
            name = tensor_name(module, field)
            entry = header.entries.get(name)
            if entry is None:
                raise fail(f"general knowledge: tensor {name!r} is missing")
            if entry.torch_dtype != MEAN_DTYPE or len(entry.shape) != 2:
                raise fail(
                    f"general knowledge: tensor {name!r} must be a 2-D {MEAN_DTYPE}, got {entry.dtype} {entry.shape}"
                )
            entries[name] = entry
        (rank, _), (_, rank_b) = (entries[tensor_name(module, f)].shape for f in GENERAL_FIELDS)
        if rank != rank_b:
            raise fail(f"general knowledge, module {module!r}: lora_A mean has rank {rank}, lora_B mean {rank_b}")
    return (list(general["names"]), list(targets)), entries


def _library_metadata(meta: dict[str, str], fail) -> dict:
    if meta.get("format") != FORMAT:
        raise fail(f"a safetensors file but not a lag_triton library (metadata format={meta.get('format')!r})")
    version = meta.get("format_version")
    if not (isinstance(version, str) and version.isascii() and version.isdigit() and int(version) >= 1):
        raise fail(f"metadata field 'format_version' must be a positive integer, got {version!r:.40}")
    if int(version) > FORMAT_VERSION:
        raise fail(
            f"library format version {version}; this lag_triton reads up to {FORMAT_VERSION}: upgrade lag_triton"
        )
    if "library" not in meta:
        raise fail("metadata has no 'library' field")
    try:
        info = json.loads(meta["library"])
    except sio.JSON_ERRORS as e:
        raise fail(f"metadata field 'library' is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise fail(f"metadata field 'library' must be a JSON object, got a JSON {sio.json_type(info)}")
    for field in ("names", "modules"):
        if field not in info:
            raise fail(f"metadata field 'library' has no {field!r}")
    return info


def _check_shapes(module: str, entries: dict[str, sio.Entry], fail) -> None:
    """The shape rules of :class:`.weights.ModuleWeights`, checked on header entries (same messages)."""
    from .weights import ModuleWeights

    meta = {f: torch.empty(e.shape, dtype=e.torch_dtype, device="meta") for f, e in entries.items()}
    try:
        ModuleWeights(**meta)
    except ValueError as e:
        raise fail(f"module {module!r}: {e}") from None


def existing_library_path(path) -> Path:
    """``path`` as a Path to an existing file, else TypeError / IsADirectoryError / FileNotFoundError (OSError
    for something else: a device, a FIFO)."""
    import os

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a library path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"library file {str(path)!r} is a directory, not a library file (nor a library folder: "
            "it has no library.json)"
        )
    if path.exists() and not path.is_file():  # a device, a FIFO, a socket
        raise OSError(f"library file {str(path)!r} is not a regular file")
    if not path.is_file():
        raise FileNotFoundError(f"library file {str(path)!r} does not exist")
    return path

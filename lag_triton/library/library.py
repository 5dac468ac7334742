"""The LAG adapter library: aligned factors per targeted module (:mod:`.weights`), built from PEFT
folders, saved to and memory-mapped from one safetensors file.

File layout: tensors ``<module>::<field>`` (fields in :mod:`.weights`), and string metadata
``format`` = "lag_triton.library", ``format_version``, and ``library`` = a JSON object with
``names`` (the adapters, in id order), ``modules``, ``base_model``, ``r_max`` and ``dtype``.
``load`` checks every one of these it uses and raises :class:`LibraryFormatError` naming the file
and the field; ``save`` replaces the target atomically and writes equal libraries to equal bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import safetensors_io as sio
from .align import align_lora
from .peft_reader import PeftAdapter
from .weights import FACTOR_DTYPES, FACTORS, FIELDS, ModuleWeights

FORMAT = "lag_triton.library"
FORMAT_VERSION = 1
_TENSOR_FIELDS = FIELDS
_FILE_DTYPES = {**{f: ("F64", "F32", "F16", "BF16") for f in FACTORS},
                "adapter_ids": ("I64", "I32"), "ranks": ("I32", "I64")}


class LibraryFormatError(ValueError):
    """A file that is not a (complete, consistent) lag_triton library."""


def _check_names(names) -> list[str]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"adapter names must be a list of strings, got {type(names).__name__}")
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        bad = next(n for n in names if not isinstance(n, str))
        raise TypeError(f"adapter names must be strings, got {bad!r} ({type(bad).__name__})")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"adapter names must be unique; repeated: {dup[:10]}")
    return names


class Library:
    """N LoRA adapters for one base model, aligned for LAG routing (DESIGN §1)."""

    def __init__(self, names: Sequence[str], modules: dict[str, ModuleWeights], *,
                 base_model: str | None = None, source: str | None = None):
        self.names = _check_names(names)
        if not isinstance(modules, dict) or not modules:
            raise ValueError("a library needs at least one module (a dict of module name -> ModuleWeights)")
        for name, m in modules.items():
            if not isinstance(name, str) or not isinstance(m, ModuleWeights):
                raise TypeError(f"library modules must map str -> ModuleWeights, got {name!r} -> {type(m).__name__}")
        self.modules = dict(modules)
        if base_model is not None and not isinstance(base_model, str):
            raise TypeError(f"base_model must be a string or None, got {type(base_model).__name__}")
        self.base_model = base_model
        self.source = source  # where it was loaded from, for error messages

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
        return (f"Library({len(self.names)} adapters, {len(self.modules)} modules, r_max={self.r_max}, "
                f"dtype={self.dtype}, {self.nbytes / 2**20:.1f} MiB)")

    @property
    def label(self) -> str:
        return repr(self.source) if self.source else f"<library of {len(self.names)} adapters>"

    @property
    def r_max(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.modules.values())).a_star.dtype

    @property
    def nbytes(self) -> int:
        return sum(getattr(m, f).nbytes for m in self.modules.values() for f in _TENSOR_FIELDS
                   if getattr(m, f) is not None)

    def to(self, device=None, dtype: torch.dtype | None = None, *, copy: bool = False) -> "Library":
        """Move/cast the factors; ``copy=True`` gives tensors that share nothing with this library."""
        modules = {name: m.to(device, dtype, copy=copy) for name, m in self.modules.items()}
        return Library(self.names, modules, base_model=self.base_model, source=self.source)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, paths: str | os.PathLike | Iterable[str | os.PathLike], names: Sequence[str] | None = None,
                  *, dtype: torch.dtype = torch.float32, progress: bool = True) -> "Library":
        """Align PEFT LoRA folders (a list of them, or one folder) into a library.

        Reads every folder's config and tensor headers first (so a bad adapter fails before any
        work), then loads, aligns and stores one adapter at a time: the raw adapters are never
        all in memory together. Raises :class:`AdapterError` naming the folder, file and field.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = list(paths)
        for p in paths:
            if not isinstance(p, (str, os.PathLike)):
                raise TypeError(f"adapter folders must be paths (str or os.PathLike), got {p!r:.60} "
                                f"({type(p).__name__})")
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("Library.from_peft needs at least one adapter folder")
        if dtype not in FACTOR_DTYPES:
            raise ValueError(f"dtype {dtype} is not a factor dtype; choose one of {FACTOR_DTYPES}")
        names = _check_names([p.name for p in paths] if names is None else names)
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} adapter folders")
        adapters = [PeftAdapter.open(p) for p in paths]
        layout = _module_layout(adapters)
        r_max = max(f.rank for a in adapters for f in a.modules.values())
        store = {m: _ModuleBuffer(len(rows), r_max, d_in, d_out, dtype) for m, (rows, d_in, d_out) in layout.items()}
        row_of = {m: {a: i for i, a in enumerate(rows)} for m, (rows, _, _) in layout.items()}
        for index, adapter in enumerate(tqdm(adapters, desc="aligning adapters", disable=not progress)):
            factors = adapter.load_factors()
            batches: dict[tuple[int, int, int], list[str]] = {}  # modules alignable in one batched call
            for module, f in adapter.modules.items():
                batches.setdefault((f.rank, f.d_in, f.d_out), []).append(module)
            for modules in batches.values():
                _align_into(store, adapter, index, modules, factors, row_of)
            del factors
        base_models = {a.base_model for a in adapters if a.base_model}
        weights = {m: store[m].finish(rows) for m, (rows, _, _) in layout.items()}
        return cls(names, weights, base_model=base_models.pop() if len(base_models) == 1 else None)

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the library to one safetensors file, atomically (``path`` keeps its old content
        until the new file is complete and synced), with the same bytes for equal libraries."""
        tensors = {f"{module}::{f}": getattr(m, f) for module, m in self.modules.items() for f in _TENSOR_FIELDS
                   if getattr(m, f) is not None}
        header = {"names": self.names, "base_model": self.base_model, "modules": sorted(self.modules),
                  "r_max": self.r_max, "dtype": str(self.dtype).removeprefix("torch.")}
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "library": json.dumps(header, sort_keys=True, separators=(",", ":"))}
        sio.write(Path(path), tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Library":
        """Memory-map a library saved by :meth:`save` after checking all of it.

        The factors stay in the file's private memory map (``patch`` copies what it keeps); every
        value is read once here to check it. Raises FileNotFoundError / IsADirectoryError for a bad
        path and :class:`LibraryFormatError`, naming the file and the field, for bad content.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"a library path must be a str or os.PathLike, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"library file {str(path)!r} is a directory, not a library file")
        if not path.is_file():
            raise FileNotFoundError(f"library file {str(path)!r} does not exist")
        return _load(path)


def _load(path: Path) -> Library:
    def fail(message: str) -> LibraryFormatError:
        return LibraryFormatError(f"library file {str(path)!r}: {message}")

    try:
        header = sio.read_header(path)
    except sio.SafetensorsProblem as e:
        raise fail(str(e)) from None
    meta = header.metadata
    if meta.get("format") != FORMAT:
        raise fail(f"a safetensors file but not a lag_triton library (metadata format={meta.get('format')!r})")
    version = meta.get("format_version")
    if not (isinstance(version, str) and version.isascii() and version.isdigit() and int(version) >= 1):
        raise fail(f"metadata field 'format_version' must be a positive integer, got {version!r:.40}")
    if int(version) > FORMAT_VERSION:
        raise fail(f"library format version {version}; this lag_triton reads up to {FORMAT_VERSION}: "
                   "upgrade lag_triton")
    if "library" not in meta:
        raise fail("metadata has no 'library' field")
    try:
        info = json.loads(meta["library"])
    except json.JSONDecodeError as e:
        raise fail(f"metadata field 'library' is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise fail(f"metadata field 'library' must be a JSON object, got a JSON {sio.json_type(info)}")
    for field in ("names", "modules"):
        if field not in info:
            raise fail(f"metadata field 'library' has no {field!r}")
    try:
        names = _check_names(info["names"])
    except (TypeError, ValueError) as e:
        raise fail(f"'names': {e}") from None
    modules = info["modules"]
    if not (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)
            and len(set(modules)) == len(modules)):
        raise fail(f"'modules' must be a non-empty list of distinct module names, got {modules!r:.80}")
    base_model = info.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise fail(f"'base_model' must be a string or null, got {base_model!r:.40}")
    expected = {f"{m}::{f}": (m, f) for m in modules for f in _TENSOR_FIELDS}
    stray = sorted(set(header.entries) - set(expected))
    if stray:
        raise fail(f"tensor {stray[0]!r} belongs to no module listed in 'modules'")
    for name, entry in header.entries.items():
        module, field = expected[name]
        if entry.dtype not in _FILE_DTYPES[field]:
            raise fail(f"module {module!r}: tensor {field!r} has dtype {entry.dtype}; expected one of "
                       f"{_FILE_DTYPES[field]}")
    tensors = sio.map_tensors(path, header)
    weights = {}
    for module in modules:
        parts = {f: tensors.get(f"{module}::{f}") for f in _TENSOR_FIELDS}
        missing = [f for f in _TENSOR_FIELDS[:4] if parts[f] is None]
        if missing:
            raise fail(f"module {module!r} lacks tensors {missing}")
        parts["adapter_ids"] = parts["adapter_ids"].to(torch.int64, copy=True)
        if parts["ranks"] is not None:
            parts["ranks"] = parts["ranks"].clone()  # no cast: a narrowing cast could wrap a bad value into range
        try:
            weights[module] = ModuleWeights(**parts)
        except ValueError as e:
            raise fail(f"module {module!r}: {e}") from None
    lib = Library(names, weights, base_model=base_model, source=str(path))
    for module, m in weights.items():
        try:
            m.check_values(len(names))
        except ValueError as e:
            raise fail(f"module {module!r}: {e}") from None
    return lib


class _ModuleBuffer:
    """Preallocated, zero-filled (= rank padding) factor storage for one module."""

    def __init__(self, n: int, r_max: int, d_in: int, d_out: int, dtype: torch.dtype):
        self.a_star = torch.zeros(n, r_max, d_in, dtype=dtype)
        self.b_star = torch.zeros(n, d_out, r_max, dtype=dtype)
        self.ranks = torch.zeros(n, dtype=torch.int32)

    def finish(self, adapter_rows: list[int]) -> ModuleWeights:
        return ModuleWeights(a_star=self.a_star, b_star=self.b_star, prototypes=self.a_star[:, 0].clone(),
                             adapter_ids=torch.tensor(adapter_rows, dtype=torch.int64), ranks=self.ranks)


def _module_layout(adapters: list[PeftAdapter]) -> dict[str, tuple[list[int], int, int]]:
    """module -> (indices of the adapters that target it, d_in, d_out); shapes must agree."""
    layout: dict[str, tuple[list[int], int, int]] = {}
    first: dict[str, PeftAdapter] = {}
    for index, adapter in enumerate(adapters):
        for module, f in adapter.modules.items():
            if module not in layout:
                layout[module] = ([], f.d_in, f.d_out)
                first[module] = adapter
            rows, d_in, d_out = layout[module]
            if (f.d_in, f.d_out) != (d_in, d_out):
                raise adapter.error(f"module {module!r} has d_in x d_out = {f.d_in} x {f.d_out} "
                                    f"(lora_A {f.key_a!r}) but adapter {str(first[module].path)!r} has "
                                    f"{d_in} x {d_out}: all adapters must share one base model")
            rows.append(index)
    return dict(sorted(layout.items()))


def _align_into(store: dict[str, _ModuleBuffer], adapter: PeftAdapter, index: int, modules: list[str],
                factors: dict[str, tuple[torch.Tensor, torch.Tensor]], row_of: dict[str, dict[int, int]]) -> None:
    """Align ``modules`` of adapter ``index`` (one rank, one shape) in one batched call and store them."""
    a = torch.stack([factors[m][0] for m in modules])
    b = torch.stack([factors[m][1] for m in modules])
    s = torch.tensor([adapter.modules[m].scaling for m in modules], dtype=torch.float64)
    try:
        a_star, b_star = align_lora(a, b, s)
    except ValueError:
        for m in modules:
            if not (factors[m][0].isfinite().all() and factors[m][1].isfinite().all()):
                raise adapter.error(f"module {m!r} has non-finite values in lora_A/lora_B") from None
        raise adapter.error(f"modules {modules[:4]}: the update s*B*A overflows float64 (scalings "
                            f"{s.tolist()[:4]})") from None
    rank = a.shape[1]
    for j, m in enumerate(modules):
        row, buf = row_of[m][index], store[m]
        buf.a_star[row, :rank] = a_star[j]
        buf.b_star[row, :, :rank] = b_star[j]
        buf.ranks[row] = rank
        if not bool(buf.b_star[row].isfinite().all()):
            raise adapter.error(f"module {m!r}: the aligned update overflows {buf.b_star.dtype} (its largest "
                                f"singular value is {b_star[j].norm(dim=0).max().item():.3g}); build in float32")

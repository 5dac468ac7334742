"""The LAG adapter library: aligned factors per targeted module, built from PEFT folders,
saved to and memory-mapped from one safetensors file.

Per module m with N_m adapters (r = the library's r_max, rank padding is zero rows/columns):

    a_star      [N_m, r, d_in]   A* = V^T, orthonormal rows, sigma descending
    b_star      [N_m, d_out, r]  B* = U Sigma (scaling folded in)
    prototypes  [N_m, d_in]      A*[:, 0], contiguous (the Arrow prototypes)
    adapter_ids [N_m] int64      row -> index into Library.names
    ranks       [N_m] int32      each adapter's true rank at this module
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .align import align_lora
from .peft_reader import PeftAdapter

FORMAT = "lag_triton.library"
FORMAT_VERSION = 1
_TENSOR_FIELDS = ("a_star", "b_star", "prototypes", "adapter_ids", "ranks")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32}


class LibraryFormatError(ValueError):
    """A file that is not a (complete) lag_triton library."""


@dataclass(frozen=True)
class ModuleWeights:
    """The aligned factors of every adapter that targets one module (shapes in the module docstring)."""

    a_star: torch.Tensor
    b_star: torch.Tensor
    prototypes: torch.Tensor
    adapter_ids: torch.Tensor
    ranks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, r, d_in = self.a_star.shape
        expected = {"b_star": (n, None, r), "prototypes": (n, d_in), "adapter_ids": (n,), "ranks": (n,)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is None:
                continue
            if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
                raise ValueError(f"ModuleWeights.{name} has shape {tuple(t.shape)}; expected "
                                 f"{tuple('d_out' if s is None else s for s in shape)} for a_star {tuple(self.a_star.shape)}")

    @property
    def num_adapters(self) -> int:
        return self.a_star.shape[0]

    @property
    def d_in(self) -> int:
        return self.a_star.shape[2]

    @property
    def d_out(self) -> int:
        return self.b_star.shape[1]

    @property
    def rank(self) -> int:
        return self.a_star.shape[1]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModuleWeights":
        """Move to ``device``; cast the factor tensors (not the integer maps) to ``dtype``."""
        def move(name: str, t: torch.Tensor | None):
            if t is None:
                return None
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            return t.to(device=device, dtype=cast)

        return replace(self, **{f.name: move(f.name, getattr(self, f.name)) for f in fields(self)})


class Library:
    """N LoRA adapters for one base model, aligned for LAG routing (DESIGN §1)."""

    def __init__(self, names: Sequence[str], modules: dict[str, ModuleWeights], *,
                 base_model: str | None = None, source: str | None = None):
        self.names = list(names)
        self.modules = dict(modules)
        self.base_model = base_model
        self.source = source  # where it was loaded from, for error messages
        if len(set(self.names)) != len(self.names):
            raise ValueError("adapter names must be unique")
        if not self.modules:
            raise ValueError("a library needs at least one module")

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

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Library":
        modules = {name: m.to(device, dtype) for name, m in self.modules.items()}
        return Library(self.names, modules, base_model=self.base_model, source=self.source)

    # -- building --------------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, paths: Iterable[str | Path], names: Sequence[str] | None = None, *,
                  dtype: torch.dtype = torch.float32, progress: bool = True) -> "Library":
        """Align PEFT LoRA folders into a library.

        Reads every folder's config and tensor shapes first (so a bad adapter fails before any
        work), then loads, aligns and stores one adapter at a time: the raw adapters are never
        all in memory together.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("Library.from_peft needs at least one adapter folder")
        names = [p.name for p in paths] if names is None else list(names)
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} adapter folders")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"adapter names must be unique; repeated: {dup} (pass names=...)")
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
    def save(self, path: str | Path) -> None:
        tensors = {}
        for module, m in self.modules.items():
            for f in _TENSOR_FIELDS:
                t = getattr(m, f)
                if t is not None:
                    t = t.detach().cpu().contiguous()
                    # prototypes may be a view of a_star; safetensors refuses shared storage
                    tensors[f"{module}::{f}"] = t.clone() if f == "prototypes" else t
        header = {"names": self.names, "base_model": self.base_model, "modules": sorted(self.modules),
                  "r_max": self.r_max, "dtype": str(self.dtype).removeprefix("torch.")}
        save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                                "library": json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path) -> "Library":
        """Memory-map a library saved by :meth:`save` (tensors stay on disk until touched or moved)."""
        path = Path(path)
        tensors, metadata = _mmap_safetensors(path)
        if metadata.get("format") != FORMAT:
            raise LibraryFormatError(f"{str(path)!r} is a safetensors file but not a lag_triton library "
                                     f"(metadata format={metadata.get('format')!r})")
        if int(metadata.get("format_version", -1)) > FORMAT_VERSION:
            raise LibraryFormatError(f"{str(path)!r} has library format version {metadata['format_version']}; "
                                     f"this lag_triton reads up to {FORMAT_VERSION}: upgrade lag_triton")
        header = json.loads(metadata["library"])
        modules = {}
        for module in header["modules"]:
            parts = {f: tensors.get(f"{module}::{f}") for f in _TENSOR_FIELDS}
            missing = [f for f in _TENSOR_FIELDS[:4] if parts[f] is None]
            if missing:
                raise LibraryFormatError(f"{str(path)!r}: module {module!r} lacks tensors {missing}")
            modules[module] = ModuleWeights(**parts)
        return cls(header["names"], modules, base_model=header.get("base_model"), source=str(path))


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
        bad = next(m for m in modules if not (factors[m][0].isfinite().all() and factors[m][1].isfinite().all()))
        raise adapter.error(f"module {bad!r} has non-finite values in lora_A/lora_B") from None
    rank = a.shape[1]
    for j, m in enumerate(modules):
        row, buf = row_of[m][index], store[m]
        buf.a_star[row, :rank] = a_star[j]
        buf.b_star[row, :, :rank] = b_star[j]
        buf.ranks[row] = rank


def _mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse a safetensors file ourselves so that every defect gets a precise error, and
    return zero-copy tensors over a private (copy-on-write) memory map."""
    if not path.is_file():
        raise FileNotFoundError(f"library file {str(path)!r} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise LibraryFormatError(f"{str(path)!r} is too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise LibraryFormatError(f"{str(path)!r} is truncated or not a safetensors file "
                                     f"(header of {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LibraryFormatError(f"{str(path)!r} is not a safetensors file (unreadable header)") from None
        buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else b""
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise LibraryFormatError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if data_start + end > size:
            raise LibraryFormatError(f"{str(path)!r} is truncated: tensor {name!r} ends at byte "
                                     f"{data_start + end} of {size}")
        count = end - begin
        t = (torch.frombuffer(buffer, dtype=dtype, offset=data_start + begin, count=count // dtype.itemsize)
             if count else torch.empty(0, dtype=dtype))
        tensors[name] = t.view(info["shape"])
    return tensors, metadata

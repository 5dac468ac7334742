"""One module's rows spread over the parts of a library folder (:mod:`.folder`), read as one module.

Part ``j`` of a folder holds library adapters ``offset_j, offset_j + 1, ...``; a module's rows are
the rows of every part that targets it, in part order, so its adapter ids still increase from row
to row. Parts may pad to different ranks: the module is padded to the library's ``r_max`` with
zero rows of A* and zero columns of B*, exactly as one file built from the same adapters.

The parts are never concatenated on the host on the way to a model: :meth:`to` and
:meth:`copy_rows` copy each part's rows (memory-mapped from its file) straight into their place in
one new tensor on the target device, so ``patch`` holds what it would hold for one file and sharded
routing copies only its rows. ``a_star``, ``b_star`` and ``prototypes`` exist for code that reads
them directly; they concatenate on first use and keep the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from .weights import FACTORS, ModuleWeights, check_finite, check_index_maps, held_dtype


class StackedModuleWeights:
    """The rows of ``parts`` (one :class:`ModuleWeights` per part that targets the module, ids local
    to that part) as one module with ids ``id_offsets[j] + ids_j``, padded to ``rank``."""

    def __init__(
        self,
        parts: Sequence[ModuleWeights],
        id_offsets: Sequence[int],
        rank: int,
        labels: Sequence[str] | None = None,
    ):
        """``labels``: what error messages call each part (e.g. its file); default ``part j``."""
        self.parts = tuple(parts)
        self.id_offsets = tuple(int(o) for o in id_offsets)
        self.labels = tuple(labels) if labels is not None else tuple(f"part {j}" for j in range(len(self.parts)))
        if not self.parts or len(self.id_offsets) != len(self.parts) or len(self.labels) != len(self.parts):
            raise ValueError(
                f"StackedModuleWeights needs one id offset and label per part, got {len(self.parts)} parts, "
                f"{len(self.id_offsets)} offsets, {len(self.labels)} labels"
            )
        first = self.parts[0]
        for part, label in zip(self.parts, self.labels):
            if not isinstance(part, ModuleWeights):
                raise TypeError(f"{label}: parts must be ModuleWeights, got {type(part).__name__}")
            if (part.d_in, part.d_out) != (first.d_in, first.d_out):
                raise ValueError(
                    f"{label} is {part.d_in} -> {part.d_out}, {self.labels[0]} {first.d_in} -> {first.d_out}"
                )
            dtypes, want = ([getattr(w, f).dtype for f in FACTORS] for w in (part, first))
            if dtypes != want or part.device != first.device:
                raise ValueError(
                    f"{label} holds {dtypes} on {part.device}, {self.labels[0]} {want} on {first.device}: "
                    "parts must share dtypes and device"
                )
            if part.rank > rank:
                raise ValueError(f"{label} has rank {part.rank}, above the module's rank {rank}")
        self._rank = int(rank)
        self.adapter_ids = torch.cat([p.adapter_ids.to(torch.int64) + o for p, o in zip(self.parts, self.id_offsets)])
        if all(p.ranks is None and p.rank == rank for p in self.parts):
            self.ranks = None
        else:  # as wide as the widest part's (a narrowing cast could wrap a bad value into range)
            dtype = torch.int32
            for p in self.parts:
                dtype = torch.promote_types(dtype, p.ranks.dtype) if p.ranks is not None else dtype
            self.ranks = torch.cat(
                [
                    p.ranks.to(dtype) if p.ranks is not None else torch.full((p.num_adapters,), p.rank, dtype=dtype)
                    for p in self.parts
                ]
            )
        starts = [0]
        for p in self.parts:
            starts.append(starts[-1] + p.num_adapters)
        self._starts = starts

    def __repr__(self) -> str:
        return (
            f"StackedModuleWeights({self.num_adapters} adapters in {len(self.parts)} parts, r={self.rank}, "
            f"{self.d_in} -> {self.d_out}, {self.dtype})"
        )

    # -- the ModuleWeights interface ------------------------------------------------------------
    @property
    def num_adapters(self) -> int:
        return self._starts[-1]

    @property
    def d_in(self) -> int:
        return self.parts[0].d_in

    @property
    def d_out(self) -> int:
        return self.parts[0].d_out

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes :meth:`to` (``dtype``) allocates: the padded factors and the index maps."""
        n, r, first = self.num_adapters, self.rank, self.parts[0]
        shapes = {"a_star": r * self.d_in, "b_star": self.d_out * r, "prototypes": self.d_in}
        factors = sum(n * shapes[f] * held_dtype(getattr(first, f), dtype).itemsize for f in FACTORS)
        maps = [t for t in (self.adapter_ids, self.ranks) if t is not None]
        return factors + sum(t.numel() * t.itemsize for t in maps)

    def check_maps(self, num_names: int) -> None:
        if self.device.type == "meta":
            raise ValueError("tensors are on the meta device (they hold no values)")
        check_index_maps(self.adapter_ids, self.ranks, self.rank, num_names)

    def check_values(self, num_names: int) -> None:
        """As :meth:`ModuleWeights.check_values`, reading each part's factors in place."""
        self.check_maps(num_names)
        for part, label in zip(self.parts, self.labels):
            try:
                check_finite(**{f: getattr(part, f) for f in FACTORS})
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None

    def copy_rows(self, lo: int, hi: int, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """New tensors holding rows [lo, hi) of the padded factors on ``device``, cast to ``dtype``;
        each part's overlapping rows are copied into place (nothing is concatenated first)."""
        if not 0 <= lo <= hi <= self.num_adapters:
            raise IndexError(f"rows [{lo}, {hi}) of a module with {self.num_adapters} adapters")
        device = torch.device(device) if device is not None else self.device
        first, r, n = self.parts[0], self.rank, hi - lo
        shapes = {"a_star": (n, r, self.d_in), "b_star": (n, self.d_out, r), "prototypes": (n, self.d_in)}
        padded = any(p.rank < r for p in self.parts)  # else every element is copied below
        new = torch.zeros if padded else torch.empty
        out = {f: new(shapes[f], dtype=held_dtype(getattr(first, f), dtype), device=device) for f in FACTORS}
        for part, start in zip(self.parts, self._starts):
            a, b = max(lo, start), min(hi, start + part.num_adapters)
            if a >= b:
                continue
            src, dst, pr = slice(a - start, b - start), slice(a - lo, b - lo), part.rank
            out["a_star"][dst, :pr].copy_(part.a_star[src])
            out["b_star"][dst, :, :pr].copy_(part.b_star[src])
            out["prototypes"][dst].copy_(part.prototypes[src])
        return out

    def to(self, device=None, dtype: torch.dtype | None = None, *, copy: bool = False) -> ModuleWeights:
        """One :class:`ModuleWeights` of new tensors on ``device`` (factors cast to ``dtype``),
        whatever ``copy`` says: the parts' rows always land in new memory."""
        device = torch.device(device) if device is not None else self.device
        factors = self.copy_rows(0, self.num_adapters, device, dtype)
        ranks = None if self.ranks is None else self.ranks.to(device, copy=True)
        return ModuleWeights(**factors, adapter_ids=self.adapter_ids.to(device, copy=True), ranks=ranks)

    # -- direct reads (concatenate once) --------------------------------------------------------------
    @cached_property
    def _whole(self) -> ModuleWeights:
        return self.to()

    @property
    def a_star(self) -> torch.Tensor:
        return self._whole.a_star

    @property
    def b_star(self) -> torch.Tensor:
        return self._whole.b_star

    @property
    def prototypes(self) -> torch.Tensor:
        return self._whole.prototypes

"""General knowledge subtraction (GKS), as PEFT's Arrow does it (``ArrowConfig(use_gks=True)``).

PEFT's ``create_arrow_model(..., general_adapter_paths=...)`` averages the general adapters'
factors per module and subtracts the average from every task adapter's factors, before their
prototypes are computed and before they are applied:

    A_i <- A_i - mean_g A_g,    B_i <- B_i - mean_g B_g     (raw lora_A / lora_B; s_i is kept)

so the update a library holds for adapter i is s_i (B_i - B̄)(A_i - Ā) — factor-wise, as PEFT
does, which is not s_i B_i A_i minus the mean general update. A library built with general
adapters aligns that update and keeps the means (:class:`GeneralKnowledge`, float32 computed in
float64): ``add`` subtracts the same means from the adapters it adds, so a grown library equals
one built from scratch, and the file records which general adapters were averaged.

Element-wise means need equal shapes: every general adapter targets the same modules with the
same rank, and a task adapter's module must be one of them, with that rank (PEFT asks the same).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .peft_reader import AdapterError, PeftAdapter
from .sources import adapter_folders, default_adapter_name

MEAN_DTYPE = torch.float32
FIELDS = ("lora_A", "lora_B")  # the file's tensors general::<module>::<field>
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (lora_A [r, d_in], lora_B [d_out, r])


def tensor_name(module: str, field: str) -> str:
    return f"general::{module}::{field}"


@dataclass(frozen=True)
class GeneralKnowledge:
    """The general adapters' mean factors: ``means[module] = (mean lora_A [r, d_in], mean lora_B
    [d_out, r])`` in float32, and ``names``, the general adapters they average (in order)."""

    names: list[str]
    means: Factors

    def __post_init__(self) -> None:
        if not self.names or not all(isinstance(n, str) for n in self.names):
            raise ValueError(f"GeneralKnowledge.names must be a non-empty list of strings, got {self.names!r:.80}")
        if not self.means:
            raise ValueError("GeneralKnowledge.means is empty: the general adapters target no module")
        for module, (a, b) in self.means.items():
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                raise ValueError(f"general knowledge, module {module!r}: the means must be tensors")
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.dtype != MEAN_DTYPE or b.dtype != a.dtype:
                raise ValueError(
                    f"general knowledge, module {module!r}: means of shapes {tuple(a.shape)} (lora_A) and "
                    f"{tuple(b.shape)} (lora_B), dtypes {a.dtype}/{b.dtype}; expected [r, d_in] and [d_out, r] "
                    f"in {MEAN_DTYPE}"
                )
            if not (bool(a.isfinite().all()) and bool(b.isfinite().all())):
                raise ValueError(f"general knowledge, module {module!r}: the mean factors hold NaN or inf")

    @classmethod
    def from_peft(cls, sources: str | os.PathLike | Iterable[str | os.PathLike]) -> GeneralKnowledge:
        """Average the general adapters (PEFT folders or Hub paths, as for ``Library.from_peft``).
        Reads one adapter at a time. Raises :class:`AdapterError` naming the adapter, module and
        ranks when the adapters do not share their modules and ranks."""
        sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        if not sources:
            raise ValueError("general_adapters is empty: give at least one general adapter, or None for no GKS")
        folders = adapter_folders(sources)
        sums: Factors = {}
        first = None
        for folder in folders:
            adapter = PeftAdapter.open(folder)
            shapes = {m: (f.rank, f.d_in, f.d_out) for m, f in adapter.modules.items()}
            if first is None:
                first = (adapter, shapes)
            elif shapes != first[1]:
                other = f"general adapter {str(first[0].path)!r}"
                raise AdapterError(f"general adapter {str(adapter.path)!r}: {_mismatch(shapes, first[1], other)}")
            for module, (a, b) in adapter.load_factors().items():
                a, b = a.double(), b.double()
                if module in sums:
                    sums[module][0].add_(a)
                    sums[module][1].add_(b)
                else:
                    sums[module] = (a.clone(), b.clone())
        n = len(folders)
        means = {m: ((a / n).to(MEAN_DTYPE), (b / n).to(MEAN_DTYPE)) for m, (a, b) in sorted(sums.items())}
        return cls([default_adapter_name(s, f) for s, f in zip(sources, folders)], means)

    # -- task adapters ---------------------------------------------------------------------------
    def check(self, adapter: PeftAdapter) -> None:
        """Raise :class:`AdapterError` unless every module of ``adapter`` has general means of its rank and shape."""
        for module, f in adapter.modules.items():
            mean = self.means.get(module)
            if mean is None:
                raise adapter.error(
                    f"targets module {module!r}, which the general adapters ({self.label}) do not: GKS subtracts "
                    "their mean from every module an adapter targets"
                )
            (rank, d_in), (d_out, _) = mean[0].shape, mean[1].shape
            if (f.rank, f.d_in, f.d_out) != (rank, d_in, d_out):
                raise adapter.error(
                    f"module {module!r} has rank {f.rank}, d_in x d_out = {f.d_in} x {f.d_out}; the general "
                    f"adapters' have rank {rank}, {d_in} x {d_out}: GKS subtracts their mean factors element-wise, "
                    "so the ranks must match (PEFT's Arrow asks the same)"
                )

    def subtract(self, factors: Factors) -> Factors:
        """module -> (A - Ā, B - B̄) in float64, for factors that passed :meth:`check`."""
        return {
            m: (a.double() - self.means[m][0].double(), b.double() - self.means[m][1].double())
            for m, (a, b) in factors.items()
        }

    # -- the file ----------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        shown = ", ".join(repr(n) for n in self.names[:3])
        return shown + (f", ... ({len(self.names)} in all)" if len(self.names) > 3 else "")

    def header(self) -> dict:
        """The library metadata's ``general`` object."""
        return {"names": list(self.names), "modules": list(self.means)}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {tensor_name(m, f): t for m, pair in self.means.items() for f, t in zip(FIELDS, pair)}

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self.tensors().items()}


def _mismatch(shapes: dict, first: dict, other: str) -> str:
    only_here, only_there = sorted(set(shapes) - set(first)), sorted(set(first) - set(shapes))
    if only_here or only_there:
        return (
            f"targets other modules than {other} (only here: {only_here[:3]}, only there: {only_there[:3]}); the "
            "general adapters are averaged element-wise, so they must target the same modules"
        )
    module = next(m for m in shapes if shapes[m] != first[m])
    return (
        f"module {module!r} has rank, d_in, d_out = {shapes[module]} but {other} has {first[module]}; the general "
        "adapters are averaged element-wise, so they must share ranks and shapes"
    )

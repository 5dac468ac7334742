"""The three ops as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` takes a
patched model whole (docs/design.md §2).

    torch.ops.lag_triton.arrow_topk(x, prototypes, k, allowed, scope, backend)     -> (idx, scores)
    torch.ops.lag_triton.spectr_rerank(x, a_star, candidates, top_m, combine,
                                       temperature, candidate_scores, backend)     -> (sel, w, z)
    torch.ops.lag_triton.lora_apply(y!, b_star, sel, w, z, backend)                -> ()   (y mutated)

Each op runs the named backend's implementation; its fake (meta) implementation gives the
output shapes from the same allocation helpers the backends use, so the compiler never traces
into a Triton launcher or the CUDA binding. The ops only sync or branch on shapes, never on
values, so compiled graphs stay capturable in CUDA graphs.
"""

# No ``from __future__ import annotations`` and ``Optional`` instead of ``X | None``: torch < 2.5
# infers the ops' schemas from evaluated annotations and knows typing.Optional only.
import functools
import importlib
from typing import Optional

import torch

from .common import check_apply_args, check_rerank_args, check_topk_args, empty_rerank_outputs, empty_topk_outputs

_MODULES = {"torch": ".reference", "triton": ".triton", "cuda": ".cuda"}


@functools.cache
def backend_module(name: str):
    """The module implementing backend ``name`` (imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {tuple(_MODULES)}")
    return importlib.import_module(_MODULES[name], __package__)


@torch.library.custom_op("lag_triton::arrow_topk", mutates_args=())
def arrow_topk(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    allowed: Optional[torch.Tensor],  # noqa: UP045
    scope: Optional[torch.Tensor],  # noqa: UP045
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return backend_module(backend).arrow_topk(x, prototypes, k, allowed, scope)


@arrow_topk.register_fake
def _(x, prototypes, k, allowed, scope, backend):
    check_topk_args(x, prototypes, k, allowed, scope)
    return empty_topk_outputs(x, k)


@torch.library.custom_op("lag_triton::spectr_rerank", mutates_args=())
def spectr_rerank(
    x: torch.Tensor,
    a_star: torch.Tensor,
    candidates: torch.Tensor,
    top_m: int,
    combine: str,
    temperature: float,
    candidate_scores: Optional[torch.Tensor],  # noqa: UP045
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backend_module(backend).spectr_rerank(x, a_star, candidates, top_m, combine, temperature, candidate_scores)


@spectr_rerank.register_fake
def _(x, a_star, candidates, top_m, combine, temperature, candidate_scores, backend):
    check_rerank_args(x, a_star, candidates, top_m, combine, temperature, candidate_scores)
    return empty_rerank_outputs(x, top_m, a_star.shape[1])


@torch.library.custom_op("lag_triton::lora_apply", mutates_args=("y",))
def lora_apply(
    y: torch.Tensor, b_star: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, z: torch.Tensor, backend: str
) -> None:
    backend_module(backend).lora_apply(y, b_star, sel, w, z)


@lora_apply.register_fake
def _(y, b_star, sel, w, z, backend):
    check_apply_args(y, b_star, sel, w, z)

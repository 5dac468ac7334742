"""Per-layer LAG routing: compose the three ops for one module and one library (docs/design.md §1).

"lag":    Arrow top-k over all N prototypes, SpectR rerank of those k, apply the top_m.
"arrow":  Arrow top-top_m, weights softmax(a / temperature); z = A* x is what is applied.
"spectr": SpectR rerank over all N adapters.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .kernels import Backend
from .kernels.common import COMBINE_MODES, check_temperature, constant_weights, scoped_rows, selection_weights

ROUTERS = ("lag", "arrow", "spectr")


def _as_int(value):
    """Python ints and integer scalars of numpy/torch as an int; anything else as it is (refused below)."""
    if (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.is_floating_point()
        and not value.is_complex()
    ):
        return value if value.dtype == torch.bool else int(value.item())
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _as_float(value):
    """Real numbers and real scalars of numpy/torch as a float; anything else as it is (refused below)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        return float(value.item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class RoutingConfig:
    """How one library routes. ``k`` and ``top_m`` are clamped per module to the N adapters it has.
    Integer and real scalars (numpy's, 0-d tensors) are taken as Python ints and floats."""

    k: int = 20
    top_m: int = 1
    router: str = "lag"
    temperature: float = 1.0
    combine: str = "softmax"

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", _as_int(self.k))  # frozen: set once, here
        object.__setattr__(self, "top_m", _as_int(self.top_m))
        object.__setattr__(self, "temperature", _as_float(self.temperature))
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine {self.combine!r}; choose one of {COMBINE_MODES}")
        for name in ("k", "top_m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.router == "lag" and self.top_m > self.k:
            raise ValueError(f"top_m={self.top_m} > k={self.k}: SpectR cannot pick more than the k Arrow candidates")
        check_temperature(self.temperature)

    def sizes(self, n_adapters: int) -> tuple[int, int]:
        """(candidates k, selected m) for a module with ``n_adapters`` adapters."""
        k = {"lag": self.k, "arrow": self.top_m, "spectr": n_adapters}[self.router]
        k = min(k, n_adapters)
        return k, min(self.top_m, k)


def route(
    x: torch.Tensor,
    a_star: torch.Tensor,
    prototypes: torch.Tensor,
    config: RoutingConfig,
    ops: Backend,
    allowed: torch.Tensor | None = None,
    scope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose adapters for every row of x [T, d_in]: returns (sel [T, m] int32, w [T, m], z [T, m, r]).

    With a scope, token t may only be routed to adapters i with ``allowed[scope[t], i]`` (allowed
    [S, N] bool, scope [T] int32): Arrow never retrieves the others, and picks that find no allowed
    adapter are sel -1 with weight 0 (no adapter output: an empty scope is the base model).
    """
    n = a_star.shape[0]
    k, m = config.sizes(n)
    scores = None
    if config.router == "spectr":
        candidates = torch.arange(n, device=x.device, dtype=torch.int32).expand(x.shape[0], n)
        if allowed is not None:
            candidates = torch.where(scoped_rows(allowed, scope), candidates, -1)
        candidates = candidates.contiguous()
    else:
        candidates, scores = ops.arrow_topk(x, prototypes, k, allowed, scope)
        if config.router == "lag":
            scores = None  # LAG reranks the Arrow candidates by SpectR norm, not by a_i
    return ops.spectr_rerank(x, a_star, candidates, m, config.combine, config.temperature, scores)


def route_and_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    a_star: torch.Tensor,
    b_star: torch.Tensor,
    prototypes: torch.Tensor,
    config: RoutingConfig,
    ops: Backend,
    allowed: torch.Tensor | None = None,
    scope: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T, d_out] += the routed adapters' output for x [T, d_in], in place. Returns sel [T, m]
    (-1 where a scope left no adapter)."""
    sel, w, z = route(x, a_star, prototypes, config, ops, allowed, scope)
    ops.lora_apply(y, b_star, sel, w, z)
    return sel


def _picked_factors(x, sel, a_star, prototypes, config):
    """(ids [T, m], picked [T, m], z [T, m, r], key [T, m], the Arrow dot products or None), fp32."""
    picked = sel >= 0  # -1: no adapter (a scope)
    ids = sel.long().clamp(min=0)
    xf = x.float()
    z = torch.einsum("tmrd,td->tmr", a_star[ids].float(), xf)
    dots = torch.einsum("tmd,td->tm", prototypes[ids].float(), xf) if config.router == "arrow" else None
    key = dots.abs() if dots is not None else z.norm(dim=-1)
    return ids, picked, z, key, dots


def routed_term(
    x: torch.Tensor,
    sel: torch.Tensor,
    a_star: torch.Tensor,
    b_star: torch.Tensor,
    prototypes: torch.Tensor,
    config: RoutingConfig,
) -> torch.Tensor:
    """The routed adapters' output [T, d_out] (fp32) for x [T, d_in] with the picks ``sel`` [T, m]
    held fixed, in torch ops: z = A* x, the picks' keys (norms of z; |p . x| for "arrow"), their
    weights, and the sum of w B* z (docs/design.md §1). Differentiable; ``routed_term_vjp`` is its
    gradient in x, which the kernel backends' backward uses."""
    ids, picked, z, key, _ = _picked_factors(x, sel, a_star, prototypes, config)
    w = selection_weights(key, config.combine, config.temperature, picked)
    return torch.einsum("tm,tmor,tmr->to", w, b_star[ids].float(), z)


#: gathered fp32 factors per chunk of tokens in ``routed_term_vjp`` (eager): a long prefill's backward
#: through a wide layer stays at this size instead of T * m * r * (d_in + d_out) * 4 bytes.
VJP_CHUNK_BYTES = 256 << 20


def routed_term_vjp(
    x: torch.Tensor,
    sel: torch.Tensor,
    a_star: torch.Tensor,
    b_star: torch.Tensor,
    prototypes: torch.Tensor,
    config: RoutingConfig,
    grad: torch.Tensor,
) -> torch.Tensor:
    """grad [T, d_out] -> its pullback [T, d_in] (fp32) through ``routed_term`` in x, written out
    (no autograd inside, so a compiled backward traces it): with u_j = B*_j^T g and s_j = u_j . z_j,

        dz_j = w_j u_j + dkey_j z_j / |z_j|      ("lag", "spectr": key = |z|)
        dx   = sum_j A*_j^T dz_j  (+ sum_j dkey_j sign(p_j . x) p_j for "arrow": key = |p . x|)
        dkey_j = w_j (s_j - sum_i w_i s_i) / temperature   (softmax weights; 0 when they are constant)

    Rows are independent: eagerly they go in chunks whose gathered factors stay within
    ``VJP_CHUNK_BYTES`` (a compiled backward takes them whole, its shapes unspecialised)."""
    t, m = sel.shape
    per_row = m * (a_star.shape[1] * (a_star.shape[2] + b_star.shape[1]) + prototypes.shape[1]) * 4
    rows = max(1, VJP_CHUNK_BYTES // per_row)
    if t <= rows or torch.compiler.is_compiling():
        return _routed_term_vjp_rows(x, sel, a_star, b_star, prototypes, config, grad)
    chunks = zip(x.split(rows), sel.split(rows), grad.split(rows))
    return torch.cat([_routed_term_vjp_rows(xc, sc, a_star, b_star, prototypes, config, gc) for xc, sc, gc in chunks])


def _routed_term_vjp_rows(x, sel, a_star, b_star, prototypes, config, grad):
    ids, picked, z, key, dots = _picked_factors(x, sel, a_star, prototypes, config)
    w = selection_weights(key, config.combine, config.temperature, picked)
    u = torch.einsum("to,tmor->tmr", grad.float(), b_star[ids].float())
    dz = w[..., None] * u
    softmax = not constant_weights(sel.shape[1], config.combine)
    if softmax:
        s = (u * z).sum(-1)
        dkey = w * (s - (w * s).sum(-1, keepdim=True)) / config.temperature
        if dots is None:  # key = |z|
            dz = dz + (dkey / key.clamp_min(torch.finfo(torch.float32).tiny))[..., None] * z
    dx = torch.einsum("tmr,tmrd->td", dz, a_star[ids].float())
    if softmax and dots is not None:  # key = |p . x|
        dx = dx + torch.einsum("tm,tmd->td", dkey * dots.sign(), prototypes[ids].float())
    return dx

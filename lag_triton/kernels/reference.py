"""PyTorch reference backend: the executable definition of the three LAG ops (docs/design.md §1-§2).

Every other backend (Triton, CUDA) exposes the same three functions with the same signatures
and is tested against these. They stay simple and obviously right rather than fast; scores,
norms and z are computed in fp32 whatever the activation dtype.

Shapes (T tokens, N adapters of one module, r = r_max, k candidates, m selected):

    arrow_topk(x [T, d_in], prototypes [N, d_in], k)                   -> idx [T, k] int32, scores [T, k] fp32
    spectr_rerank(x, a_star [N, r, d_in], candidates [T, k] int32,
                  top_m, combine, temperature, candidate_scores=None)
                                                      -> sel [T, m] int32, w [T, m] fp32, z [T, m, r] fp32
    lora_apply(y [T, d_out], b_star [N, d_out, r], sel, w, z)
                                                      -> y (updated in place: y += sum_j w_j B*_sel_j z_j)

An optional scope restricts Arrow retrieval per token (``allowed`` [S, N] bool, ``scope`` [T]
int32); a token left with fewer than k allowed adapters gets -1 candidates, which the rerank
never selects and the apply skips (sel -1 contributes nothing).

Ordering rules shared by all backends: larger key first; equal keys -> lower adapter index
first; NaN keys rank below every number (so indices stay in range whatever the input).
"""

from __future__ import annotations

import torch

from .common import check_apply_args, check_rerank_args, check_topk_args, scoped_rows, selection_weights

__all__ = ["arrow_topk", "spectr_rerank", "lora_apply"]


def _rank_key(values: torch.Tensor) -> torch.Tensor:
    """Sort key for 'largest first, NaN last': NaN becomes -inf (scores and norms are >= 0)."""
    return torch.nan_to_num(values, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _descending_by_key_then_index(
    key: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Positions that sort each row by key descending, ties broken by ascending adapter index;
    entries that are not ``valid`` (outside a scope, no candidate) go after every valid one."""
    by_index = torch.sort(index, dim=-1, stable=True).indices
    key_in_index_order = key.gather(-1, by_index)
    by_key = by_index.gather(-1, torch.sort(key_in_index_order, dim=-1, descending=True, stable=True).indices)
    if valid is None:
        return by_key
    return by_key.gather(
        -1, torch.sort(valid.gather(-1, by_key).to(torch.uint8), dim=-1, descending=True, stable=True).indices
    )


def arrow_topk(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    allowed: torch.Tensor | None = None,
    scope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow retrieval: a_i = |p_i . x|; the k adapters with the largest a_i, best first.

    Returns (idx [T, k] int32, scores [T, k] fp32); the scores are the a_i of idx (NaN kept).
    With a scope, token t may only retrieve adapters i with ``allowed[scope[t], i]`` (allowed
    [S, N] bool, scope [T] int32); slots beyond a token's allowed adapters hold idx -1, score NaN.
    A scope row out of [0, S) allows nothing (checking the range would cost a host sync).
    """
    check_topk_args(x, prototypes, k, allowed, scope)
    valid = None if allowed is None else scoped_rows(allowed, scope)
    return topk_of_scores((x.float() @ prototypes.float().T).abs(), k, valid)


def topk_of_scores(
    scores: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of each row of fp32 scores [T, N] in the ranking order above, among the
    ``valid`` entries if given ([T, N] bool): (idx int32, values), -1 / NaN past the valid ones."""
    adapter = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    order = _descending_by_key_then_index(_rank_key(scores), adapter, valid)[:, :k]
    idx, values = order.to(torch.int32), scores.gather(1, order)
    if valid is not None:
        ok = valid.gather(1, order)
        idx = torch.where(ok, idx, -1)
        values = torch.where(ok, values, float("nan"))
    return idx, values


def spectr_rerank(
    x: torch.Tensor,
    a_star: torch.Tensor,
    candidates: torch.Tensor,
    top_m: int,
    combine: str = "softmax",
    temperature: float = 1.0,
    candidate_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpectR rerank of each token's k candidates.

    z_c = A*_c x (fp32, [r]), n_c = ||z_c||. The top_m candidates by n_c (or by
    ``candidate_scores`` when given: the "arrow" router ranks and weights by a_i) are selected;
    weights follow docs/design.md §1 (1 for a single pick, else softmax(key / temperature) or 1/top_m).
    A candidate -1 is no candidate (a scope left fewer than k): never selected; picks beyond the
    valid candidates are sel -1, w 0, z 0, and the weights spread over the valid picks only.
    A token's candidates are distinct adapters (as arrow_topk and the routers give them): a repeated
    one is outside the contract, and backends may pick it once or twice.
    """
    check_rerank_args(x, a_star, candidates, top_m, combine, temperature, candidate_scores)
    cand = candidates.long()
    valid = cand >= 0
    safe = cand.clamp(min=0)
    xf = x.float()
    # One candidate slot at a time keeps the gathered weights at [T, r, d_in], never [T, k, r, d_in].
    z = torch.stack(
        [torch.bmm(a_star[safe[:, j]].float(), xf.unsqueeze(-1)).squeeze(-1) for j in range(cand.shape[1])],
        dim=1,
    )  # [T, k, r]
    z = torch.where(valid[..., None], z, 0.0)
    key = z.norm(dim=-1) if candidate_scores is None else candidate_scores.float()
    pos = _descending_by_key_then_index(_rank_key(key), cand, valid)[:, :top_m]  # [T, m]
    picked = valid.gather(1, pos)
    sel = torch.where(picked, cand.gather(1, pos), -1)
    z_sel = z.gather(1, pos.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
    w = selection_weights(key.gather(1, pos), combine, temperature, picked)
    return sel.to(torch.int32), w, z_sel.contiguous()


def lora_apply(
    y: torch.Tensor, b_star: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """y += sum_j w[:, j] * (B*[sel[:, j]] @ z[:, j]), summed in fp32, written in y's dtype, in place."""
    check_apply_args(y, b_star, sel, w, z)
    delta = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    for j in range(sel.shape[1]):
        picked = sel[:, j] >= 0  # -1: no adapter for this pick (a scope)
        b = b_star[sel[:, j].long().clamp(min=0)].float()  # [T, d_out, r]
        term = w[:, j, None] * torch.bmm(b, z[:, j, :, None]).squeeze(-1)
        delta += torch.where(picked[:, None], term, 0.0)
    y.copy_(y.float() + delta)
    return y

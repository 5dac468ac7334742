"""The PyTorch reference router against a naive per-token loop of the docs/design.md §1 equations."""

from __future__ import annotations

import math

import pytest
import torch

from lag_triton.kernels import reference
from lag_triton.routing import RoutingConfig, route_and_apply


def random_library(n: int, d_in: int, d_out: int, ranks: list[int], seed: int = 0):
    """Aligned-looking random factors with mixed ranks (rows/columns beyond an adapter's rank are 0)."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    a_star = torch.zeros(n, r_max, d_in)
    b_star = torch.zeros(n, d_out, r_max)
    for i in range(n):
        r = ranks[i % len(ranks)]
        q, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g))
        a_star[i, :r] = q.T
        b_star[i, :, :r] = torch.randn(d_out, r, generator=g)
    return a_star, b_star, a_star[:, 0].contiguous()


def naive_layer(x, a_star, b_star, prototypes, cfg: RoutingConfig, allowed_rows=None):
    """One token at a time, one adapter at a time, in float64, straight from docs/design.md §1.

    ``allowed_rows[t]``: the adapters token t may use (a scope); picks it cannot fill are -1."""
    x, a_star, b_star, prototypes = (t.double() for t in (x, a_star, b_star, prototypes))
    n = a_star.shape[0]
    out, picks = [], []
    for t in range(x.shape[0]):
        xt = x[t]
        pool = range(n) if allowed_rows is None else sorted(allowed_rows[t])
        arrow = {i: abs(float(prototypes[i] @ xt)) for i in pool}
        by_arrow = sorted(pool, key=lambda i: (-arrow[i], i))
        if cfg.router == "arrow":
            chosen = by_arrow[: cfg.top_m]
            keys = [arrow[i] for i in chosen]
        else:
            cands = by_arrow[: min(cfg.k, n)] if cfg.router == "lag" else list(pool)
            norms = {c: float((a_star[c] @ xt).norm()) for c in cands}
            chosen = sorted(cands, key=lambda c: (-norms[c], c))[: cfg.top_m]
            keys = [norms[c] for c in chosen]
        if not chosen:
            weights = []
        elif len(chosen) == 1 or cfg.combine == "uniform":
            weights = [1.0 / len(chosen)] * len(chosen)
        else:
            ex = [math.exp((kv - max(keys)) / cfg.temperature) for kv in keys]
            weights = [e / sum(ex) for e in ex]
        y = torch.zeros(b_star.shape[1], dtype=torch.float64)
        for w, c in zip(weights, chosen):
            y += w * (b_star[c] @ (a_star[c] @ xt))
        out.append(y)
        picks.append(chosen + [-1] * (min(cfg.top_m, cfg.sizes(n)[0]) - len(chosen)))
    return torch.stack(out), picks


ROUTER_CASES = [  # N = 13 below: k = N and k > N included; top_m > k is refused for "lag" (test_patch)
    (router, top_m, k)
    for router in ("lag", "arrow", "spectr")
    for top_m in (1, 3)
    for k in (1, 5, 13, 40)
    if not (router == "lag" and top_m > k)
]


@pytest.mark.parametrize("router,top_m,k", ROUTER_CASES)
@pytest.mark.parametrize("combine", ["softmax", "uniform"])
def test_reference_router_matches_naive_loop(router, top_m, k, combine):
    n, d_in, d_out, t = 13, 24, 20, 9
    a_star, b_star, protos = random_library(n, d_in, d_out, ranks=[1, 4, 6, 3], seed=k * 7 + top_m)
    x = torch.randn(t, d_in, generator=torch.Generator().manual_seed(k + top_m))
    cfg = RoutingConfig(k=k, top_m=top_m, router=router, combine=combine, temperature=0.7)
    y = torch.zeros(t, d_out)
    sel = route_and_apply(x, y, a_star, b_star, protos, cfg, reference)
    want_y, want_picks = naive_layer(x, a_star, b_star, protos, cfg)
    assert sel.tolist() == want_picks
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)


def test_lag_with_all_candidates_equals_spectr_and_k1_equals_arrow():
    a_star, b_star, protos = random_library(21, 32, 16, ranks=[2, 6], seed=3)
    x = torch.randn(17, 32)

    def sel(**kw):
        return route_and_apply(x, torch.zeros(17, 16), a_star, b_star, protos, RoutingConfig(**kw), reference)

    assert torch.equal(sel(router="lag", k=21), sel(router="spectr"))
    assert torch.equal(sel(router="lag", k=1), sel(router="arrow"))


def test_ties_pick_the_lower_adapter_index():
    d = 8
    protos = torch.zeros(6, d)
    protos[[1, 4]] = torch.ones(d)  # adapters 1 and 4 tie for the best score
    protos[[0, 2]] = 0.5  # and 0, 2 tie below them
    idx, scores = reference.arrow_topk(torch.ones(3, d), protos, 4)
    assert idx.tolist() == [[1, 4, 0, 2]] * 3
    # rerank ties: identical A* rows, candidates given in descending index order
    a_star = torch.eye(d)[:2].expand(6, 2, d).contiguous()
    sel, w, _ = reference.spectr_rerank(
        torch.ones(2, d), a_star, torch.tensor([[5, 3, 2], [4, 0, 1]], dtype=torch.int32), 2
    )
    assert sel.tolist() == [[2, 3], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))


def test_nan_scores_rank_last_and_indices_stay_in_range():
    protos = torch.randn(7, 5)
    x = torch.randn(4, 5)
    x[1] = float("nan")  # every score of token 1 is NaN
    protos[3] = float("nan")  # adapter 3 scores NaN for every token
    idx, scores = reference.arrow_topk(x, protos, 7)
    assert ((idx >= 0) & (idx < 7)).all()
    assert idx[1].tolist() == list(range(7))  # all NaN: ties by index
    for t in (0, 2, 3):
        assert idx[t, -1] == 3 and torch.isnan(scores[t, -1]) and not torch.isnan(scores[t, :-1]).any()
    a_star = torch.randn(7, 3, 5)
    a_star[2] = float("inf")
    sel, w, z = reference.spectr_rerank(x, a_star, idx, 2)
    assert ((sel >= 0) & (sel < 7)).all()


def test_apply_writes_in_activation_dtype_with_fp32_accumulation():
    b_star = torch.randn(5, 33, 6).half()
    z = torch.randn(4, 2, 6)
    sel = torch.tensor([[0, 4], [1, 1], [3, 2], [4, 0]], dtype=torch.int32)
    w = torch.rand(4, 2)
    y = torch.randn(4, 33).half()
    want = y.double() + torch.einsum("tm,tmor,tmr->to", w.double(), b_star[sel.long()].double(), z.double())
    reference.lora_apply(y, b_star, sel, w, z)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("router,top_m,k", [(r, m, k) for r, m, k in ROUTER_CASES if k in (5, 13)])
@pytest.mark.parametrize("combine", ["softmax", "uniform"])
def test_scoped_reference_router_matches_naive_loop(router, top_m, k, combine):
    """A scope: each token routed among its row's allowed adapters only (rows with none, with
    fewer than k or top_m, and with all of them), picks it cannot fill are -1 and add nothing."""
    n, d_in, d_out, t = 13, 24, 20, 10
    a_star, b_star, protos = random_library(n, d_in, d_out, ranks=[1, 4, 6, 3], seed=k + top_m)
    x = torch.randn(t, d_in, generator=torch.Generator().manual_seed(k * top_m))
    allowed = torch.zeros(4, n, dtype=torch.bool)
    allowed[1, [3]] = True
    allowed[2, [0, 5, 7, 8, 11, 12]] = True
    allowed[3] = True
    scope = torch.tensor([0, 1, 2, 3, 2, 1, 3, 0, 2, 2], dtype=torch.int32)
    cfg = RoutingConfig(k=k, top_m=top_m, router=router, combine=combine, temperature=0.7)
    y = torch.zeros(t, d_out)
    sel = route_and_apply(x, y, a_star, b_star, protos, cfg, reference, allowed, scope)
    rows = [set(allowed[s].nonzero().flatten().tolist()) for s in scope.tolist()]
    want_y, want_picks = naive_layer(x, a_star, b_star, protos, cfg, rows)
    assert sel.tolist() == want_picks
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)

"""Backend-generic kernel tests: every compiled backend against lag_triton.kernels.reference.

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU tensors when there is no GPU (see
conftest.py); the "cuda" backend is skipped, with the reason, wherever it cannot run.
Tolerances come from the dtype: the expected error of an fp32 reduction over d terms,
measured against an fp64 evaluation of the same (low-precision) inputs.
"""

from __future__ import annotations

import pytest
import torch
from kernel_data import (
    DEVICE,
    EPS32,
    assert_same_ranking,
    backend_ops,
    gen,
    int_tensor,
    poison_allocator,
    randn,
    red_tol,
    scope_masks,
    tickets_all_zero,
    triton_module,
)

from lag_triton.kernels import common, get_ops, reference
from lag_triton.routing import RoutingConfig, route_and_apply

from factories import needs_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["triton", "cuda"])
def ops(request, monkeypatch):
    return backend_ops(request.param, monkeypatch)


def _candidates(t: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = gen(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(t)]).to(torch.int32).to(DEVICE)


def _mixed_rank(lib: torch.Tensor, rank_dim: int, seed: int) -> torch.Tensor:
    """Zero the rows/cols beyond each adapter's own rank (a mixed-rank library padded to r_max)."""
    n, r = lib.shape[0], lib.shape[rank_dim]
    ranks = torch.randint(1, r + 1, (n,), generator=gen(seed)).to(lib.device)
    keep = torch.arange(r, device=lib.device)[None, :] < ranks[:, None]  # [N, r]
    keep = keep[:, :, None] if rank_dim == 1 else keep[:, None, :]
    return lib * keep.to(lib.dtype)


# ----------------------------------------------------------------------------- arrow_topk

ARROW_CASES = [  # T, N, d_in, k
    (1, 1001, 2049, 20),
    (7, 64, 40, 1),
    (133, 96, 24, 96),  # k = N
    (3, 300, 33, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,d,k", ARROW_CASES)
def test_arrow_topk_matches_reference(ops, dtype, t, n, d, k):
    x, p = randn(t, d, dtype=dtype, seed=1), randn(n, d, dtype=dtype, seed=2)
    poison_allocator()
    idx, scores = ops.arrow_topk(x, p, k)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k)
    assert idx.dtype == torch.int32 and scores.dtype == torch.float32
    assert idx.shape == (t, k) and scores.shape == (t, k)
    true = (x.double() @ p.double().T).abs()
    tol = red_tol(x, p)
    assert_same_ranking(idx, ref_idx, true, tol)
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores.double(), true.gather(1, idx.long()), atol=tol, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=2 * tol, rtol=0)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "duplicate indices in a row"


def test_arrow_topk_exact_ties_lower_index_wins(ops):
    n, d = 40, 32
    p = randn(n, d, seed=3)
    p[17] = p[4]
    p[29] = -p[4]  # |p.x| ties under a sign flip too
    p[9] = p[4]
    x = p[4:5].clone() * 3
    idx, scores = ops.arrow_topk(x, p, 6)
    assert idx[0, :4].tolist() == [4, 9, 17, 29]
    assert torch.equal(idx, reference.arrow_topk(x, p, 6)[0])
    # all-equal scores: the lowest indices, in order
    idx0, _ = ops.arrow_topk(torch.zeros(2, d, device=DEVICE), p, 5)
    assert idx0.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_arrow_topk_nan_inf(ops):
    n, d, k = 50, 24, 20
    p = randn(n, d, seed=4)
    p[7] = float("nan")
    x = randn(4, d, seed=5)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")
    idx, scores = ops.arrow_topk(x, p, k)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k)
    assert ((idx >= 0) & (idx < n)).all()
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True)
    assert 7 not in idx[0].tolist()  # the NaN prototype ranks below every number


def _force_sms(ops, monkeypatch, sms: int) -> None:
    """Make the Triton launcher size its N-splits for `sms` SMs (the interpreter otherwise reports 4)."""
    mod = __import__("sys").modules.get(ops.module.__name__ + ".arrow_topk")
    if mod is not None and hasattr(mod, "num_sms"):
        monkeypatch.setattr(mod, "num_sms", lambda device: sms)


SPLIT_CASES = [  # T, N, k, sms: T <= 16 runs 1..16-row tiles; sms sets the number of N-splits
    (1, 2000, 20, 64),  # 16 splits of one tile each
    (1, 2000, 20, 2),  # 2 splits of 8 tiles: later tiles hit the early exit
    (1, 3000, 100, 64),  # 24 splits * 128 words: the 1-row merge reads several chunks
    (2, 2000, 20, 64),
    (3, 2000, 20, 3),  # ROWS = 4 with one padding row
    (5, 1100, 1, 64),  # k = 1 (K_PAD = 1, tl.max path)
    (8, 2000, 20, 64),
    (13, 2000, 2, 5),
    (16, 2000, 20, 64),  # 16-row merge tiles, several chunks
    (17, 2000, 20, 64),  # T > 16: full tiles again
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,n,k,sms", SPLIT_CASES)
def test_arrow_topk_small_t_splits_ties_nan(ops, monkeypatch, dtype, t, n, k, sms):
    """Decode-sized T with many N-splits or many tiles per split, exact ties across tiles and
    splits, NaN prototypes and tokens: identical to the reference (integer data, so no near-ties)."""
    _force_sms(ops, monkeypatch, sms)
    d = 48
    p = int_tensor(n, d, dtype=dtype, seed=60)
    # Scores shrink with the index (tile 0 dominates), so the running top-k settles early and most
    # later tiles are skipped; the duplicates below must still win or lose by index.
    weight = 1 + (n - 1 - torch.arange(n, device=DEVICE)) * 8 // n
    p = p * weight[:, None].to(dtype)
    p[n - 500] = p[7]
    p[n // 2] = -p[7]
    p[300] = p[2]
    p[3] = p[2]
    p[0, 0] = float("nan")
    p[129, 5] = float("nan")
    p[200, 9] = float("inf")  # score +inf for real tokens, 0 * inf = NaN in the dot's padding rows
    x = int_tensor(t, d, dtype=dtype, seed=61)
    x[:, 9] = 1
    if t >= 3:
        x[1] = 0  # all scores tie at 0 (NaN prototypes below them)
        x[2, 7] = float("nan")  # all scores NaN: indices 0..k-1
    poison_allocator()
    idx, scores = ops.arrow_topk(x, p, k)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, atol=0, rtol=0)


def _triton_select_module(ops):
    mod = __import__("sys").modules.get(ops.module.__name__ + ".arrow_topk")
    if mod is None or not hasattr(mod, "select_config"):
        pytest.skip("filtered k-select internals are the Triton backend's")
    return mod


def _planted_scores(t, n, winners, seed):
    """Integer prototypes whose scores against x = e_0 are small noise except for `winners`
    (descending, with exact ties), so the expected top-k is known exactly."""
    p = int_tensor(n, 8, lo=-2, hi=3, seed=seed)
    p[:, 0] = torch.randint(-5, 6, (n,), generator=gen(seed + 1)).float().to(DEVICE)
    for rank, i in enumerate(winners):
        p[i, 0] = 1000 - 10 * (rank // 2)  # pairs of equal scores: the lower index must come first
    x = torch.zeros(t, 8, device=DEVICE)
    x[:, 0] = 1
    return x, p


def test_split_merge_tiles_stay_small_as_k_grows(monkeypatch):
    """The split-N merge's [rows, K_PAD + BLOCK_C] int64 tile, as compiled for a GPU, stays at most
    4K words for every k the select takes: 16 rows at K_PAD = 1024 (32K words) needed 256 KB of
    shared memory on sm_90, over the 227 KB a block may have, so its launch failed (the interpreter
    has no such limit; _aot_check now compiles K_PAD 512 and 1024 and checks the limit)."""
    import importlib

    mod = importlib.import_module("lag_triton.kernels.triton.arrow_topk")
    monkeypatch.setattr(importlib.import_module("lag_triton.kernels.triton._common"), "interpreting", lambda: False)
    for k_pad in (1 << e for e in range(11)):
        for t in (1, 2, 9, 16, 33, 263):
            rows = mod.merge_rows(t, k_pad)
            for splits in (2, 17, 64):
                assert rows * (k_pad + mod.merge_block_c(rows, splits * k_pad, k_pad)) <= 4096, (k_pad, t, splits)


@pytest.mark.parametrize("order", ["ascending", "descending", "equal", "ulps", "planted"])
@pytest.mark.parametrize("t,n,k,sms", [(1, 1001, 20, 4), (3, 700, 5, 64), (9, 257, 16, 1), (2, 2049, 1, 16)])
def test_arrow_select_buffer_flushes_and_splits(ops, monkeypatch, order, t, n, k, sms):
    """The filtered select against the reference on orders that stress it: ascending scores (every
    value survives the threshold, the buffer fills and flushes on every few blocks), descending
    (nothing survives after the first block), all equal (ties by index only), and winners planted
    at split boundaries and in the last, partial split."""
    mod = _triton_select_module(ops)
    monkeypatch.setattr(mod, "num_sms", lambda device: sms)
    block = mod.select_config(1 << max(0, (k - 1).bit_length()))["BLOCK"]
    if order == "planted":
        splits, per_split = mod.split_plan(t, n, block, sms)
        edges = [s * per_split for s in range(1, splits)] + [n - 1, n - 2, 0]
        winners = sorted({min(n - 1, max(0, e + d)) for e in edges for d in (-1, 0)}, reverse=True)[: k + 3]
        x, p = _planted_scores(t, n, winners, seed=70)
    else:
        d = 4
        ramp = {
            "ascending": torch.arange(n).float(),
            "descending": (n - torch.arange(n)).float(),
            "equal": torch.ones(n),
            # one ulp apart: the first block's k-th best is 1 + (block - k) ulps, every later value is one
            # ulp above it (a threshold off by one ulp drops the last winner)
            "ulps": 1 + EPS32 * torch.minimum(torch.arange(n), torch.tensor(block - k + 1)).float(),
        }[order]
        p = torch.zeros(n, d)
        p[:, 0] = ramp
        p = p.to(DEVICE)
        x = torch.zeros(t, d, device=DEVICE)
        x[:, 0] = 1
    idx, scores = ops.arrow_topk(x, p, k)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)


def test_arrow_select_row_chunks_and_large_k(ops, monkeypatch):
    """Scores produced in several row chunks (bounded scratch) and a k beyond the register-resident
    select (ranked by the reference's sort) give the reference's answer."""
    mod = _triton_select_module(ops)
    x, p = int_tensor(37, 24, seed=72), int_tensor(300, 24, seed=73)
    monkeypatch.setattr(common, "SCORE_CHUNK_BYTES", 300 * 4 * 5)  # 5 rows per chunk, the last one partial
    for k in (7, 200):
        monkeypatch.setattr(mod, "MAX_K_PAD", 1024 if k == 7 else 64)
        idx, scores = ops.arrow_topk(x, p, k)
        ref_idx, ref_scores = reference.arrow_topk(x, p, k)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)


@pytest.mark.parametrize("scoped", [False, True])
def test_arrow_select_survivor_buffers_stay_within_the_chunk_bound(ops, monkeypatch, scoped):
    """The select's per-row survivor buffers (CAP int64 words a split: 16 KB a row on a GPU, 1 GiB at
    T = 64k whatever N) are bounded like the scores: the rows go in chunks whose buffers hold at
    most SCORE_CHUNK_BYTES, with the reference's answer."""
    mod = _triton_select_module(ops)
    cap = mod.select_config(32)["CAP"]
    launched = []
    kernel = mod._select_kernel

    class Counting:
        def __getitem__(self, grid):
            def launch(scores, buf, *args, **kwargs):
                launched.append(buf.numel() * buf.element_size())
                return kernel[grid](scores, buf, *args, **kwargs)

            return launch

    monkeypatch.setattr(mod, "_select_kernel", Counting())
    bound = 4 * 8 * cap  # 4 rows' buffers; 6 rows' scores (150 adapters: 600 bytes a row)
    monkeypatch.setattr(common, "SCORE_CHUNK_BYTES", bound)
    t, n, k = 40, 150, 20  # beyond the one-launch decode (T <= 32)
    x, p = int_tensor(t, 24, seed=90), int_tensor(n, 24, seed=91)
    allowed = scope_masks(3, n, k, seed=92) if scoped else None
    scope = (torch.arange(t) % 3).to(torch.int32).to(DEVICE) if scoped else None
    idx, scores = ops.arrow_topk(x, p, k, allowed, scope)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k, allowed, scope)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0, equal_nan=True)
    assert len(launched) > 7 and max(launched) <= bound, launched  # each 6-row score chunk in 4 + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "t,n,k,sms", [(1, 1001, 20, 4), (7, 300, 5, 64), (40, 200, 16, 4), (5, 64, 64, 2), (13, 2049, 1, 16)]
)
def test_arrow_topk_scoped_matches_reference(ops, monkeypatch, dtype, t, n, k, sms):
    """A scope restricts each token to allowed[scope[t]] inside the top-k (splits and merges
    included): disallowed adapters never appear, tokens with fewer than k allowed get -1 / NaN."""
    _force_sms(ops, monkeypatch, sms)
    x, p = int_tensor(t, 24, dtype=dtype, seed=80), int_tensor(n, 24, dtype=dtype, seed=81)
    allowed = scope_masks(5, n, k, seed=82)
    scope = (torch.arange(t) % 5).to(torch.int32).to(DEVICE)
    poison_allocator()
    idx, scores = ops.arrow_topk(x, p, k, allowed, scope)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k, allowed, scope)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, atol=0, rtol=0)
    ok = idx >= 0
    assert allowed[scope.long()[:, None].expand_as(idx)[ok], idx[ok].long()].all()
    assert (ok.sum(1).cpu() == allowed[scope.long()].sum(1).clamp(max=k).cpu()).all()
    # every adapter allowed: the unscoped answer
    everyone = torch.ones(1, n, dtype=torch.bool, device=DEVICE)
    zeros = torch.zeros(t, dtype=torch.int32, device=DEVICE)
    assert torch.equal(ops.arrow_topk(x, p, k, everyone, zeros)[0], ops.arrow_topk(x, p, k)[0])


def test_arrow_topk_scope_rows_out_of_range_allow_nothing(ops):
    """A scope row outside [0, S) (checking would cost a host sync) allows no adapter, in every backend."""
    x, p = int_tensor(6, 24, seed=83), int_tensor(50, 24, seed=84)
    allowed = scope_masks(3, 50, 4, seed=85)  # row 1: 2 adapters, row 2: all
    scope = torch.tensor([-1, 2, 1, 3, 2, -7], dtype=torch.int32, device=DEVICE)
    idx, scores = ops.arrow_topk(x, p, 4, allowed, scope)
    ref_idx, ref_scores = reference.arrow_topk(x, p, 4, allowed, scope)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, atol=0, rtol=0)
    outside = torch.tensor([True, False, False, True, False, True], device=DEVICE)
    assert (idx[outside] == -1).all() and scores[outside].isnan().all()
    assert (idx[~outside] >= 0).sum(1).tolist() == [4, 2, 4]


@pytest.mark.parametrize("t", [1, 7])
def test_arrow_topk_empty_scope_table_allows_nothing(ops, monkeypatch, t):
    """allowed [0, N] (no scope rows at all): every token's scope row is out of range, so no adapter
    is allowed — idx -1 and NaN scores everywhere, in every backend and Triton path (an empty tensor
    may have no data pointer, which a kernel must not take for "unscoped")."""
    x, p = int_tensor(t, 24, seed=86), int_tensor(300, 24, seed=87)
    allowed = torch.zeros((0, 300), dtype=torch.bool, device=DEVICE)
    scope = torch.zeros(t, dtype=torch.int32, device=DEVICE)
    switches = ["", "LAG_TRITON_FOLD_SPLITS", "LAG_TRITON_FILTER_GEMM"] if ops.name == "triton" else [""]
    for switch in switches:  # the default path, the one-launch decode Arrow, the filtering GEMM
        with monkeypatch.context() as mp:
            if switch:
                mp.setenv(switch, "1")
            for ranker in (ops.arrow_topk, reference.arrow_topk):
                idx, scores = ranker(x, p, 4, allowed, scope)
                assert (idx == -1).all() and scores.isnan().all(), (switch, ranker)


@pytest.mark.parametrize("t", [9, 70])  # 70 tokens: the adapter-grouped path (the -1 pairs grouped last)
@pytest.mark.parametrize(
    "m,combine,with_scores", [(1, "softmax", False), (3, "softmax", False), (3, "uniform", False), (2, "softmax", True)]
)
def test_spectr_rerank_missing_candidates(ops, t, m, combine, with_scores):
    """Candidates -1 (a scope left fewer than k) are never selected, wherever they sit in the row;
    picks past the valid candidates are sel -1, w 0, z 0, and weights sum to 1 over the valid ones."""
    n, r, d, k = 40, 6, 33, 6
    x, a = randn(t, d, seed=83), randn(n, r, d, seed=84)
    cand = _candidates(t, n, k, seed=85)
    cand[0] = -1  # no candidate at all
    cand[1, 1:] = -1  # one
    cand[2, ::2] = -1  # scattered (the "spectr" router masks its arange)
    cand[3, 0] = -1
    scores = torch.rand(t, k, generator=gen(86)).to(DEVICE) if with_scores else None
    if scores is not None:
        scores[cand < 0] = float("nan")  # what a scoped arrow_topk returns beside a -1
    sel, w, z = ops.spectr_rerank(x, a, cand, m, combine, 0.8, scores)
    ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m, combine, 0.8, scores)
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, ref_z, atol=1e-4, rtol=1e-4)
    assert (sel[0] == -1).all() and (w[0] == 0).all() and (z[0] == 0).all()
    valid = (cand >= 0).sum(1).clamp(max=m)
    assert ((sel >= 0).sum(1) == valid).all()
    assert torch.allclose(w.sum(1)[valid > 0], torch.ones_like(w.sum(1)[valid > 0]), atol=1e-5)


@pytest.mark.parametrize("t", [9, 70])
def test_spectr_rerank_candidates_past_n_are_no_candidates(ops, t):
    """A candidate index >= N (outside the ops' contract; the reference would raise) is read as no
    candidate by both GPU backends alike: the CUDA grouped path never wrote such a slot's key, which
    its select then ranked (uninitialised memory)."""
    n, r, d, k, m = 40, 6, 33, 6, 2
    x, a = randn(t, d, seed=93), randn(n, r, d, seed=94)
    cand = _candidates(t, n, k, seed=95)
    cand[:, 1] = n + 3
    cand[2, :] = n
    got = ops.spectr_rerank(x, a, cand, m)
    want = reference.spectr_rerank(x, a, torch.where(cand >= n, -1, cand), m)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)


def test_lora_apply_skips_missing_picks(ops):
    """sel -1 (no adapter) contributes nothing, even next to an adapter holding inf."""
    t, n, d_out, r = 6, 5, 40, 6
    b = randn(n, d_out, r, seed=87)
    b[n - 1, 0, 0] = float("inf")  # what a negative index would wrap around to
    b[0, 0, 0] = float("inf")  # and what a clamp to 0 would read
    sel = torch.tensor([[1, -1], [-1, -1], [2, 3], [-1, 2], [1, 2], [3, -1]], dtype=torch.int32, device=DEVICE)
    w = torch.where(sel >= 0, 0.5, 0.0).to(DEVICE)
    z = torch.where((sel >= 0)[..., None], randn(t, 2, r, seed=88), 0.0)
    y0 = randn(t, d_out, seed=89)
    for layout, bl in _layouts(ops, b).items():
        y = ops.lora_apply(y0.clone(), bl, sel, w, z)
        torch.testing.assert_close(y, reference.lora_apply(y0.clone(), b, sel, w, z), atol=1e-5, rtol=1e-5)
        assert torch.equal(y[1], y0[1]), layout
        assert torch.isfinite(y).all(), layout


def test_lora_apply_shared_adapter_tiles_skip_missing_picks(ops):
    """At prefill sizes the Triton apply loads a tile's one adapter column once when every row with a
    pick picks it; a row of that tile without a pick (sel -1) adds nothing there, not 0 * B* (NaN
    beside an inf in B*, as the other rows' y rightly is)."""
    t, n, d_out, r = 64, 3, 8, 2  # 64 >= the Triton apply's SORT_MIN_T
    b = torch.ones(n, d_out, r)
    b[2, 0, 0] = float("inf")
    sel = torch.full((t, 2), 1, dtype=torch.int32)
    sel[:, 1] = 2
    sel[0, 1] = -1  # row 0: one pick only
    w, z, y0 = torch.full((t, 2), 0.5), torch.ones(t, 2, r), torch.zeros(t, d_out)
    sel, w, z, y0, b = (v.to(DEVICE) for v in (sel, w, z, y0, b))
    want = reference.lora_apply(y0.clone(), b, sel, w, z)
    for layout, bl in _layouts(ops, b).items():
        y = ops.lora_apply(y0.clone(), bl, sel, w, z)
        assert torch.isfinite(y[0]).all(), layout
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6, equal_nan=True)


# ----------------------------------------------------------------------------- spectr_rerank

RERANK_CASES = [  # T, N, d_in, r, k, m, combine, with_scores
    (1, 1001, 2049, 6, 20, 1, "softmax", False),  # decode: split-d path
    (7, 64, 40, 16, 20, 3, "softmax", False),
    (133, 48, 24, 1, 20, 3, "uniform", False),  # many tokens: adapter-grouped path
    (70, 30, 33, 6, 30, 3, "softmax", False),  # k = N, grouped
    (5, 30, 33, 6, 30, 3, "softmax", True),  # arrow router: rank / weight by candidate_scores
    (20, 40, 17, 6, 1, 1, "softmax", False),  # k = 1
    (9, 50, 37, 5, 7, 2, "softmax", False),  # fused path (on CPU): ranked by norm, r not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,d,r,k,m,combine,with_scores", RERANK_CASES)
def test_spectr_rerank_matches_reference(ops, dtype, t, n, d, r, k, m, combine, with_scores):
    x = randn(t, d, dtype=dtype, seed=6)
    a = _mixed_rank(randn(n, r, d, dtype=dtype, seed=7), 1, seed=8)
    cand = _candidates(t, n, k, seed=9)
    scores = torch.rand(t, k, generator=gen(10)).to(DEVICE) if with_scores else None
    temperature = 0.7
    poison_allocator()
    sel, w, z = ops.spectr_rerank(x, a, cand, m, combine, temperature, scores)
    ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m, combine, temperature, scores)
    assert sel.shape == (t, m) and sel.dtype == torch.int32
    assert w.shape == (t, m) and w.dtype == torch.float32
    assert z.shape == (t, m, r) and z.dtype == torch.float32
    for out in (w, z):
        assert torch.isfinite(out).all()
    z64_all = torch.einsum("nrd,td->tnr", a.double(), x.double())  # [T, N, r]
    tol = red_tol(x, a.reshape(n * r, d)) * r**0.5
    true_key = (
        z64_all.norm(dim=-1)
        if scores is None
        else scores.double().expand(t, k).new_zeros(t, n).scatter(1, cand.long(), scores.double())
    )
    assert_same_ranking(sel, ref_sel, true_key, 0 if scores is not None else tol)
    z64 = z64_all.gather(1, sel.long()[:, :, None].expand(-1, -1, r))
    torch.testing.assert_close(z.double(), z64, atol=tol, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=max(1e-5, 4 * tol), rtol=1e-4)
    assert torch.allclose(w.sum(-1), torch.ones(t, device=DEVICE), atol=1e-5)


@pytest.mark.parametrize(
    "t,n,d,r,k,m,path,block_k,block_d",
    [
        # d a multiple of 16: the aligned tiles
        (1, 50, 128, 128, 20, 1, "split", 8, 16),
        (2, 40, 64, 64, 12, 3, "split", 16, 16),
        (9, 60, 96, 128, 20, 1, "fused", 4, 16),
        (3, 40, 48, 128, 20, 16, "split", 16, 16),  # top_m 16: 16 candidates per step, 8 warps
        # odd d: scalar loads, tiles an eighth the size, d steps below 16 once candidates are at M_PAD
        (1, 50, 100, 128, 20, 1, "split", 1, 16),
        (2, 40, 70, 64, 12, 3, "split", 4, 8),
        (9, 60, 50, 128, 20, 1, "fused", 1, 8),
        (3, 40, 40, 128, 20, 16, "split", 16, 4),
        (9, 30, 33, 16, 20, 3, "fused", 4, 16),
    ],
)
def test_spectr_rerank_gpu_launch_plans(ops, monkeypatch, t, n, d, r, k, m, path, block_k, block_d):
    """The launch plans a GPU gets for large ranks and for odd d_in (fewer candidates per step,
    shorter d steps), run under the interpreter by planning as on a GPU: the plan the launcher
    picked for these operands, then the reference's ranking and z."""
    mod = triton_module(ops, "spectr_rerank")
    monkeypatch.setattr(mod, "interpreting", lambda: False)
    monkeypatch.setattr(mod, "num_sms", lambda device: 4)
    plans = []
    plan_for = mod.rerank_plan
    monkeypatch.setattr(mod, "rerank_plan", lambda *args: plans.append(plan_for(*args)) or plans[-1])
    x = randn(t, d, seed=90)
    a = _mixed_rank(randn(n, r, d, seed=91), 1, seed=92)
    cand = _candidates(t, n, k, seed=93)
    sel, w, z = ops.spectr_rerank(x, a, cand, m, "softmax", 0.7)
    (plan,) = plans
    tile = mod.GATHER_TILE if d % 16 == 0 else mod.UNALIGNED_GATHER_TILE
    assert (plan.path, plan.block_k, plan.block_d) == (path, block_k, block_d)
    assert plan.block_k * plan.r_pad * plan.block_d <= tile or plan.gather_warps == 8
    ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m, "softmax", 0.7)
    z64_all = torch.einsum("nrd,td->tnr", a.double(), x.double())
    tol = red_tol(x, a.reshape(n * r, d)) * r**0.5
    assert_same_ranking(sel, ref_sel, z64_all.norm(dim=-1), tol)
    torch.testing.assert_close(
        z.double(), z64_all.gather(1, sel.long()[:, :, None].expand(-1, -1, r)), atol=tol, rtol=0
    )
    torch.testing.assert_close(w, ref_w, atol=max(1e-5, 4 * tol), rtol=1e-4)


def test_spectr_rerank_plans_as_triton_specialises(ops, monkeypatch):
    """The launcher plans aligned tiles exactly where Triton's launch marks x and A* divisible by 16:
    a d_in that is a multiple of 16 with x 4 bytes off a 16-byte boundary gets the unaligned ones."""
    mod = triton_module(ops, "spectr_rerank")
    monkeypatch.setattr(mod, "interpreting", lambda: False)
    seen = []
    plan_for = mod.rerank_plan
    monkeypatch.setattr(mod, "rerank_plan", lambda *args: seen.append(args[-1]) or plan_for(*args))
    n, r, d, t = 24, 6, 64, 2
    a = randn(n, r, d, seed=94)
    cand = _candidates(t, n, 8, seed=95)
    x = randn(t, d, seed=96)
    shifted = randn(t * d + 1, seed=96)[1:].view(t, d)  # fp32: 4 bytes past the allocation's start
    odd_rows = randn(t, d + 1, seed=96)[:, :d]  # row stride 65
    for operand, aligned in ((x, True), (shifted, False), (odd_rows, False)):
        sel = ops.spectr_rerank(operand, a, cand, 1, "softmax", 1.0)[0]
        assert seen.pop() is aligned
        assert torch.equal(sel, reference.spectr_rerank(operand, a, cand, 1, "softmax", 1.0)[0])


def test_spectr_rerank_ties_lower_adapter_index(ops):
    n, r, d = 16, 4, 20
    a = randn(n, r, d, seed=11) * 0.01
    for i in (9, 5, 2):
        a[i] = a[0] * 0 + randn(r, d, seed=12)  # identical, largest-norm adapters
    x = randn(3, d, seed=13)
    cand = torch.tensor([[9, 5, 2, 0, 1], [2, 9, 5, 7, 3], [1, 5, 9, 2, 6]], dtype=torch.int32, device=DEVICE)
    sel, w, z = ops.spectr_rerank(x, a, cand, 3, "uniform", 1.0)
    assert sel.tolist() == [[2, 5, 9]] * 3
    assert torch.equal(sel, reference.spectr_rerank(x, a, cand, 3, "uniform", 1.0)[0])
    sel1, w1, _ = ops.spectr_rerank(x, a, cand, 1)
    assert sel1.tolist() == [[2]] * 3 and (w1 == 1).all()


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_rank_in_fp32_like_the_reference(ops, x_dtype):
    """x and the weights in different dtypes: the reference computes in fp32 from both as given.
    The weights below differ by less than x's dtype resolves, so rounding them to x's dtype (what
    the Triton launchers once did) ties them and changes the winner."""
    d, r = 24, 3
    step, w_dtype = 2.0**-12, torch.float32  # exact in fp32; below bf16's (2^-7) and fp16's (2^-10) step at 1.5
    bumps = torch.tensor([0.0, 1.0, 3.0, 2.0]) * step  # exact ranking 2, 3, 1, 0
    x = torch.zeros(2, d)
    x[:, 5] = 1.0
    p = torch.zeros(len(bumps), d)
    p[:, 5] = 1.5 + bumps
    x, p = x.to(x_dtype).to(DEVICE), p.to(w_dtype).to(DEVICE)
    assert torch.unique(p.to(x_dtype)[:, 5]).numel() < len(bumps), "the case must tie in x's dtype"
    idx, scores = ops.arrow_topk(x, p, 4)
    ref_idx, ref_scores = reference.arrow_topk(x, p, 4)
    assert idx[0].tolist() == ref_idx[0].tolist() == [2, 3, 1, 0]
    assert torch.equal(idx, ref_idx) and torch.equal(scores, ref_scores)

    a = torch.zeros(len(bumps), r, d)
    a[:, 1, 5] = 1.5 + bumps  # z = A* x: the norms differ as the scores above
    a = a.to(w_dtype).to(DEVICE)
    cand = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.int32, device=DEVICE)
    sel, w, z = ops.spectr_rerank(x, a, cand, 2)
    ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, 2)
    assert sel.tolist() == ref_sel.tolist() == [[2, 3], [2, 3]]
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)
    assert torch.equal(z, ref_z)


@needs_triton
def test_host_launch_arithmetic_matches_triton():
    """The launchers' plain-Python cdiv / next_pow2 / prev_pow2 (cheaper on the host than Triton's
    constexpr functions) agree with Triton's over every size a plan meets."""
    import triton

    from lag_triton.kernels.triton._common import cdiv, next_pow2, prev_pow2

    for v in [*range(1, 4200), 2**20 - 1, 2**20, 2**20 + 1, 10**9]:
        assert next_pow2(v) == triton.next_power_of_2(v)
        assert prev_pow2(v) == triton.next_power_of_2(v + 1) // 2
        for b in (1, 3, 64, 1024):
            assert cdiv(v, b) == triton.cdiv(v, b)
    assert next_pow2(0) == 1 and next_pow2(5, 16) == 16 and next_pow2(100, 16) == 128
    assert prev_pow2(0) == triton.next_power_of_2(1) // 2 == 0  # rank 1024: no row fits the tile budget


@pytest.mark.parametrize("t,k,n", [(133, 20, 1001), (7, 3, 2), (1, 1, 1), (2049, 5, 37)])
@needs_triton
def test_group_pairs_by_adapter_is_a_counting_sort(t, k, n):
    """The grouped rerank's device counting sort: a permutation of the pairs, each adapter's pairs
    contiguous, adapters ascending, pairs without an adapter (-1, out of range) last."""
    from lag_triton.kernels.triton.group_by_adapter import group_pairs_by_adapter

    cand = torch.randint(-1, n + 1, (t, k), generator=gen(t + n), dtype=torch.int32).to(DEVICE)
    cand[0, 0] = n - 1  # the last adapter's segment ends where the missing pairs begin
    ad, pair = group_pairs_by_adapter(cand, n)
    flat = cand.reshape(-1).long()
    assert torch.equal(pair.sort().values, torch.arange(t * k, device=DEVICE))
    valid = (flat >= 0) & (flat < n)
    assert torch.equal(ad.long(), torch.where(valid, flat, -1)[pair])
    bucket = torch.where(ad >= 0, ad.long(), n)
    assert (bucket.diff() >= 0).all()


def test_spectr_rerank_nan_inf(ops):
    n, r, d, k = 24, 6, 16, 8
    a = randn(n, r, d, seed=14)
    a[3, 0, 0] = float("nan")
    x = randn(4, d, seed=15)
    x[1, 2] = float("nan")
    x[2, 4] = float("inf")
    cand = _candidates(4, n, k, seed=16)
    cand[0, 0] = 3
    for m, combine in ((1, "softmax"), (3, "softmax"), (3, "uniform")):
        sel, w, z = ops.spectr_rerank(x, a, cand, m, combine, 1.0)
        ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m, combine, 1.0)
        assert ((sel >= 0) & (sel < n)).all()
        assert torch.equal(sel, ref_sel)
        torch.testing.assert_close(w, ref_w, equal_nan=True)
        torch.testing.assert_close(z, ref_z, equal_nan=True)


def test_spectr_rerank_inf_key_gives_nan_weights_as_softmax_does(ops):
    """An infinite key among the picks (an Arrow score of an inf input, or an inf in A*) makes the
    softmax NaN (inf - inf), as the reference's; the Triton select divided by 1 instead (w [nan, 0, 0])."""
    n, r, d, k = 12, 4, 16, 5
    a = randn(n, r, d, seed=140)
    x = randn(3, d, seed=141)
    cand = _candidates(3, n, k, seed=142)
    scores = torch.rand(3, k, generator=gen(143)).to(DEVICE)
    scores[0, 1] = float("inf")
    a[cand[1, 2].long(), 0, 0] = float("inf")
    x[1, 0] = 1.0  # the inf in A* meets a nonzero feature: that candidate's norm is inf
    for cs in (scores, None):
        sel, w, _ = ops.spectr_rerank(x, a, cand, 3, "softmax", 1.0, cs)
        ref_sel, ref_w, _ = reference.spectr_rerank(x, a, cand, 3, "softmax", 1.0, cs)
        assert torch.equal(sel, ref_sel)
        torch.testing.assert_close(w, ref_w, equal_nan=True)
    assert w[1].isnan().all() and ref_w[1].isnan().all()


def test_spectr_rerank_rank_zero_library_weights_like_the_reference(ops):
    """A rank-0 library (every norm 0): softmax of the Arrow scores when given, 0 for picks a scope
    left empty (Triton gave 1/m to every pick, -1 ones included)."""
    x = randn(2, 8, seed=144)
    a = torch.zeros(6, 0, 8, device=DEVICE)
    cand = torch.tensor([[0, 3, 5], [-1, -1, 2]], dtype=torch.int32, device=DEVICE)
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]], device=DEVICE)
    for combine, cs in (("softmax", scores), ("softmax", None), ("uniform", None)):
        sel, w, z = ops.spectr_rerank(x, a, cand, 3, combine, 1.0, cs)
        ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, 3, combine, 1.0, cs)
        assert torch.equal(sel, ref_sel) and z.shape == ref_z.shape == (2, 3, 0)
        torch.testing.assert_close(w, ref_w)
        assert torch.equal(w[1], torch.tensor([1.0, 0.0, 0.0], device=DEVICE))


@pytest.mark.parametrize("temperature", [1.2e-38, 1e-30, 1e-3])
def test_spectr_rerank_tiny_temperature_weights_the_best_pick(ops, temperature):
    """softmax(key / t) at a temperature where key / t overflows fp32 is still the best pick alone
    (the keys are shifted by their maximum first), never inf / inf = NaN; equal to the reference."""
    n, r, d, k, m = 30, 6, 33, 8, 3
    x = randn(5, d, seed=17) * 100  # norms in the thousands: key / 1e-30 overflows, key / 1e-3 does not
    a = randn(n, r, d, seed=18)
    cand = _candidates(5, n, k, seed=19)
    cand[1, 2:] = -1  # a scope left this token two candidates: the third pick gets 0
    cand[2, 1:] = -1  # ... and this one a single candidate
    sel, w, z = ops.spectr_rerank(x, a, cand, m, "softmax", temperature)
    ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m, "softmax", temperature)
    assert torch.equal(sel, ref_sel)
    assert torch.isfinite(ref_w).all() and torch.isfinite(w).all()
    torch.testing.assert_close(w, ref_w, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, ref_z, rtol=1e-5, atol=1e-3)  # |z| ~ 1e3: fp32 sums in another order
    norms = ref_z.norm(dim=-1)  # [T, m], descending within a row
    picked = sel >= 0
    gaps = norms[:, :1] - norms  # how far below the best each pick is
    want = torch.exp(-gaps / temperature) * picked
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(ref_w, want, atol=1e-5, rtol=1e-4)
    if temperature < 1e-20:  # the limit: the best pick alone, whatever the others' keys
        assert torch.equal(ref_w, torch.nn.functional.one_hot(torch.zeros(5, dtype=torch.long), m).float())


# ----------------------------------------------------------------------------- folded split reductions


def _fold(ops, monkeypatch, module, second_pass):
    """Turn the fold on (LAG_TRITON_FOLD_SPLITS=1) and make launching the unfolded second pass an error."""
    mod = triton_module(ops, module)

    class _MustNotLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"{module}.{second_pass} launched although the split reduction is folded")

    monkeypatch.setenv("LAG_TRITON_FOLD_SPLITS", "1")
    monkeypatch.setattr(mod, second_pass, _MustNotLaunch())
    return mod


@pytest.mark.parametrize("t,n,k,sms", [c for c in SPLIT_CASES if c[0] in (1, 3, 5, 13)])
def test_arrow_topk_folded_merge(ops, monkeypatch, t, n, k, sms):
    """The N-split select with its merge folded into the launch (the row's last split merges):
    the split test's ties / NaN / inf cases, no merge launch, every ticket back at 0 afterwards."""
    mod = _fold(ops, monkeypatch, "arrow_topk", "_merge_kernel")
    monkeypatch.setattr(mod, "decode_plan", lambda *shapes: None)  # the GEMM + select path, not arrow_decode
    test_arrow_topk_small_t_splits_ties_nan(ops, monkeypatch, torch.float32, t, n, k, sms)
    tickets_all_zero(ops)


@pytest.mark.parametrize("t,n,k,sms", [(1, 1001, 20, 4), (3, 700, 5, 64), (2, 2049, 1, 16)])
def test_arrow_select_folded_planted_and_scoped(ops, monkeypatch, t, n, k, sms):
    """Folded merge, winners planted at split boundaries and in the last partial split, and scoped."""
    mod = _fold(ops, monkeypatch, "arrow_topk", "_merge_kernel")
    monkeypatch.setattr(mod, "decode_plan", lambda *shapes: None)
    test_arrow_select_buffer_flushes_and_splits(ops, monkeypatch, "planted", t, n, k, sms)
    test_arrow_topk_scoped_matches_reference(ops, monkeypatch, torch.float32, t, n, k, sms)
    tickets_all_zero(ops)


def _one_launch_arrow(ops, monkeypatch, sms):
    """Fold on, with every launch of the GEMM + select path made an error: arrow_decode must serve."""
    mod = _fold(ops, monkeypatch, "arrow_topk", "_merge_kernel")
    monkeypatch.setattr(mod, "_select_kernel", mod._merge_kernel)  # the must-not-launch stand-in
    monkeypatch.setattr(mod, "num_sms", lambda device: sms)

    def no_gemm(*args):
        raise AssertionError("the scoring GEMM ran although arrow_decode scores in its own launch")

    monkeypatch.setattr(mod, "prototype_scores", no_gemm)
    return triton_module(ops, "arrow_decode")


@pytest.mark.parametrize("t,n,k,sms", [c for c in SPLIT_CASES if c[2] <= 32])  # k within a block
def test_arrow_topk_one_launch_decode(ops, monkeypatch, t, n, k, sms):
    """A few tokens scored and selected in one launch (split-d skinny GEMM, block ranking and merge
    folded by tickets): the split test's exact ties, NaN and inf cases; every ticket back at 0."""
    _one_launch_arrow(ops, monkeypatch, sms)
    test_arrow_topk_small_t_splits_ties_nan(ops, monkeypatch, torch.bfloat16, t, n, k, sms)
    tickets_all_zero(ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,n,d,k,sms", [(1, 1001, 301, 20, 64), (29, 300, 70, 32, 4), (3, 97, 40, 1, 64)])
def test_arrow_topk_one_launch_decode_planted_and_scoped(ops, monkeypatch, dtype, t, n, d, k, sms):
    """One-launch Arrow with winners planted on both sides of every block boundary and in the last,
    partial block, on several d-splits with a ragged tail (d = 301); then under a scope."""
    dec = _one_launch_arrow(ops, monkeypatch, sms)
    plan = dec.decode_plan(t, n, d, 1 << max(0, (k - 1).bit_length()), sms)
    assert plan is not None and (plan["D_SPLITS"] > 1 or n < 1000)  # the first case splits d on CPU and GPU
    edges = [b * plan["BLOCK_N"] for b in range(1, plan["NB"])] + [n - 1]
    winners = sorted({min(n - 1, e + o) for e in edges for o in (-1, 0)}, reverse=True)[: k + 3]
    x, p = _planted_scores(t, n, winners, seed=94)
    # every d-split contributes: integer noise over all of d_in (exact sums, so the order stays exact)
    x = torch.cat([x, int_tensor(t, d - x.shape[1], lo=-1, hi=2, seed=97)], 1).to(dtype)
    p = torch.cat([p, int_tensor(n, d - p.shape[1], lo=-1, hi=2, seed=95)], 1).to(dtype)
    idx, scores = ops.arrow_topk(x, p, k)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)
    allowed = scope_masks(5, n, k, seed=96)
    scope = (torch.arange(t) % 5).to(torch.int32).to(DEVICE)
    idx, scores = ops.arrow_topk(x, p, k, allowed, scope)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k, allowed, scope)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, atol=0, rtol=0)
    tickets_all_zero(ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", [c for c in RERANK_CASES if c[0] <= 7 and not c[7]])
def test_spectr_rerank_folded_select(ops, monkeypatch, dtype, case):
    """Split-d rerank whose token ranking runs in the partial-z launch (the token's last program):
    the reference's answer and no select launch, then missing candidates, ties and NaN on the same
    (reused) tickets."""
    mod = _fold(ops, monkeypatch, "spectr_rerank", "_select_kernel")
    monkeypatch.setattr(mod, "num_sms", lambda device: 64)  # every token count below takes the split path
    t, n, d, r, k, m, combine, with_scores = case
    assert mod.rerank_plan(t, n, r, d, k, m, with_scores, 64).path == "split"
    test_spectr_rerank_matches_reference(ops, dtype, *case)
    for m, combine in ((1, "softmax"), (3, "softmax"), (3, "uniform")):
        test_spectr_rerank_missing_candidates(ops, 9, m, combine, False)  # 9 tokens: the split path
    test_spectr_rerank_ties_lower_adapter_index(ops)
    test_spectr_rerank_nan_inf(ops)
    tickets_all_zero(ops)


@pytest.mark.parametrize("fold,t", [(False, 1), (True, 1), (True, 32)])
def test_decode_layer_launch_count(ops, monkeypatch, fold, t):
    """One decode layer (route_and_apply): folded, three Triton launches -- one-launch Arrow, the
    rerank with its ranking folded in, the apply -- and no scoring GEMM, at 1 token and at 32;
    unfolded (1 token), the GEMM and four (select, partial z, select, apply). Same selections as the
    reference either way."""
    arrow = triton_module(ops, "arrow_topk")
    rerank = triton_module(ops, "spectr_rerank")
    monkeypatch.setenv("LAG_TRITON_FOLD_SPLITS", "1" if fold else "0")
    launched, gemms = [], []
    kernel_type = type(arrow._select_kernel)
    run = kernel_type.run

    def counting_run(self, *args, **kwargs):
        launched.append(self.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", counting_run)
    scores = arrow.prototype_scores
    monkeypatch.setattr(arrow, "prototype_scores", lambda *a: gemms.append(1) or scores(*a))
    monkeypatch.setattr(arrow, "num_sms", lambda device: 64)
    monkeypatch.setattr(rerank, "num_sms", lambda device: 64)
    n, r, d_in, d_out = 300, 6, 64, 48
    x = randn(t, d_in, seed=98)
    a = randn(n, r, d_in, seed=99)
    b = randn(n, d_out, r, seed=100)
    p = a[:, 0].contiguous()
    cfg = RoutingConfig(k=20, top_m=1)
    y = torch.zeros(t, d_out, device=DEVICE)
    sel = route_and_apply(x, y, a, b, p, cfg, ops)
    assert torch.equal(sel, route_and_apply(x, y.clone(), a, b, p, cfg, get_ops("torch")))
    if fold:
        assert launched == ["_decode_kernel", "_partial_z_kernel", "_lora_apply_kernel"] and not gemms
    else:
        assert launched == ["_select_kernel", "_partial_z_kernel", "_select_kernel", "_lora_apply_kernel"]
        assert gemms == [1]


@pytest.mark.parametrize("t", [1, 32])
def test_folded_decode_layer_alternating_inputs(ops, monkeypatch, t):
    """The fold's memory ordering, on hardware (the interpreter runs programs one at a time: on CPU
    this checks the test itself). A folded decode layer -- one-launch Arrow, rerank with its ranking
    folded -- runs again and again with its input alternating between two batches, eagerly and, on a
    GPU, as CUDA-graph replays, with no synchronisation between calls. Every call must reproduce
    that input's first folded result bit for bit (a last program that read a partial before it
    landed would see the other batch's stale one), with the unfolded launches' selections; every
    ticket back at 0 afterwards."""
    folding = triton_module(ops, "_common").folding
    gpu = DEVICE == "cuda"
    if not gpu:
        for name in ("arrow_topk", "spectr_rerank"):  # splits on CPU too
            monkeypatch.setattr(triton_module(ops, name), "num_sms", lambda device: 64)
    n, d_in, d_out, r = (1000, 3072, 8192, 6) if gpu else (300, 64, 48, 6)
    dtype, repeats = (torch.bfloat16, 100) if gpu else (torch.float32, 2)
    a = randn(n, r, d_in, dtype=dtype, seed=110) / d_in**0.5
    b = randn(n, d_out, r, dtype=dtype, seed=111) / r
    p = a[:, 0].contiguous()
    xs = [randn(t, d_in, dtype=dtype, seed=112 + i) for i in range(2)]
    y0 = randn(t, d_out, dtype=dtype, seed=114)
    cfg = RoutingConfig(k=20, top_m=1)

    def layer(x, y):
        return route_and_apply(x, y, a, b, p, cfg, ops)

    def run(x):
        y = y0.clone()
        return layer(x, y), y

    with folding(False):
        unfolded = [run(x)[0] for x in xs]
    with folding(True):
        first = [run(x) for x in xs]
        runs = [run(xs[i % 2]) for i in range(repeats)]
        if gpu:
            static_x, static_y = xs[0].clone(), y0.clone()
            layer(static_x, static_y)  # warm-up: compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_sel = layer(static_x, static_y)
            for i in range(repeats):
                static_x.copy_(xs[i % 2])
                static_y.copy_(y0)
                graph.replay()
                runs.append((static_sel.clone(), static_y.clone()))
    for j in range(2):
        assert torch.equal(first[j][0], unfolded[j]), "folded and unfolded launches select differently"
    for i, (sel, y) in enumerate(runs):
        assert torch.equal(sel, first[i % 2][0]) and torch.equal(y, first[i % 2][1]), f"call {i} differs"
    tickets_all_zero(ops)


# ----------------------------------------------------------------------------- lora_apply

APPLY_CASES = [  # T, N, d_out, r, m
    (1, 1001, 2049, 6, 1),
    (7, 50, 64, 16, 3),
    (133, 20, 100, 1, 1),
    (133, 9, 70, 6, 3),
    (40, 5, 33, 6, 2),
    (33, 500, 130, 16, 3),  # nearly one adapter per row, top_m = 3
    (69, 700, 72, 128, 3),  # r > 16 (CUDA: the generic rank loop); grouped rows, a partial last tile
    (2, 40, 300, 1, 1),
    (16, 300, 257, 6, 2),
]


def _layouts(ops, b):
    """B* as given ([N, d_out, r] contiguous, a library file's layout), in the backend's preferred
    layout (what patch() stores), and as a strided slice of a wider tensor: every layout is accepted."""
    wide = torch.zeros(b.shape[0], b.shape[1], b.shape[2] + 3, dtype=b.dtype, device=b.device)
    wide[..., 1 : b.shape[2] + 1] = b
    return {"given": b, "prepared": ops.prepare_b_star(b), "strided": wide[..., 1 : b.shape[2] + 1]}


def _check_apply(ops, b, sel, w, z, y0):
    """ops.lora_apply in place on a copy of y0, within one output rounding + the fp32 sum error of exact,
    for every layout of B*."""
    m, dtype = sel.shape[1], y0.dtype
    exact = y0.double() + torch.einsum("tm,tmor,tmr->to", w.double(), b[sel.long()].double(), z.double())
    y_ref = reference.lora_apply(y0.clone(), b, sel, w, z)
    ulp = torch.finfo(dtype).eps * exact.abs() + red_tol(z, b) * m
    for layout, bl in _layouts(ops, b).items():
        assert torch.equal(bl, b), layout
        y = y0.clone()
        out = ops.lora_apply(y, bl, sel, w, z)
        assert out is y or out.data_ptr() == y.data_ptr()
        assert ((y.double() - exact).abs() <= ulp + (y_ref.double() - exact).abs()).all(), layout
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,n,d_out,r,m", APPLY_CASES)
def test_lora_apply_matches_reference(ops, dtype, t, n, d_out, r, m):
    b = _mixed_rank(randn(n, d_out, r, dtype=dtype, seed=17), 2, seed=18)
    sel = _candidates(t, n, m, seed=19)
    w = torch.rand(t, m, generator=gen(20)).to(DEVICE)
    z = randn(t, m, r, seed=21)
    _check_apply(ops, b, sel, w, z, randn(t, d_out, dtype=dtype, seed=22))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,n,runs,m", [(133, 7, 3, 2), (64, 1, 1, 1), (200, 50, 5, 1), (97, 30, 97, 3)])
def test_lora_apply_grouped_tokens(ops, dtype, t, n, runs, m):
    """Prefill routing concentrated on a few adapters (a prompt about one document): first choices in
    `runs` shuffled runs, so sorted tiles share one adapter (the Triton shared-segment path), mixed
    tiles sit at run borders, and choices j >= 1 stay scattered."""
    g = gen(31)
    first = (torch.arange(t) * runs // t)[torch.randperm(t, generator=g)] % n
    others = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(t)])
    sel = others.clone()
    if m > 1:  # keep the choices of a row distinct: swap `first` into column 0
        hit = (others == first[:, None]).nonzero()
        sel[hit[:, 0], hit[:, 1]] = others[hit[:, 0], 0]
    sel[:, 0] = first
    sel = sel.to(torch.int32).to(DEVICE)
    b = _mixed_rank(randn(n, 70, 6, dtype=dtype, seed=32), 2, seed=33)
    w = torch.rand(t, m, generator=gen(34)).to(DEVICE)
    z = randn(t, m, 6, seed=35)
    _check_apply(ops, b, sel, w, z, randn(t, 70, dtype=dtype, seed=36))


def test_lora_apply_every_element_poisoned_output_row(ops):
    """Only selected rows change by their delta; rows with zero weight stay bit-identical (incl. NaN rows)."""
    t, n, d_out, r = 9, 4, 50, 6
    b = randn(n, d_out, r, seed=23)
    sel = _candidates(t, n, 2, seed=24)
    w = torch.rand(t, 2, generator=gen(25)).to(DEVICE)
    w[3] = 0
    z = randn(t, 2, r, seed=26)
    y0 = randn(t, d_out, seed=27)
    y0[5] = float("nan")
    y = y0.clone()
    ops.lora_apply(y, b, sel, w, z)
    y_ref = reference.lora_apply(y0.clone(), b, sel, w, z)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    assert torch.equal(y[3], y0[3])
    assert torch.isnan(y[5]).all()


# ----------------------------------------------------------------------------- composed router


@pytest.mark.parametrize("router", ["lag", "arrow", "spectr"])
@pytest.mark.parametrize("top_m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_and_apply_matches_reference(ops, router, top_m, dtype):
    """The composed pipeline (retrieve, rerank, apply) against the reference, every token: with
    small-integer data every score and z is exact in any summation order, so every routing decision
    (ties to the lower adapter index) is the reference's, and y agrees to the weights' rounding."""
    t, n, d_in, d_out, r = 11, 37, 48, 40, 6
    x = int_tensor(t, d_in, dtype=dtype, seed=28)
    a = _mixed_rank(int_tensor(n, r, d_in, dtype=dtype, seed=29), 1, seed=30)
    b = int_tensor(n, d_out, r, dtype=dtype, seed=31)
    protos = a[:, 0].contiguous()
    cfg = RoutingConfig(k=8, top_m=top_m, router=router, temperature=5.0)
    y0 = int_tensor(t, d_out, dtype=dtype, seed=32)
    y, y_ref = y0.clone(), y0.clone()
    sel = route_and_apply(x, y, a, b, protos, cfg, ops)
    ref_sel = route_and_apply(x, y_ref, a, b, protos, cfg, reference)
    assert torch.equal(sel, ref_sel)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=1e-3, rtol=1e-5 if dtype == torch.float32 else 1e-2)


# ----------------------------------------------------------------------------- GPU-only, real sizes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real-size cases need a GPU")
class TestRealSizes:
    @pytest.mark.parametrize("n", [1000, 10000])
    @pytest.mark.parametrize("t", [1, 32, 2048])
    def test_route_and_apply_real_size(self, ops, n, t):
        d_in, d_out, r, dtype = 3072, 8192, 6, torch.bfloat16
        x = randn(t, d_in, dtype=dtype, seed=40)
        a = randn(n, r, d_in, dtype=dtype, seed=41) / d_in**0.5
        b = randn(n, d_out, r, dtype=dtype, seed=42) / r
        protos = a[:, 0].contiguous()
        cfg = RoutingConfig(k=20, top_m=1)
        idx, _ = ops.arrow_topk(x, protos, 20)
        ref_idx, _ = reference.arrow_topk(x, protos, 20)
        true = (x.double() @ protos.double().T).abs()
        assert_same_ranking(idx, ref_idx, true, red_tol(x, protos))
        y0 = randn(t, d_out, dtype=dtype, seed=43)
        y, y_ref = y0.clone(), y0.clone()
        sel = route_and_apply(x, y, a, b, protos, cfg, ops)
        ref_sel = route_and_apply(x, y_ref, a, b, protos, cfg, reference)
        agree = (sel == ref_sel).all(dim=1)
        assert agree.float().mean() >= 0.99
        torch.testing.assert_close(y[agree].float(), y_ref[agree].float(), atol=0.05, rtol=2e-2)
        torch.cuda.synchronize()

    @pytest.mark.parametrize("t", [16, 80])  # 80: prefill paths (adapter-sorted apply, grouped rerank)
    def test_cuda_graph_capture_replay(self, ops, t):
        n, d_in, d_out, r, dtype = 1000, 3072, 8192, 6, torch.bfloat16
        x = randn(t, d_in, dtype=dtype, seed=50)
        a = randn(n, r, d_in, dtype=dtype, seed=51) / d_in**0.5
        b = randn(n, d_out, r, dtype=dtype, seed=52) / r
        protos = a[:, 0].contiguous()
        y0 = randn(t, d_out, dtype=dtype, seed=53)
        for top_m in (1, 3):
            cfg = RoutingConfig(k=20, top_m=top_m)
            y = y0.clone()
            route_and_apply(x, y, a, b, protos, cfg, ops)  # warm-up: compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            y.copy_(y0)
            with torch.cuda.graph(graph):
                sel = route_and_apply(x, y, a, b, protos, cfg, ops)
            y.copy_(y0)
            x2 = randn(t, d_in, dtype=dtype, seed=54)
            x.copy_(x2)
            graph.replay()
            torch.cuda.synchronize()
            y_ref = y0.clone()
            ref_sel = route_and_apply(x2, y_ref, a, b, protos, cfg, reference)
            assert torch.equal(sel, ref_sel)
            torch.testing.assert_close(y.float(), y_ref.float(), atol=0.05, rtol=2e-2)


# ----------------------------------------------------------------------------- grouping, tiny norms, d_in = 0


@pytest.mark.parametrize("m", [2, 3])
def test_lora_apply_prefill_groups_tokens_by_their_first_choice(ops, monkeypatch, m):
    """The prefill apply groups tokens by sel[:, 0] (what its shared-adapter tiles are for) with top_m > 1
    too: the kernels once read the strided column sel[:, :1] as contiguous, i.e. sel.flatten()[:T],
    mixing in other tokens' later choices (the output stayed right; only the grouping was lost)."""
    mod = triton_module(ops, "lora_apply")
    t, n, d_out, r = mod.SORT_MIN_T + 6, 9, 40, 3
    seen = []
    group = mod.group_pairs_by_adapter
    monkeypatch.setattr(mod, "group_pairs_by_adapter", lambda *a: seen.append(group(*a)) or seen[-1])
    g = gen(120)
    sel = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(t)]).to(torch.int32).to(DEVICE)
    sel[: t // 2, 0] = 4  # a run of one first choice, that later choices of other tokens would break up
    b, w, z = randn(n, d_out, r, seed=121), torch.rand(t, m, generator=gen(122)).to(DEVICE), randn(t, m, r, seed=123)
    y0 = randn(t, d_out, seed=124)
    y = ops.lora_apply(y0.clone(), b, sel, w, z)
    torch.testing.assert_close(y, reference.lora_apply(y0.clone(), b, sel, w, z), atol=1e-5, rtol=1e-5)
    ((keys, order),) = seen
    assert torch.equal(order.sort().values, torch.arange(t, device=DEVICE)), "not a permutation of the tokens"
    assert torch.equal(keys, sel[:, 0][order]), "grouped by something other than each token's first choice"
    assert (keys.diff() >= 0).all()


@needs_triton
def test_group_pairs_by_adapter_strided_views_and_wide_slots(monkeypatch):
    """A strided view (a column of sel) is grouped by its own elements, and the int64 slot counters
    (taken from 2**31 pairs on) give the same counting sort."""
    import sys

    from lag_triton.kernels.triton.group_by_adapter import group_pairs_by_adapter

    mod = sys.modules[group_pairs_by_adapter.__module__]
    sel = torch.randint(-1, 12, (70, 3), generator=gen(125), dtype=torch.int32).to(DEVICE)
    col = sel[:, :1]
    assert not col.reshape(-1).is_contiguous()
    for wide in (False, True):
        if wide:
            monkeypatch.setattr(mod, "WIDE_SLOTS_FROM", 0)
        for cand in (col, sel):
            ad, pair = group_pairs_by_adapter(cand, 11)
            flat = cand.reshape(-1).long()
            assert torch.equal(pair.sort().values, torch.arange(flat.numel(), device=DEVICE))
            assert torch.equal(ad.long(), torch.where((flat >= 0) & (flat < 11), flat, -1)[pair])
            assert (torch.where(ad >= 0, ad.long(), 11).diff() >= 0).all()


@pytest.mark.parametrize("plan", ["interpreter", "gpu"])
def test_spectr_rerank_tiny_norms_rank_like_the_reference(ops, monkeypatch, plan):
    """Sums of squares below 2**-126 (subnormal) still rank: the norm is a correctly rounded sqrt (the
    GPU's sqrt.approx.ftz flushed them to 0, so every tiny-norm candidate tied and the lowest ids won).
    Under the interpreter the sqrt is numpy's, so this passes without the fix too; the PTX check is
    that the compiled rerank holds sqrt.rn.f32 (test_spectr_rerank_ptx_sqrt_is_correctly_rounded)."""
    if plan == "gpu":
        mod = triton_module(ops, "spectr_rerank")
        monkeypatch.setattr(mod, "interpreting", lambda: False)
        monkeypatch.setattr(mod, "num_sms", lambda device: 4)
    n, r, d = 6, 2, 8
    a = torch.zeros(n, r, d)
    a[:, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 0.5, 2.5, 1.5])
    a = a.to(DEVICE)
    for t in (1, 9, 70):  # the split, fused and (from 64 tokens) grouped paths
        x = torch.zeros(t, d, device=DEVICE)
        x[:, 0] = 1e-20  # z = 5e-21 .. 3e-20: every z * z below 2**-126
        cand = torch.tensor([[0, 1, 2, 3, 4, 5]] * t, dtype=torch.int32, device=DEVICE)
        for m in (1, 2):
            sel, w, z = ops.spectr_rerank(x, a, cand, m)
            ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m)
            assert sel[0].tolist() == ref_sel[0].tolist() == [2, 4][:m], (t, m)
            assert torch.equal(sel, ref_sel) and torch.equal(z, ref_z), (t, m)
            torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=0)


_SQRT_PTX_CHECK = """
import os
os.environ.pop("TRITON_INTERPRET", None)  # the GPU build of the kernels (_aot_check's rule)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lag_triton.kernels.triton import _aot_check as C
names = {
    "rerank select bf16 T2048 N100000 r6 d3072 k20 m1 fused",  # ranks by the norm, then the winners' norms
    "rerank partial_z bf16 T1 N1000 r6 d8192 k20 m3 fold=True",  # the same in the folded split-d programs
}
for (name, fn, sig, consts, warps, _), aligned in C._jobs():
    if name in names and not aligned:  # compiled once each: the sqrt does not depend on alignment
        full = dict(sig, **{k: "constexpr" for k in consts})
        ptx = triton.compile(
            ASTSource(fn=fn, signature=full, constexprs=consts), target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=warps, num_stages=3),
        ).asm["ptx"]
        assert "sqrt.rn.f32" in ptx and "sqrt.approx" not in ptx, name
        print("ok", name)
"""


@needs_triton
def test_spectr_rerank_ptx_sqrt_is_correctly_rounded():
    """The norms of the select (fused) and of the folded partial-z programs compile to sqrt.rn.f32 for
    sm_90, not sqrt.approx.ftz: what the tiny-norms test cannot see on CPU. PTX only, no GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    child = subprocess.run(
        [sys.executable, "-c", _SQRT_PTX_CHECK], capture_output=True, text=True, timeout=900, env=env
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.count("ok") == 2, child.stdout


@pytest.mark.parametrize("plan", ["interpreter", "gpu"])
def test_spectr_rerank_d_in_zero(ops, monkeypatch, plan):
    """d_in = 0: every z is 0, so every norm ties and the lowest candidate ids win, weights uniform
    over the picks (softmax of equal keys), z 0 -- the reference's answer (rerank_plan divided by 0)."""
    if plan == "gpu":
        mod = triton_module(ops, "spectr_rerank")
        monkeypatch.setattr(mod, "interpreting", lambda: False)
        monkeypatch.setattr(mod, "num_sms", lambda device: 4)
    n, r, k = 30, 6, 5
    a = torch.zeros(n, r, 0, device=DEVICE)
    for t in (1, 9, 70):  # split, fused, grouped (t * k >= n)
        x = torch.zeros(t, 0, device=DEVICE)
        cand = _candidates(t, n, k, seed=126)
        scores = torch.rand(t, k, generator=gen(127)).to(DEVICE)
        for m, combine, cs in (
            (1, "softmax", None),
            (3, "softmax", None),
            (3, "uniform", None),
            (2, "softmax", scores),
        ):
            sel, w, z = ops.spectr_rerank(x, a, cand, m, combine, 0.7, cs)
            ref_sel, ref_w, ref_z = reference.spectr_rerank(x, a, cand, m, combine, 0.7, cs)
            assert torch.equal(sel, ref_sel), (t, m, combine, cs is not None)
            torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)
            assert torch.equal(z, ref_z) and (z == 0).all()
            if cs is None:
                assert torch.equal(sel, cand.sort(dim=1).values[:, :m])


@needs_triton
@pytest.mark.parametrize(
    "value,on", [("1", True), ("true", True), ("ON", True), ("0", False), ("false", False), ("off", False), ("", False)]
)
def test_opt_in_switches_read_on_and_off_words(monkeypatch, value, on):
    """The opt-in paths' environment switches: 1/true/yes/on and 0/false/no/off (or empty); another
    value is refused naming the variable (LAG_TRITON_FOLD_SPLITS=false turned the fold on)."""
    from lag_triton.kernels.triton import _common

    for switch in (_common.fold_splits, _common.filter_gemm):
        monkeypatch.setenv(switch.env, value)
        assert switch() is on
        monkeypatch.setenv(switch.env, "2")
        with pytest.raises(ValueError, match=f"{switch.env}='2': set it to 1 \\(on\\) or 0 \\(off\\)"):
            switch()

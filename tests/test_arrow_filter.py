"""The filtering GEMM path of the Triton Arrow op (kernels/triton/arrow_filter.py) against the reference.

A strided sample's k-th best word is each row's threshold, the GEMM's epilogue keeps what beats it,
the finish kernel merges seed and survivors or rescores a row whose buffer overflowed. The cases
plant winners where each of those steps could lose one: in and out of the sample, tied across it,
on tile edges and in the last partial tile, and rows that overflow beside rows that do not.
"""

from __future__ import annotations

import pytest
import torch
from kernel_data import (
    DEVICE,
    assert_same_ranking,
    int_tensor,
    poison_allocator,
    randn,
    red_tol,
    scope_masks,
    triton_module,
)

from lag_triton.kernels import get_ops, reference, resolve_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def ops():
    try:
        return get_ops(resolve_backend("triton", DEVICE))
    except (RuntimeError, ImportError) as exc:
        pytest.skip(f"the Triton backend is unavailable here: {exc}")


@pytest.fixture
def filtering(ops, monkeypatch):
    """The arrow_filter module, with the path switched on and every launch of it recorded."""
    mod = triton_module(ops, "arrow_filter")
    arrow = triton_module(ops, "arrow_topk")
    calls = []
    run = arrow.filtered_arrow_topk
    monkeypatch.setattr(arrow, "filtered_arrow_topk", lambda *a, **kw: calls.append(a[7]) or run(*a, **kw))
    monkeypatch.setenv("LAG_TRITON_FILTER_GEMM", "1")
    monkeypatch.setattr(mod, "calls", calls, raising=False)
    monkeypatch.setattr(triton_module(ops, "_common"), "_ticket_buffers", {})  # see _kept_its_counts_apart
    return mod


def _kept_its_counts_apart(ops):
    """The survivor counts live from the GEMM's launch to the finish's: in a buffer of the call's own,
    not the stream's cached ticket counters (an interleaved launch or an interrupted call would corrupt
    those for every later launch)."""
    assert triton_module(ops, "_common")._ticket_buffers == {}


def _plan(mod, n, seed, cap):
    """filter_plan's launch constants with a chosen sample size and buffer."""
    return dict(mod.filter_config(), SEED=seed, STRIDE=n // seed, CAP=cap)


def _run(mod, x, p, k, plan, allowed=None, scope=None):
    """filtered_arrow_topk with an explicit plan (arrow_topk's GEMM + select for the sample)."""
    arrow = __import__("sys").modules[mod.__name__.rsplit(".", 1)[0] + ".arrow_topk"]
    idx = torch.empty((x.shape[0], k), dtype=torch.int32, device=x.device)
    scores = torch.empty((x.shape[0], k), dtype=torch.float32, device=x.device)
    mod.filtered_arrow_topk(x, p, k, idx, scores, allowed, scope, plan, seed_topk=arrow.gemm_then_select)
    return idx, scores


def _survivors(x, p, k, plan, allowed=None, scope=None):
    """Per row, the adapters outside the sample that beat the sample's k-th best word (host, fp64;
    exact on integer data): what the GEMM's epilogue must append to the row's buffer."""
    n = p.shape[0]
    s = (x.double() @ p.double().T).abs().nan_to_num(nan=float("-inf")).cpu()
    ok = torch.ones_like(s, dtype=torch.bool) if allowed is None else allowed.cpu()[scope.long().cpu()]
    in_sample = torch.zeros(n, dtype=torch.bool)
    in_sample[torch.arange(plan["SEED"]) * plan["STRIDE"]] = True
    rows = []
    for row, allowed_row in zip(s, ok):
        outside = allowed_row & ~in_sample
        ranked = sorted((in_sample & allowed_row).nonzero().flatten().tolist(), key=lambda i: (-row[i].item(), i))
        if len(ranked) >= k:
            kth = ranked[k - 1]
            outside &= (row > row[kth]) | ((row == row[kth]) & (torch.arange(n) < kth))
        rows.append(set(outside.nonzero().flatten().tolist()))
    return rows


def _buffered(mod, monkeypatch):
    """Record, as the finish kernel is launched, each row's survivor count and buffered adapters."""
    seen = {}
    finish = mod._finish_kernel

    class _Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                buf, counts = args[4], args[5]
                t, cap = buf.shape
                seen["counts"] = counts[:t].tolist()
                words = buf.cpu()
                seen["adapters"] = [
                    [0x7FFFFFFF - (w & 0xFFFFFFFF) for w in words[r, : min(c, cap)].tolist()]
                    for r, c in enumerate(seen["counts"])
                ]
                return finish[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(mod, "_finish_kernel", _Spy())
    return seen


def _check_buffers(seen, expected, cap):
    """The epilogue appended exactly the expected survivors of each row (all of them while they fit)."""
    assert seen["counts"] == [len(e) for e in expected]
    for got, want in zip(seen["adapters"], expected):
        assert len(got) == len(set(got)) and set(got) <= want
        if len(want) <= cap:
            assert set(got) == want


def _check_exact(idx, scores, x, p, k, allowed=None, scope=None):
    ref_idx, ref_scores = reference.arrow_topk(x, p, k, allowed, scope)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, atol=0, rtol=0)


GPU_ONLY = pytest.mark.skipif(DEVICE != "cuda", reason="a library past the GPU limits: minutes under the interpreter")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "t,n,d,k",
    [
        (1, 1001, 2049, 20),
        (7, 1001, 65, 5),
        (133, 300, 24, 16),
        (3, 520, 40, 1),
        pytest.param(133, 20001, 256, 20, marks=GPU_ONLY),
        pytest.param(300, 65537, 3072, 20, marks=GPU_ONLY),
    ],
)
def test_filtered_arrow_topk_matches_reference(ops, filtering, dtype, t, n, d, k):
    """arrow_topk with the path on, planned by filter_plan: random data, odd sizes, every output written."""
    x, p = randn(t, d, dtype=dtype, seed=1), randn(n, d, dtype=dtype, seed=2)
    if filtering.filter_plan(t, n, k) is None or not filtering.operands_fit(x, p):
        pytest.skip(f"the path takes no {dtype} T={t}, N={n}, d={d} on this device ({filtering.GPU_LIMITS})")
    poison_allocator()
    idx, scores = ops.arrow_topk(x, p, k)
    assert len(filtering.calls) == 1
    ref_idx, ref_scores = reference.arrow_topk(x, p, k)
    true = (x.double() @ p.double().T).abs()
    tol = red_tol(x, p)
    assert_same_ranking(idx, ref_idx, true, tol)
    torch.testing.assert_close(scores.double(), true.gather(1, idx.long()), atol=tol, rtol=0)
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "duplicate indices in a row"
    _kept_its_counts_apart(ops)


def _planted(t, n, k, plan, winners, ramp_rows):
    """Integer prototypes. Feature 0: small noise, k sampled adapters at 900 (the sample's k-th best:
    only the planted winners outside the sample beat it) and the `winners` from 1000 down in equal
    pairs (the lower index must come first). Feature 1: the index modulo the sample stride, which
    the rows in `ramp_rows` read -- the sample scores 0 there, so every other adapter beats its
    k-th best and those rows' buffers overflow."""
    stride, seed = plan["STRIDE"], plan["SEED"]
    p = int_tensor(n, 8, lo=-2, hi=3, seed=5)
    p[:, 0] = torch.randint(-5, 6, (n,), generator=torch.Generator().manual_seed(6)).float().to(DEVICE)
    strong = [j * stride for j in range(seed) if j * stride not in winners][:k]
    p[strong, 0] = 900
    for rank, i in enumerate(winners):
        p[i, 0] = 1000 - 10 * (rank // 2)
    p[:, 1] = (torch.arange(n) % stride).float().to(DEVICE)
    x = torch.zeros(t, 8, device=DEVICE)
    x[:, 0] = 1
    for r in ramp_rows:
        x[r] = 0
        x[r, 1] = 1
    return x, p


@pytest.mark.parametrize("flat_slots", [False, True])  # the atomic's form depends on the Triton release
@pytest.mark.parametrize("t,n,k,seed,cap", [(5, 1001, 20, 32, 64), (18, 700, 5, 16, 32), (2, 257, 1, 64, 32)])
def test_filter_planted_winners_and_overflowing_rows(ops, filtering, monkeypatch, t, n, k, seed, cap, flat_slots):
    """Winners in the sample, beside it (exact ties across it), on tile edges and in the last partial
    tile; rows whose buffers overflow (rescored: every adapter again) next to rows whose buffers do not."""
    monkeypatch.setattr(filtering, "FLAT_SLOTS", flat_slots)
    plan = _plan(filtering, n, seed, cap)
    stride, block_n = plan["STRIDE"], plan["BLOCK_N"]
    edges = [n - 1, n - 2, 0, block_n - 1, block_n, 2 * block_n + 1, (n // block_n) * block_n]
    sampled = [j * stride for j in (1, 2, seed - 1)]
    beside = [i + 1 for i in sampled] + [i - 1 for i in sampled]  # tie partners across the sample's edge
    winners = list(dict.fromkeys(w for w in edges + sampled + beside if 0 <= w < n))[: k + 4]
    x, p = _planted(t, n, k, plan, winners, ramp_rows=range(1, t, 2))
    expected = _survivors(x, p, k, plan)
    sizes = [len(e) for e in expected]
    assert max(sizes) > cap and min(sizes) <= cap, sizes  # both kinds of row are exercised
    seen = _buffered(filtering, monkeypatch)
    idx, scores = _run(filtering, x, p, k, plan)
    _check_buffers(seen, expected, cap)
    _check_exact(idx, scores, x, p, k)
    _kept_its_counts_apart(ops)


def test_filter_row_chunks(ops, filtering, monkeypatch):
    """Survivor buffers bounded by SCORE_CHUNK_BYTES: the tokens go in chunks of 2 (the last one
    partial), overflowing rows among them, with the answer of one chunk."""
    from lag_triton.kernels import common

    t, n, k, seed, cap = 5, 1001, 20, 32, 64
    plan = _plan(filtering, n, seed, cap)
    x, p = _planted(t, n, k, plan, [0, 500, 999], ramp_rows=(1, 4))
    monkeypatch.setattr(common, "SCORE_CHUNK_BYTES", 2 * 8 * cap)
    launched = []
    gemm = filtering._filter_gemm_kernel

    class _Count:
        def __getitem__(self, grid):
            launched.append(grid)
            return gemm[grid]

    monkeypatch.setattr(filtering, "_filter_gemm_kernel", _Count())
    idx, scores = _run(filtering, x, p, k, plan)
    assert len(launched) == 3
    _check_exact(idx, scores, x, p, k)
    _kept_its_counts_apart(ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filter_ties_nan_inf(ops, filtering, dtype):
    """Exact ties (all-zero rows, duplicated prototypes in and out of the sample), NaN prototypes and
    tokens, infinite scores: the reference's order exactly, with and without overflowing buffers."""
    n, d, k = 600, 32, 20
    p = int_tensor(n, d, dtype=dtype, seed=60)
    p[37] = p[0]  # sample (stride 18 or 37) and outside it
    p[36] = -p[0]
    p[5, 3] = float("nan")
    p[74, 4] = float("nan")
    p[200, 9] = float("inf")
    x = int_tensor(6, d, dtype=dtype, seed=61)
    x[1] = 0  # every score ties at 0
    x[2, 7] = float("nan")  # every score NaN
    x[3] = p[0]
    for seed, cap in ((16, 512), (32, 32)):
        plan = _plan(filtering, n, seed, cap)
        idx, scores = _run(filtering, x, p, k, plan)
        _check_exact(idx, scores, x, p, k)
    _kept_its_counts_apart(ops)


@pytest.mark.parametrize("t,n,k,seed,cap", [(1, 1001, 20, 32, 1024), (7, 300, 5, 16, 32), (40, 200, 16, 16, 64)])
def test_filter_scoped(ops, filtering, monkeypatch, t, n, k, seed, cap):
    """Scopes: a row allowing nothing, fewer than k, everything, ~30%; in the sample's top k, the
    epilogue and the rescoring alike, disallowed adapters never appear and missing ones are -1 / NaN."""
    x, p = int_tensor(t, 24, seed=80), int_tensor(n, 24, seed=81)
    allowed = scope_masks(5, n, k, seed=82)
    scope = (torch.arange(t) % 6).to(torch.int32).to(DEVICE)  # 5: out of range, allows nothing
    plan = _plan(filtering, n, seed, cap)
    seen = _buffered(filtering, monkeypatch)
    idx, scores = _run(filtering, x, p, k, plan, allowed, scope)
    in_range = scope.clamp(max=4)
    expected = _survivors(x, p, k, plan, allowed, in_range)
    _check_buffers(seen, [e if s < 5 else set() for e, s in zip(expected, scope.tolist())], cap)
    ref_idx, ref_scores = reference.arrow_topk(x, p, k, allowed, in_range)
    ref_idx[scope == 5], ref_scores[scope == 5] = -1, float("nan")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, equal_nan=True, atol=0, rtol=0)
    _kept_its_counts_apart(ops)


def test_filter_plan_bounds(ops, filtering):
    """The plan: a sample sized for the expected survivors, a buffer 4x that, None for small
    libraries, small batches and k beyond MAX_K_PAD."""
    limits = filtering.GPU_LIMITS if DEVICE == "cuda" else filtering.INTERPRETER_LIMITS
    n = 64 * limits["n"]
    plan = filtering.filter_plan(limits["t"], n, 20)
    assert plan["SEED"] * plan["STRIDE"] <= n < plan["SEED"] * (plan["STRIDE"] + 1)
    assert 20 * n / plan["SEED"] <= limits["survivors"]
    assert plan["CAP"] >= 4 * 20 * n / plan["SEED"]
    assert filtering.filter_plan(limits["t"], limits["n"] - 1, 20) is None
    assert filtering.filter_plan(limits["t"], n, 2 * filtering.MAX_K_PAD) is None
    if limits["t"] > 1:
        assert filtering.filter_plan(limits["t"] - 1, n, 20) is None

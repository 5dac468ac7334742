"""Tests specific to the CUDA C++ backend (csrc/).

The backend-generic equivalence suite is tests/test_kernels.py; this file adds what is specific
to csrc/: the N-split + merge path and buffer flushes of the Arrow select, the scalar (unaligned /
odd d_in) load paths, k > 128 fallback, spectr-size k, the grouped (counting-sort) rerank, exact
ties / NaN ordering, and on a GPU the binding's error messages, CUDA-graph capture and timings
(LAG_TRITON_BENCH=1). Without a GPU the kernels run on the CPU under the emulator
(tests/emulated_cuda.py), with the same launch plans (sized for a 132-SM GPU).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emulated_cuda import use_emulated_backend
from kernel_data import DEVICE, EPS32

from lag_triton.kernels import reference as ref

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cu():
    """The cuda backend module; without a GPU its kernels run under the CPU emulator."""
    from lag_triton.kernels import cuda

    with pytest.MonkeyPatch.context() as mp:
        if DEVICE == "cpu":
            use_emulated_backend(mp)
        else:
            reason = cuda.extension_unavailable_reason()
            if reason is not None:
                pytest.fail(f"CUDA device present but the extension is unavailable: {reason}")
        yield cuda


def _tol(dtype):
    """y is rounded to its dtype after an fp32 sum: allow one ulp of that dtype."""
    return {
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    }[dtype]


def _check_topk(idx, scores, x, p, k):
    """idx/scores vs the reference, tolerating order swaps only between (near-)equal scores."""
    ridx, rscores = ref.arrow_topk(x, p, k)
    assert idx.dtype == torch.int32 and scores.dtype == torch.float32
    assert idx.shape == ridx.shape and scores.shape == rscores.shape
    assert bool(((idx >= 0) & (idx < p.shape[0])).all())
    full = (x.float() @ p.float().T).abs()
    mine = full.gather(1, idx.long())
    torch.testing.assert_close(scores, mine, rtol=1e-4, atol=1e-4, equal_nan=True)
    torch.testing.assert_close(scores, rscores, rtol=1e-4, atol=1e-4, equal_nan=True)
    # rows have distinct indices
    assert bool((idx.sort(dim=1).values.diff(dim=1) != 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "t,n,d,k",
    [(1, 20, 64, 20), (1, 3000, 256, 20), (5, 700, 72, 128), (33, 300, 128, 7), (2, 50, 37, 10), (300, 1000, 96, 20)],
)
def test_arrow_topk_matches_reference(cu, dtype, t, n, d, k):
    g = torch.Generator(device=DEVICE).manual_seed(t * 1000 + n)
    x = torch.randn(t, d, device=DEVICE, generator=g).to(dtype)
    p = torch.randn(n, d, device=DEVICE, generator=g).to(dtype)
    idx, scores = cu.arrow_topk(x, p, k)
    _check_topk(idx, scores, x, p, k)


@pytest.mark.parametrize("t,n", [(1, 1000), (3, 257), (20, 5000), (64, 100)])
def test_arrow_exact_ties_and_nan(cu, t, n):
    """Integer data: exact scores, many ties -> exactly the reference order (lower index first)."""
    g = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randint(-2, 3, (t, 16), device=DEVICE, generator=g).float()
    p = torch.randint(-2, 3, (n, 16), device=DEVICE, generator=g).float()
    p[n // 2, 3] = float("nan")
    p[7, 0] = float("nan")
    for k in (1, 20, min(128, n)):
        idx, scores = cu.arrow_topk(x, p, k)
        ridx, rscores = ref.arrow_topk(x, p, k)
        assert torch.equal(idx, ridx), k
        torch.testing.assert_close(scores, rscores, equal_nan=True)
    # all NaN: indices must still be valid (0..k-1)
    idx, scores = cu.arrow_topk(x, torch.full_like(p, float("nan")), 5)
    assert torch.equal(idx, torch.arange(5, device=DEVICE, dtype=torch.int32).expand(t, 5))
    assert bool(scores.isnan().all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "t,n,d,k,x_off",
    [
        (1, 3000, 64, 20, 0),
        (3, 257, 61, 9, 1),
        (16, 1000, 64, 20, 0),
        (33, 257, 61, 128, 0),
        (133, 1001, 96, 20, 1),
        (17, 5000, 48, 7, 0),
        (2048, 300, 40, 1, 3),
        (40, 129, 8, 128, 0),
    ],
)
def test_arrow_gemm_select_exact(cu, dtype, t, n, d, k, x_off):
    """Arrow scores with one cuBLAS GEMM and takes the top-k with the filtered select kernel. Small
    integers are exact in both dtypes and their dot products exact in fp32, so idx must equal the
    reference's exactly (ties -> lower index, NaN last), across ragged d_in, unaligned x (x_off),
    partial rounds and N splits."""
    g = torch.Generator(device=DEVICE).manual_seed(t * 31 + n + d)
    xb = torch.randint(-2, 3, (t * d + x_off,), device=DEVICE, generator=g).to(dtype)
    x = xb[x_off:].view(t, d)
    p = torch.randint(-2, 3, (n, d), device=DEVICE, generator=g).to(dtype)
    p[n // 2, d // 2] = float("nan")
    x[t // 2, 0] = float("nan")  # every score of that token is NaN: indices 0..k-1
    idx, scores = cu.arrow_topk(x, p, k)
    ridx, rscores = ref.arrow_topk(x, p, k)
    assert torch.equal(idx, ridx), _topk_report(idx, scores, x, p, k)
    torch.testing.assert_close(scores, rscores, equal_nan=True)


@pytest.mark.parametrize("order", ["ascending", "equal", "ulps"])
@pytest.mark.parametrize("t,n,k", [(16, 20000, 20), (40, 5000, 128), (300, 3000, 1), (1, 40000, 100)])
def test_arrow_select_buffer_flushes_exact(cu, order, t, n, k):
    """Score orders that stress the select: ascending (every score survives: the shared buffer fills
    and is merged every round), all equal (ties by index only), one ulp apart (an off-by-one
    threshold drops winners); with N splits at small T (at T = 1, N = 40000: 10 splits of 128 keys,
    which the merge kernel takes in 4 batches)."""
    ramp = {
        "ascending": torch.arange(n, device=DEVICE).float(),
        "equal": torch.ones(n, device=DEVICE),
        "ulps": 1
        + torch.finfo(torch.float32).eps
        * torch.minimum(torch.arange(n, device=DEVICE), torch.tensor(3000, device=DEVICE)).float(),
    }[order]
    p = torch.zeros(n, 8, device=DEVICE)
    p[:, 0] = ramp
    x = torch.zeros(t, 8, device=DEVICE)
    x[:, 0] = 1
    idx, scores = cu.arrow_topk(x, p, k)
    ridx, rscores = ref.arrow_topk(x, p, k)
    assert torch.equal(idx, ridx), _topk_report(idx, scores, x, p, k)
    torch.testing.assert_close(scores, rscores, atol=0, rtol=0)


@pytest.mark.parametrize("k", [16, 128])
def test_arrow_select_threshold_after_a_flush_is_the_kth_best(cu, k):
    """The running threshold after a flush must be exactly the k-th best (k a power of two: no slack
    in the buffer). Planted: the k best of the first two rounds score 1000 .. 1000 + k - 1; after
    the flush one key scores 1000.5, between the k-th and the (k-1)-th, and must be the k-th answer."""
    t, n = 3, 4096  # one split of 4 rounds of 1,024: the buffer is flushed before round 3
    p = torch.zeros(n, 8, device=DEVICE)
    p[:k, 0] = 1000 + torch.arange(k, device=DEVICE).float()
    p[2500, 0] = 1000.5
    x = torch.zeros(t, 8, device=DEVICE)
    x[:, 0] = 1
    idx, scores = cu.arrow_topk(x, p, k)
    ridx, rscores = ref.arrow_topk(x, p, k)
    assert ridx[0, -1] == 2500
    assert torch.equal(idx, ridx), _topk_report(idx, scores, x, p, k)
    torch.testing.assert_close(scores, rscores, atol=0, rtol=0)


def test_arrow_unaligned_and_mixed_dtypes(cu):
    buf = torch.randn(3 * 64 + 1, device=DEVICE, dtype=torch.bfloat16)
    x = buf[1:].view(3, 64)  # contiguous but not 16-byte aligned
    p = torch.randn(90, 64, device=DEVICE, dtype=torch.float32)
    idx, scores = cu.arrow_topk(x, p, 9)
    _check_topk(idx, scores, x, p, 9)


def _topk_report(idx, scores, x, p, k):
    """Diagnostics for a failed top-k comparison (printed into the assertion message)."""
    ridx, rscores = ref.arrow_topk(x, p, k)
    full = (x.float() @ p.float().T).abs()
    return (
        f"x {x.dtype} ptr%16={x.data_ptr() % 16} p {p.dtype} ptr%16={p.data_ptr() % 16}\n"
        f"idx\n{idx.cpu()}\nref idx\n{ridx.cpu()}\nscores\n{scores.cpu()}\nref scores\n{rscores.cpu()}\n"
        f"true scores of idx\n{full.gather(1, idx.long().clamp(0, p.shape[0] - 1)).cpu()}"
    )


# Few tokens, N split over blocks (a last split holding 2 adapters) and merged, mixed dtypes (promoted
# to fp32) and unaligned x / P, each factor separately so that a failure names the culprit. The one
# failure of the first H100 run was in this family (test_arrow_unaligned_and_mixed_dtypes, details not
# captured), in the fused decode kernel that the GEMM + select has since replaced.
@pytest.mark.parametrize(
    "xdt,pdt",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("x_off,p_off", [(0, 0), (1, 0), (0, 1), (3, 5)])
@pytest.mark.parametrize(
    "t,n,d,k",
    [
        (3, 90, 64, 9),
        (3, 90, 64, 8),
        (3, 90, 64, 16),
        (1, 90, 64, 9),
        (2, 90, 64, 9),
        (3, 90, 61, 9),
        (5, 97, 64, 9),
        (3, 17, 64, 9),
    ],
)
def test_arrow_split_merge_offsets_dtypes(cu, xdt, pdt, x_off, p_off, t, n, d, k):
    g = torch.Generator(device=DEVICE).manual_seed(t * 7919 + n * 31 + d + k)
    xb = torch.randn(t * d + x_off, device=DEVICE, generator=g).to(xdt)
    pb = torch.randn(n * d + p_off, device=DEVICE, generator=g).to(pdt)
    x = xb[x_off:].view(t, d)
    p = pb[p_off:].view(n, d)
    idx, scores = cu.arrow_topk(x, p, k)
    try:
        _check_topk(idx, scores, x, p, k)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_topk_report(idx, scores, x, p, k)}") from None
    # same answer as the kernel on aligned fp32 copies (isolates the promotion / unaligned load paths)
    idx32, scores32 = cu.arrow_topk(x.float().clone(), p.float().clone(), k)
    torch.testing.assert_close(
        scores, scores32, rtol=1e-4, atol=1e-4, msg=lambda m: m + "\n" + _topk_report(idx32, scores32, x, p, k)
    )


def test_arrow_large_k_falls_back(cu):
    x = torch.randn(4, 32, device=DEVICE)
    p = torch.randn(400, 32, device=DEVICE)
    idx, scores = cu.arrow_topk(x, p, 200)
    _check_topk(idx, scores, x, p, 200)


def _rerank_case(dtype, t, n, r, d, k, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(t, d, device=DEVICE, generator=g).to(dtype)
    a = torch.randn(n, r, d, device=DEVICE, generator=g).to(dtype)
    cand = torch.stack([torch.randperm(n, device=DEVICE, generator=g)[:k] for _ in range(t)]).int()
    return x, a, cand


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combine", ["softmax", "uniform"])
@pytest.mark.parametrize(
    "t,n,r,d,k,m",
    [
        (1, 50, 6, 64, 20, 1),
        (7, 40, 6, 72, 20, 3),
        (64, 300, 16, 128, 300, 4),
        (300, 40, 13, 2049, 10, 3),  # grouped by adapter: ~75 pairs each (runs across tiles), 2 row groups
        (3, 30, 9, 33, 12, 12),
        (2, 10, 130, 40, 5, 2),
    ],
)
def test_spectr_rerank_matches_reference(cu, dtype, combine, t, n, r, d, k, m):
    x, a, cand = _rerank_case(dtype, t, n, r, d, k, seed=t + n)
    sel, w, z = cu.spectr_rerank(x, a, cand, m, combine, 0.7)
    rsel, rw, rz = ref.spectr_rerank(x, a, cand, m, combine, 0.7)
    assert sel.dtype == torch.int32 and w.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.equal(sel, rsel)  # random data: no near-ties among norms
    torch.testing.assert_close(z, rz, rtol=1e-4, atol=1e-3)
    # w = softmax(key / 0.7) over the picks' keys, the norms of their z. A key error dk moves w by at
    # most 2 max|dk| / 0.7 (to first order); at d = 2049 the norms are ~160, so fp32 summation order
    # alone moves w by ~1e-4: w must equal the weights of the kernel's own keys to their rounding,
    # and the reference's within what the keys differ by.
    key, ref_key = z.norm(dim=-1), rz.norm(dim=-1)
    own = torch.softmax(key / 0.7, dim=-1) if combine == "softmax" else torch.full_like(w, 1 / m)
    torch.testing.assert_close(w, own, rtol=0, atol=8 * EPS32 * float(key.max()) / 0.7 + EPS32)
    key_error = float((key - ref_key).abs().max())
    torch.testing.assert_close(w, rw, rtol=0, atol=2 * key_error / 0.7 + 8 * EPS32 * float(key.max()) / 0.7 + EPS32)


def test_spectr_rerank_grouped_scan_spans_rounds(cu):
    """The grouped rerank's one-block scan takes 16,384 adapter counts per round: with 20,000 adapters
    (the pairs on 40 of them, spread over the whole id range) segments past the first round are
    placed by the carry between rounds."""
    t, n, r, d, k = 512, 20000, 2, 16, 40  # T*k = 20480 >= N: grouped
    g = torch.Generator(device=DEVICE).manual_seed(11)
    x = torch.randn(t, d, device=DEVICE, generator=g).to(torch.bfloat16)
    a = torch.randn(n, r, d, device=DEVICE, generator=g).to(torch.bfloat16)
    ids = torch.linspace(0, n - 1, k, device=DEVICE).round().int()
    cand = torch.stack([ids[torch.randperm(k, device=DEVICE, generator=g)] for _ in range(t)])
    sel, w, z = cu.spectr_rerank(x, a, cand, 2, "softmax", 0.7)
    rsel, rw, rz = ref.spectr_rerank(x, a, cand, 2, "softmax", 0.7)
    assert torch.equal(sel, rsel)
    torch.testing.assert_close(z, rz, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w, rw, rtol=1e-4, atol=1e-5)


def test_spectr_rerank_candidate_scores_ties_nan(cu):
    x, a, cand = _rerank_case(torch.float32, 4, 60, 6, 32, 16, seed=3)
    scores = torch.randint(-2, 3, (4, 16), device=DEVICE).float()
    scores[0, 3] = float("nan")
    scores[1, 5] = float("-inf")
    scores[2, 0] = -0.0
    for m in (1, 5, 16):
        sel, w, z = cu.spectr_rerank(x, a, cand, m, "softmax", 2.0, scores)
        rsel, rw, rz = ref.spectr_rerank(x, a, cand, m, "softmax", 2.0, scores)
        assert torch.equal(sel, rsel), m
        torch.testing.assert_close(w, rw, equal_nan=True)
        torch.testing.assert_close(z, rz, rtol=1e-4, atol=1e-4)
    # duplicate candidates: ties broken by slot, as the reference's stable sort does
    cand2 = cand.clone()
    cand2[:, 1] = cand2[:, 0]
    s2 = torch.zeros(4, 16, device=DEVICE)
    sel, _, _ = cu.spectr_rerank(x, a, cand2, 4, "uniform", 1.0, s2)
    rsel, _, _ = ref.spectr_rerank(x, a, cand2, 4, "uniform", 1.0, s2)
    assert torch.equal(sel, rsel)


@pytest.mark.parametrize("ydtype", DTYPES)
@pytest.mark.parametrize(
    "t,n,dout,r,m",
    [(1, 20, 8192, 6, 1), (5, 7, 100, 6, 2), (70, 30, 1000, 16, 3), (3, 4, 33, 1, 1), (2, 5, 64, 130, 2)],
)
def test_lora_apply_matches_reference(cu, ydtype, t, n, dout, r, m):
    g = torch.Generator(device=DEVICE).manual_seed(t + dout)
    y = torch.randn(t, dout, device=DEVICE, generator=g).to(ydtype)
    b = torch.randn(n, dout, r, device=DEVICE, generator=g).to(ydtype)
    sel = torch.randint(0, n, (t, m), device=DEVICE, generator=g).int()
    w = torch.rand(t, m, device=DEVICE, generator=g)
    z = torch.randn(t, m, r, device=DEVICE, generator=g)
    expect = ref.lora_apply(y.clone(), b, sel, w, z)
    out = y.clone()
    ret = cu.lora_apply(out, b, sel, w, z)
    assert ret.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, expect, **_tol(ydtype))


def test_lora_apply_noncontiguous_y_and_mixed_dtype(cu):
    y = torch.randn(10, 64, device=DEVICE, dtype=torch.bfloat16).t()  # [64, 10], not contiguous
    assert not y.is_contiguous()
    b = torch.randn(3, 10, 6, device=DEVICE, dtype=torch.float32)
    sel = torch.randint(0, 3, (64, 1), device=DEVICE).int()
    w = torch.ones(64, 1, device=DEVICE)
    z = torch.randn(64, 1, 6, device=DEVICE)
    expect = ref.lora_apply(y.clone(), b, sel, w, z)
    ret = cu.lora_apply(y, b, sel, w, z)
    assert ret is y
    torch.testing.assert_close(y, expect, **_tol(torch.bfloat16))


_BINDING_ERROR_SCRIPT = r"""
import sys
import torch
from lag_triton.kernels import cuda as cu

ext = cu._load()
s = torch.cuda.current_stream().cuda_stream
x = torch.randn(2, 16, device="cuda")
full = torch.randn(2, 8, device="cuda")  # Arrow scores [T, N]
idx = torch.empty(2, 3, device="cuda", dtype=torch.int64)
sc = torch.empty(2, 3, device="cuda")
y = torch.randn(2, 8, device="cuda")
b = torch.randn(4, 8, 3, device="cuda")
sel1 = torch.zeros(2, 1, device="cuda", dtype=torch.int32)
w1 = torch.ones(2, 1, device="cuda")
cases = [
    ("idx must be Int", lambda: ext.arrow_select(full, 3, idx, sc, None, None, s)),
    ("scores must be contiguous",
     lambda: ext.arrow_select(torch.randn(8, 2, device="cuda").t(), 3, idx.int(), sc, None, None, s)),
    ("out_scores must have shape",
     lambda: ext.arrow_select(full, 3, idx.int(), torch.empty(2, 4, device="cuda"), None, None, s)),
    ("scores must be a CUDA tensor", lambda: ext.arrow_select(full.cpu(), 3, idx.int(), sc, None, None, s)),
    ("k <= 128", lambda: ext.arrow_select(torch.randn(2, 300, device="cuda"), 200, idx.int(), sc, None, None, s)),
    ("scores must be Float", lambda: ext.arrow_select(full.half(), 3, idx.int(), sc, None, None, s)),
    ("z must have shape", lambda: ext.lora_apply(y, b, sel1, w1, torch.zeros(2, 1, 4, device="cuda"), s)),
    ("b_star has dtype", lambda: ext.lora_apply(y, b.double(), sel1, w1, torch.zeros(2, 1, 3, device="cuda"), s)),
    ("candidates must be Int", lambda: ext.spectr_rerank(x, torch.randn(8, 2, 16, device="cuda"), idx, 1, False,
                                                         1.0, None, sel1, w1, torch.empty(2, 1, 2, device="cuda"), s)),
    ("x and a_star of one dtype", lambda: ext.spectr_rerank(x, torch.randn(8, 2, 16, device="cuda").half(), idx.int(),
                                                             1, False, 1.0, None, sel1, w1,
                                                             torch.empty(2, 1, 2, device="cuda"), s)),
    ("temperature must be > 0", lambda: ext.spectr_rerank(x, torch.randn(8, 2, 16, device="cuda"), idx.int(), 1,
                                                          False, 0.0, None, sel1, w1,
                                                          torch.empty(2, 1, 2, device="cuda"), s)),
]
for want, call in cases:
    msg = call()
    assert isinstance(msg, str) and want in msg, (want, msg)
    try:
        cu.raise_on_error(msg)
    except RuntimeError as exc:
        assert want in str(exc), (want, str(exc))
    else:
        raise AssertionError(f"raise_on_error did not raise for {want!r}")
    print("ok:", msg, flush=True)
# a valid call after the errors still works and reports success
assert ext.arrow_select(full, 3, idx.int(), sc, None, None, s) == ""
torch.cuda.synchronize()
print("BINDING_ERRORS_OK", flush=True)
"""


@gpu_only
def test_binding_error_messages():
    """Binding errors come back as messages (RuntimeError in Python), never a crash.

    Runs in a subprocess so that even a hard crash fails only this test instead of killing the
    suite. Two crashes were seen on the H100 (bench/results/*-pytest.txt): first when the binding
    threw c10::Error through pybind11, then on the first message holding a number (sizes/strides
    formatted through c10::str's ostringstream); the binding now formats without iostreams.
    """
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONFAULTHANDLER", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _BINDING_ERROR_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=1800
    )
    report = (
        f"exit code {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )
    assert proc.returncode == 0, report
    assert "BINDING_ERRORS_OK" in proc.stdout, report
    assert proc.stdout.count("ok: lag_triton cuda backend: ") == 11, report


@gpu_only
def test_wrapper_raises_runtime_error_from_binding(cu, monkeypatch):
    """A binding error reaching the public op surfaces as RuntimeError with the message."""
    ext = cu._load()

    assert getattr(ext, "ERROR_CONTRACT", None) == "return-string", "stale extension build (old binding)"

    class Failing:
        def __getattr__(self, name):
            return lambda *args, **kwargs: "lag_triton cuda backend: injected"

    monkeypatch.setattr(cu, "_load", lambda: Failing())
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="injected"):
        cu.arrow_topk(x, torch.randn(8, 16, device=DEVICE), 3)


def test_empty_batch(cu):
    x = torch.randn(0, 16, device=DEVICE)
    p = torch.randn(8, 16, device=DEVICE)
    idx, sc = cu.arrow_topk(x, p, 3)
    assert idx.shape == (0, 3)
    sel, w, z = cu.spectr_rerank(x, torch.randn(8, 2, 16, device=DEVICE), idx, 2)
    assert z.shape == (0, 2, 2)
    y = torch.randn(0, 5, device=DEVICE)
    cu.lora_apply(y, torch.randn(8, 5, 2, device=DEVICE), sel, w, z)


@gpu_only
def test_cuda_graph_capture(cu):
    """No host sync on the forward path: the three ops capture and replay in a CUDA graph."""
    t, n, d, r, dout, k = 4, 200, 128, 6, 256, 20
    x = torch.randn(t, d, device=DEVICE, dtype=torch.bfloat16)
    p = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(n, r, d, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, dout, r, device=DEVICE, dtype=torch.bfloat16)
    y = torch.zeros(t, dout, device=DEVICE, dtype=torch.bfloat16)

    def step():
        idx, _ = cu.arrow_topk(x, p, k)
        sel, w, z = cu.spectr_rerank(x, a, idx, 2)
        y.zero_()
        cu.lora_apply(y, b, sel, w, z)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (and JIT) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    idx, _ = ref.arrow_topk(x, p, k)
    sel, w, z = ref.spectr_rerank(x, a, idx, 2)
    expect = ref.lora_apply(torch.zeros_like(y), b, sel, w, z)
    torch.testing.assert_close(y, expect, **_tol(torch.bfloat16))


@gpu_only
@pytest.mark.skipif(os.environ.get("LAG_TRITON_BENCH", "0") in ("", "0"), reason="set LAG_TRITON_BENCH=1")
@pytest.mark.parametrize("t", [1, 8, 32, 512, 2048])
def test_bench_vs_triton(cu, t):
    """Timings (H100 target shape: bf16, d_in=3072, d_out=8192, r=6, k=20, N=1000). Prints only."""
    n, d, dout, r, k = 1000, 3072, 8192, 6, 20
    dt = torch.bfloat16
    x = torch.randn(t, d, device=DEVICE, dtype=dt)
    p = torch.randn(n, d, device=DEVICE, dtype=dt)
    a = torch.randn(n, r, d, device=DEVICE, dtype=dt)
    b = torch.randn(n, dout, r, device=DEVICE, dtype=dt)
    y = torch.randn(t, dout, device=DEVICE, dtype=dt)
    backends = {"cuda": cu}
    try:
        from lag_triton.kernels import get_ops

        backends["triton"] = get_ops("triton")
    except Exception as exc:  # noqa: BLE001
        print(f"triton unavailable: {exc}")

    def timeit(fn, reps=50):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps * 1e3  # us

    for name, ops in backends.items():
        idx, _ = ops.arrow_topk(x, p, k)
        sel, w, z = ops.spectr_rerank(x, a, idx, 1)
        t_topk = timeit(functools.partial(ops.arrow_topk, x, p, k))
        t_rr = timeit(functools.partial(ops.spectr_rerank, x, a, idx, 1))
        t_ap = timeit(functools.partial(ops.lora_apply, y, b, sel, w, z))
        print(f"\n[{name}] T={t}: arrow_topk {t_topk:8.1f} us  spectr_rerank {t_rr:8.1f} us  lora_apply {t_ap:8.1f} us")

"""Token rows past 2**31 elements: a kernel's x / y row offsets must not wrap in 32 bits.

A long prompt through a wide layer puts x or y past 2**31 elements (Llama-3-70B's MLP, 28,672
wide: from ~75,000 tokens in one forward), where ``row * row_stride`` in int32 wraps and a kernel
reads or writes far outside its tensor. The tests make the same offsets cheaply: a few rows of a
view whose row stride is ~2**31 / T elements, over a storage the operating system commits lazily
(only the rows used are ever touched), so row T-1 starts past 2**31. Each case runs in a child
process, because a wrapped offset is a segfault under the interpreter or the emulator, and a
sticky illegal-address error on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import sys
    import pytest
    import torch
    sys.path[:0] = [{tests!r}]
    from lag_triton.kernels import use_triton_interpreter_without_gpu
    use_triton_interpreter_without_gpu()
    from lag_triton.kernels import reference
    from kernel_data import DEVICE, backend_ops, int_tensor

    def far_rows(rows, cols, dtype):
        # rows x cols view, row stride past 2**31 / (rows - 1): row rows-1 starts beyond 2**31 elements
        stride = (2**31) // (rows - 1) + 64
        storage = torch.empty((rows - 1) * stride + cols, dtype=dtype, device=DEVICE)
        return storage.as_strided((rows, cols), (stride, 1))

    mp = pytest.MonkeyPatch()
    ops = backend_ops({backend!r}, mp)
    t, n, d, r, k, m, d_out = {t}, 40, 24, 6, 5, 2, 40
    x = far_rows(t, d, torch.bfloat16)
    x.copy_(int_tensor(t, d, dtype=torch.bfloat16, seed=1))
    a = int_tensor(n, r, d, lo=-2, hi=3, dtype=torch.bfloat16, seed=2)
    cand = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:k] for i in range(t)])
    cand = cand.to(torch.int32).to(DEVICE)
    p = int_tensor(n, d, dtype=torch.bfloat16, seed=5)
    for fold in ("0", "1"):  # Triton: the GEMM + select, and the one-launch decode Arrow
        mp.setenv("LAG_TRITON_FOLD_SPLITS", fold)
        idx, _ = ops.arrow_topk(x, p, k)
        assert torch.equal(idx, reference.arrow_topk(x.contiguous(), p, k)[0]), "arrow of far rows"
    sel, w, z = ops.spectr_rerank(x, a, cand, m)
    ref = reference.spectr_rerank(x.contiguous(), a, cand, m)
    assert torch.equal(sel, ref[0]) and torch.equal(z, ref[2]), "rerank of far rows"
    y = far_rows(t, d_out, torch.bfloat16)
    y.copy_(int_tensor(t, d_out, dtype=torch.bfloat16, seed=3))
    b = int_tensor(n, d_out, r, dtype=torch.bfloat16, seed=4)
    want = reference.lora_apply(y.contiguous(), b, sel, torch.full_like(w, 0.5), z)
    ops.lora_apply(y, ops.prepare_b_star(b), sel, torch.full_like(w, 0.5), z)
    assert torch.equal(y, want), "apply to far rows"
    print("ok")
    """
)


def _run_child(code: str) -> None:
    """Run ``code`` in a fresh interpreter (its own backend and memory); it prints "ok" or skips."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    if "Skipped" in child.stderr and child.returncode != 0:
        pytest.skip(child.stderr.strip().splitlines()[-1])
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), (child.returncode, child.stderr[-3000:])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("t", [3, 64], ids=["decode", "grouped"])  # 64: the rerank and apply group by adapter
def test_row_offsets_past_int32(backend, t):
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] < 12 * 2**30:
        pytest.skip("needs two ~4 GiB tensors on the GPU")
    _run_child(CHILD.format(tests=str(TESTS), backend=backend, t=t))


RANK_STRIDE_CHILD = textwrap.dedent(
    """
    import sys
    import pytest
    import torch
    sys.path[:0] = [{tests!r}]
    from lag_triton.kernels import use_triton_interpreter_without_gpu
    use_triton_interpreter_without_gpu()
    from lag_triton.kernels import reference
    from kernel_data import DEVICE, backend_ops, int_tensor

    mp = pytest.MonkeyPatch()
    ops = backend_ops({backend!r}, mp)
    t, n, d_out, r = {t}, 3, 40, 3
    # B* [N, d_out, r] viewed from [r, N, d_out]-like storage: the rank stride stays an int32 argument
    # (< 2**31) while c * stride for c = 2 passes 2**31; the storage is committed lazily
    stride_r = 1_100_000_000
    storage = torch.empty(n * d_out + (r - 1) * stride_r, dtype=torch.bfloat16, device=DEVICE)
    b = storage.as_strided((n, d_out, r), (d_out, 1, stride_r))
    vals = int_tensor(n, d_out, r, dtype=torch.bfloat16, seed=1)
    b.copy_(vals)
    assert ops.prepare_b_star(b).data_ptr() == b.data_ptr()  # taken as it is: no copy to hide the offsets
    sel = (torch.arange(t * 2) % n).view(t, 2).to(torch.int32).to(DEVICE)
    sel[: t // 2, 0] = 1  # from 64 tokens on: sorted tiles that share one adapter, and mixed ones
    sel[:, 1] = (sel[:, 0] + 1) % n
    w = torch.full((t, 2), 0.5, device=DEVICE)
    z = int_tensor(t, 2, r, seed=2)
    y0 = int_tensor(t, d_out, dtype=torch.bfloat16, seed=3)
    want = reference.lora_apply(y0.clone(), vals, sel, w, z)
    y = ops.lora_apply(y0.clone(), b, sel, w, z)
    assert torch.equal(y, want), "apply with a rank stride past int32"
    print("ok")
    """
)


RERANK_RANK_STRIDE_CHILD = textwrap.dedent(
    """
    import sys
    import pytest
    import torch
    sys.path[:0] = [{tests!r}]
    from lag_triton.kernels import use_triton_interpreter_without_gpu
    use_triton_interpreter_without_gpu()
    from lag_triton.kernels import reference
    from kernel_data import DEVICE, backend_ops, int_tensor

    mp = pytest.MonkeyPatch()
    ops = backend_ops({backend!r}, mp)
    t, n, r, d, k = {t}, 3, 3, 24, 2
    # A* [N, r, d_in] viewed from [r, N, d_in]-like storage (committed lazily): c * stride for c = 2
    # passes 2**31
    stride_r = 1_100_000_000
    storage = torch.empty(n * d + (r - 1) * stride_r, dtype=torch.bfloat16, device=DEVICE)
    a = storage.as_strided((n, r, d), (d, stride_r, 1))
    vals = int_tensor(n, r, d, lo=-2, hi=3, dtype=torch.bfloat16, seed=2)
    a.copy_(vals)
    x = int_tensor(t, d, dtype=torch.bfloat16, seed=1)
    cand = (torch.arange(t * k) % n).view(t, k).to(torch.int32).to(DEVICE)
    cand[:, 1] = (cand[:, 0] + 1) % n
    got, want = ops.spectr_rerank(x, a, cand, 1), reference.spectr_rerank(x, vals, cand, 1)
    assert all(torch.equal(g, w) for g, w in zip(got, want)), "rerank with a rank stride past int32"
    print("ok")
    """
)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("t", [2, 64], ids=["split", "grouped"])
def test_rerank_rank_offsets_past_int32(backend, t):
    """A* in any layout: its rank offsets c * stride_ar are int32 in the Triton kernels, so the
    launcher copies a view whose rank stride would wrap (it crashed the interpreter: an illegal
    address on a GPU)."""
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] < 8 * 2**30:
        pytest.skip("needs a ~4.4 GB tensor on the GPU")
    _run_child(RERANK_RANK_STRIDE_CHILD.format(tests=str(TESTS), backend=backend, t=t))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("t", [2, 64], ids=["decode", "sorted"])
def test_apply_rank_offsets_past_int32(backend, t):
    """B* in any layout: c * stride_br must not wrap in 32 bits (a [r, N, d_out] library viewed as
    [N, d_out, r] has stride_br = N * d_out: 82M at N = 10k, d_out = 8192, so from rank 27 on)."""
    if torch.cuda.is_available() and torch.cuda.mem_get_info()[0] < 8 * 2**30:
        pytest.skip("needs a ~4.4 GB tensor on the GPU")
    _run_child(RANK_STRIDE_CHILD.format(tests=str(TESTS), backend=backend, t=t))

"""Test data and checks shared by the kernel test files (test_kernels.py, test_arrow_filter.py)."""

from __future__ import annotations

import pytest
import torch
from emulated_cuda import install_backend

from lag_triton.kernels import get_ops, resolve_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps


def backend_ops(name: str, mp: pytest.MonkeyPatch):
    """Backend ``name``'s ops on DEVICE, or a skip that says why it cannot run here. Without a GPU the
    cuda backend's kernels run on the CPU under the emulator (tests/emulated_cuda.py), installed
    with ``mp`` for the test's duration."""
    install_backend(name, DEVICE, mp)
    try:
        return get_ops(resolve_backend(name, DEVICE))
    except (RuntimeError, ImportError) as exc:
        pytest.skip(f"backend {name!r} unavailable here: {exc}")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(dtype).to(DEVICE)


def red_tol(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error bound of fp32 dot products of a's and b's rows (reduction over the last dim), x a safety factor."""
    d = a.shape[-1]
    mag = (a.double().abs().amax() * b.double().abs().amax()).item()
    return 16 * EPS32 * d * mag


def assert_same_ranking(idx, ref_idx, true_key, tol):
    """idx equals ref_idx except where the two picks' exact keys are within tol (fp32 near-ties)."""
    idx, ref_idx = idx.long().cpu(), ref_idx.long().cpu()
    true_key = true_key.double().cpu()
    diff = idx != ref_idx
    if diff.any():
        gap = (true_key.gather(1, idx) - true_key.gather(1, ref_idx)).abs()
        assert (gap[diff] <= tol).all(), f"ranking differs beyond tolerance {tol}: {gap[diff].max()}"


def poison_allocator() -> None:
    """Fill then free a block so that torch.empty outputs are likely to start as NaN."""
    junk = torch.full((1 << 20,), float("nan"), device=DEVICE)
    del junk


def int_tensor(*shape, lo=-3, hi=4, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Small integers: every fp32 dot product of them is exact, so ties are exact in any summation order."""
    return torch.randint(lo, hi, shape, generator=gen(seed)).to(dtype).to(DEVICE)


def scope_masks(s_rows, n, k, seed):
    """[S, N] bool: row 0 allows nothing, row 1 fewer than k adapters, row 2 every adapter, the rest a
    random ~30% (so some rows have fewer than k allowed too)."""
    g = gen(seed)
    allowed = torch.rand(s_rows, n, generator=g) < 0.3
    allowed[0] = False
    allowed[1] = False
    allowed[1, torch.randperm(n, generator=g)[: max(1, k // 2)]] = True
    allowed[2] = True
    return allowed.to(DEVICE)


def triton_module(ops, name):
    """The Triton backend's module ``name`` (its internals are what the test is about); skip for others."""
    if ops.name != "triton":
        pytest.skip("these launch paths are the Triton backend's")
    return __import__("sys").modules[f"{ops.module.__name__}.{name}"]


def tickets_all_zero(ops):
    common_mod = triton_module(ops, "_common")
    assert common_mod._ticket_buffers, "a folded launch took no ticket counters"
    for buf in common_mod._ticket_buffers.values():
        assert int(buf.count_nonzero()) == 0, "a folded launch left a ticket counter set"

"""The two changes lag_triton makes to the Triton interpreter (``lag_triton.kernels.triton._interpreter``):
nested @triton.jit calls no longer re-patch triton.language (``patch_language_once``, no result
changes), and fp32 <-> bf16 conversions round like the GPU's (``round_bf16_like_the_gpu``)."""

from __future__ import annotations

import pytest
import torch

from lag_triton.kernels import triton_interpreter_enabled

from factories import needs_triton

pytestmark = [
    pytest.mark.skipif(not triton_interpreter_enabled(), reason="runs kernels under TRITON_INTERPRET=1"),
    needs_triton,  # the shim is the Triton backend's (and the interpreter of a Triton it refuses differs)
]

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _twice_min(v):
    return 2 * tl.min(v, axis=0)  # tl.min: Triton's own library, whose globals name triton.language.core


@triton.jit
def _nested_kernel(x_ptr, out_ptr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + tl.program_id(0) * BLOCK + offs)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ROUNDS):
        acc += _twice_min(v + i)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + offs, acc)


def _patching_count(monkeypatch, rounds: int) -> int:
    from triton.runtime import interpreter as ti

    calls = []
    set_attr = ti._LangPatchScope.set_attr
    monkeypatch.setattr(ti._LangPatchScope, "set_attr", lambda self, *a: calls.append(1) or set_attr(self, *a))
    x = torch.randn(3, 16)
    out = torch.empty_like(x)
    _nested_kernel[(3,)](x, out, ROUNDS=rounds, BLOCK=16)
    expected = sum(2 * (x.min(dim=1, keepdim=True).values + i) for i in range(rounds)).expand_as(x)
    torch.testing.assert_close(out, expected)
    monkeypatch.undo()
    return len(calls)


def test_nested_calls_patch_the_language_once_per_launch(monkeypatch):
    """Installed under the pinned Triton; a launch patches the language the same number of times
    whether its programs make 1 or 6 nested calls each (the interpreter alone re-patches on every
    call), and the results are right."""
    from lag_triton.kernels.triton import _interpreter

    assert _interpreter.patch_language_once(), "the pinned Triton's interpreter lacks the internals it patches"
    _patching_count(monkeypatch, 1)  # the first launch in a process patches more (Triton leaves some patched)
    once = _patching_count(monkeypatch, 1)
    assert once > 0
    assert _patching_count(monkeypatch, 6) == once


def test_a_launch_restores_the_language():
    """After a launch, triton.language's builtins are the originals again (the launch's own scope is
    restored), and a second launch still works."""
    where, tensor_add = tl.where, tl.tensor.__add__
    x = torch.randn(2, 16)
    for _ in range(2):
        out = torch.empty_like(x)
        _nested_kernel[(2,)](x, out, ROUNDS=2, BLOCK=16)
        torch.testing.assert_close(out, 2 * (2 * x.min(dim=1, keepdim=True).values + 1).expand_as(x))
        assert tl.where is where and tl.tensor.__add__ is tensor_add


@triton.jit
def _bf16_round_trip_kernel(x_ptr, as_bf16_ptr, back_ptr, rtz_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs)
    tl.store(as_bf16_ptr + offs, v.to(tl.bfloat16))  # the implicit cast: round to nearest even on a GPU
    tl.store(back_ptr + offs, tl.load(as_bf16_ptr + offs).to(tl.float32))
    tl.store(rtz_ptr + offs, v.to(tl.bfloat16, fp_downcast_rounding="rtz"))


def test_bf16_casts_round_like_the_gpu():
    """fp32 -> bf16 in a kernel equals torch's cast (IEEE round to nearest even: the GPU's
    cvt.rn.bf16.f32) bit for bit, on every bf16 value, the ties between two of them, and random fp32
    bit patterns (NaN, inf, subnormals, overflow); bf16 -> fp32 is exact; an explicit round toward
    zero keeps the interpreter's own conversion (it truncates)."""
    from lag_triton.kernels.triton import _interpreter

    assert _interpreter.round_bf16_like_the_gpu(), "the pinned Triton's interpreter lacks _convert_float"
    every_bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    ties = (every_bf16.view(torch.int32) | 0x8000).view(torch.float32)  # exactly halfway to the next bf16
    noise = torch.randint(-(2**31), 2**31 - 1, (2**14,), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    x = torch.cat([every_bf16, ties, noise.view(torch.float32)])
    block = 1024
    x = torch.cat([x, torch.zeros(-x.numel() % block)])
    as_bf16, back, rtz = (
        torch.empty_like(x, dtype=torch.bfloat16),
        torch.empty_like(x),
        torch.empty_like(x, dtype=torch.bfloat16),
    )
    _bf16_round_trip_kernel[(x.numel() // block,)](x, as_bf16, back, rtz, BLOCK=block)
    assert torch.equal(as_bf16.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(back.view(torch.int32), x.to(torch.bfloat16).float().view(torch.int32))
    finite = x.isfinite()
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)  # toward zero: the high 16 bits
    assert torch.equal(rtz.float()[finite & (x.abs() >= 2**-126)], truncated[finite & (x.abs() >= 2**-126)])

"""The one change lag_triton makes to the Triton interpreter (``_interpreter.patch_language_once``):
nested @triton.jit calls no longer re-patch triton.language, and nothing else changes."""

from __future__ import annotations

import pytest
import torch

from lag_triton.kernels import triton_interpreter_enabled

pytestmark = pytest.mark.skipif(not triton_interpreter_enabled(), reason="runs kernels under TRITON_INTERPRET=1")

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

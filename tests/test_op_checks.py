"""Bad arguments to the three ops: every backend raises ValueError naming the tensor and what is
wrong, before any kernel runs (the checks in lag_triton.kernels.common, shared by all backends).

Each case starts from valid arguments and breaks one of them; the valid call itself must pass,
so a check that fired on good input would fail here too.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_data import DEVICE, backend_ops

T, N, R, D_IN, D_OUT, K, M = 3, 9, 4, 16, 12, 5, 2
# A tensor on another device than DEVICE: the check compares devices only, so a meta tensor will do.
ELSEWHERE = "meta"


@pytest.fixture(params=["torch", "triton", "cuda"])
def ops(request, monkeypatch):
    return backend_ops(request.param, monkeypatch)


def _topk_args(**change):
    args = dict(
        x=torch.randn(T, D_IN, device=DEVICE),
        prototypes=torch.randn(N, D_IN, device=DEVICE),
        k=K,
        allowed=torch.ones(2, N, dtype=torch.bool, device=DEVICE),
        scope=torch.zeros(T, dtype=torch.int32, device=DEVICE),
    )
    args.update(change)
    return args


def _rerank_args(**change):
    args = dict(
        x=torch.randn(T, D_IN, device=DEVICE),
        a_star=torch.randn(N, R, D_IN, device=DEVICE),
        candidates=torch.randint(0, N, (T, K), dtype=torch.int32, device=DEVICE),
        top_m=M,
        combine="softmax",
        temperature=1.0,
        candidate_scores=None,
    )
    args.update(change)
    return args


def _apply_args(**change):
    args = dict(
        y=torch.zeros(T, D_OUT, device=DEVICE),
        b_star=torch.randn(N, D_OUT, R, device=DEVICE),
        sel=torch.randint(0, N, (T, M), dtype=torch.int32, device=DEVICE),
        w=torch.full((T, M), 0.5, device=DEVICE),
        z=torch.randn(T, M, R, device=DEVICE),
    )
    args.update(change)
    return args


TOPK_CASES = {
    "prototypes 3-D": (
        dict(prototypes=torch.randn(N, 1, D_IN)),
        r"prototypes must be \[N, d_in\], got shape \(9, 1, 16\)",
    ),
    "x 3-D": (dict(x=torch.randn(1, T, D_IN)), r"x must be \[T, d_in\], got shape \(1, 3, 16\)"),
    "x int": (dict(x=torch.ones(T, D_IN, dtype=torch.int64)), r"x has dtype torch.int64; expected fp32, fp16 or bf16"),
    "x fp64": (dict(x=torch.randn(T, D_IN, dtype=torch.float64)), r"x has dtype torch.float64"),
    "d_in differs": (dict(x=torch.randn(T, D_IN + 1)), r"x has d_in=17 but prototypes has d_in=16"),
    "k zero": (dict(k=0), r"k must be an int in \[1, N=9\], got 0"),
    "k above N": (dict(k=N + 1), r"k must be an int in \[1, N=9\], got 10"),
    "k float": (dict(k=2.0), r"k must be an int in \[1, N=9\], got 2.0"),
    "allowed alone": (dict(scope=None), r"allowed and scope go together: give both or neither"),
    "scope alone": (dict(allowed=None), r"allowed and scope go together"),
    "allowed not bool": (
        dict(allowed=torch.ones(2, N, dtype=torch.uint8)),
        r"allowed must be bool \[S, N=9\], got torch.uint8 \(2, 9\)",
    ),
    "allowed wrong N": (dict(allowed=torch.ones(2, N - 1, dtype=torch.bool)), r"allowed must be bool \[S, N=9\]"),
    "scope int64": (
        dict(scope=torch.zeros(T, dtype=torch.int64)),
        r"scope must be int32 \[T=3\], got torch.int64 \(3,\)",
    ),
    "scope wrong T": (dict(scope=torch.zeros(T + 1, dtype=torch.int32)), r"scope must be int32 \[T=3\]"),
    "prototypes elsewhere": (
        dict(prototypes=torch.randn(N, D_IN, device=ELSEWHERE)),
        r"tensors are on different devices",
    ),
    "scope elsewhere": (
        dict(scope=torch.zeros(T, dtype=torch.int32, device=ELSEWHERE)),
        r"different devices: .*'scope': device\(type='meta'\)",
    ),
}

RERANK_CASES = {
    "a_star 2-D": (dict(a_star=torch.randn(N, D_IN)), r"a_star must be \[N, r, d_in\], got shape \(9, 16\)"),
    "d_in differs": (dict(x=torch.randn(T, D_IN - 1)), r"x has d_in=15 but a_star has d_in=16"),
    "candidates wrong T": (
        dict(candidates=torch.zeros(T + 1, K, dtype=torch.int32)),
        r"candidates must be \[T=3, k\], got shape \(4, 5\)",
    ),
    "candidates 1-D": (dict(candidates=torch.zeros(T, dtype=torch.int32)), r"candidates must be \[T=3, k\]"),
    "candidates int64": (
        dict(candidates=torch.zeros(T, K, dtype=torch.int64)),
        r"candidates must be int32, got torch.int64",
    ),
    "top_m zero": (dict(top_m=0), r"top_m must be an int in \[1, k=5\], got 0"),
    "top_m above k": (dict(top_m=K + 1), r"top_m must be an int in \[1, k=5\], got 6"),
    "combine unknown": (dict(combine="max"), r"combine must be one of \('softmax', 'uniform'\), got 'max'"),
    "temperature zero": (dict(temperature=0.0), r"temperature must be a number >= 1.18e-38 .*, got 0.0"),
    "temperature NaN": (dict(temperature=math.nan), r"temperature must be a number >= 1.18e-38 .*, got nan"),
    # 1 / t overflows float32 (a division may run as that product): the softmax would take inf / inf
    "temperature subnormal": (dict(temperature=1e-39), r"temperature must be a number >= 1.18e-38 .*, got 1e-39"),
    "temperature a string": (dict(temperature="1"), r"temperature must be a number >= 1.18e-38 .*, got '1'"),
    "scores wrong shape": (
        dict(candidate_scores=torch.zeros(T, K - 1)),
        r"candidate_scores shape \(3, 4\) != candidates shape \(3, 5\)",
    ),
    "a_star elsewhere": (dict(a_star=torch.randn(N, R, D_IN, device=ELSEWHERE)), r"tensors are on different devices"),
    "scores elsewhere": (  # the reference raised an index error, Triton could not copy, CUDA moved them
        dict(candidate_scores=torch.zeros(T, K, device=ELSEWHERE)),
        r"different devices: .*'candidate_scores': device\(type='meta'\)",
    ),
    "scores int": (
        dict(candidate_scores=torch.zeros(T, K, dtype=torch.int32)),
        r"candidate_scores must be floating point \(Arrow scores\), got torch.int32",
    ),
}

APPLY_CASES = {
    "b_star 2-D": (dict(b_star=torch.randn(N, D_OUT)), r"b_star must be \[N, d_out, r\], got shape \(9, 12\)"),
    "y wrong d_out": (dict(y=torch.zeros(T, D_OUT + 1)), r"y must be \[T, d_out=12\], got shape \(3, 13\)"),
    "y int": (
        dict(y=torch.zeros(T, D_OUT, dtype=torch.int32)),
        r"y has dtype torch.int32; expected fp32, fp16 or bf16",
    ),
    "y rows overlap": (  # every row one memory row: the kernels' parallel adds would race (made on
        dict(y=torch.zeros(D_OUT, device=DEVICE).expand(T, D_OUT)),  # DEVICE: .to would copy it dense)
        r"y's elements overlap in memory \(shape \(3, 12\), strides \(0, 1\)\)",
    ),
    "sel wrong T": (dict(sel=torch.zeros(T + 1, M, dtype=torch.int32)), r"sel must be \[T=3, m\], got shape \(4, 2\)"),
    "sel 1-D": (dict(sel=torch.zeros(T, dtype=torch.int32)), r"sel must be \[T=3, m\], got shape \(3,\)"),
    "sel int64": (dict(sel=torch.zeros(T, M, dtype=torch.int64)), r"sel must be int32, got torch.int64"),
    "w fp16": (
        dict(w=torch.ones(T, M, dtype=torch.float16)),
        r"w must be fp32 \[T, m\]=\(3, 2\), got torch.float16 \(3, 2\)",
    ),
    "w wrong m": (dict(w=torch.ones(T, M + 1)), r"w must be fp32 \[T, m\]=\(3, 2\)"),
    "z wrong r": (
        dict(z=torch.zeros(T, M, R + 1)),
        r"z must be fp32 \[T, m, r\]=\(3, 2, 4\), got torch.float32 \(3, 2, 5\)",
    ),
    "z fp16": (dict(z=torch.zeros(T, M, R, dtype=torch.float16)), r"z must be fp32"),
    # torch and Triton took these, CUDA refused them (its emulator with a KeyError)
    "b_star fp64": (dict(b_star=torch.randn(N, D_OUT, R, dtype=torch.float64)), r"b_star has dtype torch.float64"),
    "b_star int8": (dict(b_star=torch.ones(N, D_OUT, R, dtype=torch.int8)), r"b_star has dtype torch.int8; expected"),
    "z elsewhere": (dict(z=torch.zeros(T, M, R, device=ELSEWHERE)), r"different devices: .*'z': device\(type='meta'\)"),
}


def _on_device(change: dict) -> dict:
    """The broken arguments on DEVICE, except those the case puts on another device on purpose."""
    return {
        name: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != ELSEWHERE else v
        for name, v in change.items()
    }


def test_valid_arguments_pass(ops):
    """The base arguments of every case are valid: whatever fails below fails for its one change."""
    idx, _ = ops.arrow_topk(**_topk_args())
    assert idx.shape == (T, K)
    sel, _, _ = ops.spectr_rerank(**_rerank_args())
    assert sel.shape == (T, M)
    ops.lora_apply(**_apply_args())


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_arrow_topk_rejects(ops, case):
    change, message = TOPK_CASES[case]
    with pytest.raises(ValueError, match=message):
        ops.arrow_topk(**_topk_args(**_on_device(change)))


@pytest.mark.parametrize("case", list(RERANK_CASES))
def test_spectr_rerank_rejects(ops, case):
    change, message = RERANK_CASES[case]
    with pytest.raises(ValueError, match=message):
        ops.spectr_rerank(**_rerank_args(**_on_device(change)))


@pytest.mark.parametrize("case", list(APPLY_CASES))
def test_lora_apply_rejects(ops, case):
    change, message = APPLY_CASES[case]
    y_before = _apply_args()["y"]
    args = _apply_args(**_on_device(change))
    if "y" not in change:
        args["y"] = y_before
    with pytest.raises(ValueError, match=message):
        ops.lora_apply(**args)
    assert torch.count_nonzero(y_before) == 0, "a rejected apply must leave y untouched"

"""Launch-independent logic shared by every backend: argument checks and the selection weights.

Checks only look at shapes, dtypes and devices (never at tensor values), so they cost no host
synchronisation and keep a patched forward capturable in a CUDA graph. Every call of every op runs
its check, and eager decoding is bound by host time: a passing check costs comparisons only (its
message is formatted when it fails).
"""

from __future__ import annotations

import numbers

import torch

COMBINE_MODES = ("softmax", "uniform")
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_x(x: torch.Tensor, d_in: int, weights_name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d_in], got shape {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; expected fp32, fp16 or bf16")
    if x.shape[1] != d_in:
        raise ValueError(f"x has d_in={x.shape[1]} but {weights_name} has d_in={d_in}")


def _is_int(value) -> bool:
    """An int, or the symbolic int a compiled graph passes where ``torch.compile(dynamic=True)``
    makes sizes symbolic (torch 2.4 does so for a module's int attributes too: k, top_m)."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _check_same_device(**tensors: torch.Tensor) -> None:
    first, *others = tensors.values()
    if any(t.device != first.device for t in others):
        devices = {name: t.device for name, t in tensors.items()}
        raise ValueError(f"tensors are on different devices: {devices}")


def check_topk_args(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    allowed: torch.Tensor | None = None,
    scope: torch.Tensor | None = None,
) -> None:
    if prototypes.dim() != 2:
        raise ValueError(f"prototypes must be [N, d_in], got shape {tuple(prototypes.shape)}")
    _check_x(x, prototypes.shape[1], "prototypes")
    _check_same_device(x=x, prototypes=prototypes)
    n = prototypes.shape[0]
    if not (_is_int(k) and 1 <= k <= n):
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    if (allowed is None) != (scope is None):
        raise ValueError("allowed and scope go together: give both or neither")
    if allowed is not None:
        if not (allowed.dim() == 2 and allowed.shape[1] == n and allowed.dtype == torch.bool):
            raise ValueError(f"allowed must be bool [S, N={n}], got {allowed.dtype} {tuple(allowed.shape)}")
        if not (scope.shape == (x.shape[0],) and scope.dtype == torch.int32):
            raise ValueError(f"scope must be int32 [T={x.shape[0]}], got {scope.dtype} {tuple(scope.shape)}")
        _check_same_device(x=x, allowed=allowed, scope=scope)


def scoped_rows(allowed: torch.Tensor, scope: torch.Tensor) -> torch.Tensor:
    """``allowed[scope[t]]`` for every token: [T, N] bool. A scope row out of [0, S) allows nothing
    (it reads an appended all-False row: checking the range would cost a host sync)."""
    rows = allowed.shape[0]
    table = torch.cat([allowed, allowed.new_zeros(1, allowed.shape[1])])
    return table[torch.where((scope >= 0) & (scope < rows), scope, rows).long()]


def check_rerank_args(
    x: torch.Tensor,
    a_star: torch.Tensor,
    candidates: torch.Tensor,
    top_m: int,
    combine: str,
    temperature: float,
    candidate_scores: torch.Tensor | None,
) -> None:
    if a_star.dim() != 3:
        raise ValueError(f"a_star must be [N, r, d_in], got shape {tuple(a_star.shape)}")
    _check_x(x, a_star.shape[2], "a_star")
    if not (candidates.dim() == 2 and candidates.shape[0] == x.shape[0]):
        raise ValueError(f"candidates must be [T={x.shape[0]}, k], got shape {tuple(candidates.shape)}")
    if candidates.dtype != torch.int32:
        raise ValueError(f"candidates must be int32, got {candidates.dtype}")
    _check_same_device(x=x, a_star=a_star, candidates=candidates)
    k = candidates.shape[1]
    if not (_is_int(top_m) and 1 <= top_m <= k):
        raise ValueError(f"top_m must be an int in [1, k={k}], got {top_m!r}")
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    check_temperature(temperature)
    if candidate_scores is not None:
        if candidate_scores.shape != candidates.shape:
            raise ValueError(
                f"candidate_scores shape {tuple(candidate_scores.shape)} != candidates shape {tuple(candidates.shape)}"
            )
        if not candidate_scores.is_floating_point():
            raise ValueError(f"candidate_scores must be floating point (Arrow scores), got {candidate_scores.dtype}")
        _check_same_device(x=x, candidates=candidates, candidate_scores=candidate_scores)


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` address the same element (an expanded or as_strided view)."""
    span = 1  # elements spanned by the dims of smaller stride
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def check_apply_args(
    y: torch.Tensor, b_star: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, z: torch.Tensor
) -> None:
    if b_star.dim() != 3:
        raise ValueError(f"b_star must be [N, d_out, r], got shape {tuple(b_star.shape)}")
    if not (y.dim() == 2 and y.shape[1] == b_star.shape[1]):
        raise ValueError(f"y must be [T, d_out={b_star.shape[1]}], got shape {tuple(y.shape)}")
    if y.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"y has dtype {y.dtype}; expected fp32, fp16 or bf16")
    if b_star.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"b_star has dtype {b_star.dtype}; expected fp32, fp16 or bf16")
    if _overlaps_itself(y):
        raise ValueError(
            f"y's elements overlap in memory (shape {tuple(y.shape)}, strides {y.stride()}): the kernels add "
            "into every element at once; pass a tensor whose elements are distinct (y.contiguous())"
        )
    t, m = sel.shape if sel.dim() == 2 else (None, None)
    if t != y.shape[0]:
        raise ValueError(f"sel must be [T={y.shape[0]}, m], got shape {tuple(sel.shape)}")
    if sel.dtype != torch.int32:
        raise ValueError(f"sel must be int32, got {sel.dtype}")
    if not (w.shape == sel.shape and w.dtype == torch.float32):
        raise ValueError(f"w must be fp32 [T, m]={tuple(sel.shape)}, got {w.dtype} {tuple(w.shape)}")
    if not (z.shape == (t, m, b_star.shape[2]) and z.dtype == torch.float32):
        raise ValueError(f"z must be fp32 [T, m, r]={(t, m, b_star.shape[2])}, got {z.dtype} {tuple(z.shape)}")
    _check_same_device(y=y, b_star=b_star, sel=sel, w=w, z=z)


def _fp32_out_mm_supported(x: torch.Tensor) -> bool:
    """torch.mm(a, b, out_dtype=torch.float32) exists for fp16/bf16 CUDA tensors from torch 2.8 on."""
    return (
        x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16) and hasattr(torch.ops.aten.mm, "dtype")
    )


def prototype_scores(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """x [T, d_in] @ prototypes [N, d_in]^T in fp32, [T, N] (signed: Arrow ranks |.|).

    On CUDA with fp16/bf16 activations this is one tensor-core GEMM with fp32 accumulation and
    fp32 output (cuBLAS through ``torch.mm(out_dtype=...)``): the products of low-precision
    inputs are exact in fp32, so it computes the reference's x.float() @ P.float().T up to the
    order of the fp32 sums. Elsewhere (CPU, fp32, torch < 2.8) the operands are upcast first.
    """
    if _fp32_out_mm_supported(x):
        return torch.mm(x, prototypes.T, out_dtype=torch.float32)
    if x.dtype == torch.float32 and prototypes.dtype == torch.float32:
        return x @ prototypes.T
    return x.float() @ prototypes.float().T


def matching_operands(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, weights) in one dtype, for kernels that read both as one type: unchanged when they agree
    (always, in a patched model: the library is held in the layer's dtype), else both in fp32 —
    exact for fp16/bf16, and the precision the reference computes in (rounding the weights to x's
    16-bit dtype would change the scores)."""
    if weights.dtype == x.dtype:
        return x, weights
    return x.float(), weights.float()


#: fp32 Arrow scores alive at once (bytes): bounds the GEMM's output at large N (~64 rows at N = 1e6)
SCORE_CHUNK_BYTES = 256 << 20


def score_row_chunks(t: int, n: int) -> list[slice]:
    """Row ranges of at most SCORE_CHUNK_BYTES of [t, n] fp32 scores each (shapes only: no sync)."""
    rows = max(1, SCORE_CHUNK_BYTES // (4 * max(1, n)))
    return [slice(t0, min(t, t0 + rows)) for t0 in range(0, t, rows)]


def empty_topk_outputs(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (idx [T, k] int32, scores [T, k] fp32) on x's device: arrow_topk's output contract."""
    t = x.shape[0]
    return (
        torch.empty((t, k), dtype=torch.int32, device=x.device),
        torch.empty((t, k), dtype=torch.float32, device=x.device),
    )


def empty_rerank_outputs(x: torch.Tensor, top_m: int, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised (sel [T, m] int32, w [T, m] fp32, z [T, m, r] fp32): spectr_rerank's output contract."""
    t = x.shape[0]
    return (
        torch.empty((t, top_m), dtype=torch.int32, device=x.device),
        torch.empty((t, top_m), dtype=torch.float32, device=x.device),
        torch.empty((t, top_m, r), dtype=torch.float32, device=x.device),
    )


def constant_weights(top_m: int, combine: str) -> bool:
    """Whether the picks' weights are constants (one pick, or combine="uniform"), not a softmax of
    their keys (docs/design.md §1)."""
    return top_m == 1 or combine == "uniform"


#: the smallest temperature: the softmax divides the keys by it in fp32, where 1 / t must stay finite
#: (a division may run as a product with the reciprocal) -- the smallest normal fp32, 1.2e-38
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


def check_temperature(temperature) -> None:
    """Raise ValueError unless ``temperature`` is a number the weights can be computed with in fp32."""
    if type(temperature) is float and temperature >= MIN_TEMPERATURE:  # every routed call's: no ABC check
        return
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be a number >= {MIN_TEMPERATURE:.3g} (the smallest normal float32: the weights "
            f"divide by it in float32), got {temperature!r}"
        )


def selection_weights(
    selected_keys: torch.Tensor, combine: str, temperature: float, picked: torch.Tensor | None = None
) -> torch.Tensor:
    """Mixing weights of the top_m picks, from their ranking keys [T, m] (docs/design.md §1).

    One pick gets weight 1; several get softmax(key / temperature) or 1 / top_m. Picks that are
    not ``picked`` ([T, m] bool: no candidate left, under a scope) get 0, and the weights spread
    over the others. The softmax takes (key - max key) / temperature: the same weights, and no
    overflow (inf / inf) however small the temperature -- it tends to the best pick alone.
    """
    t, m = selected_keys.shape
    if picked is None:
        picked = torch.ones((t, m), dtype=torch.bool, device=selected_keys.device)
    if constant_weights(m, combine):
        return picked.float() / picked.sum(-1, keepdim=True).clamp(min=1)
    keys = torch.where(picked, selected_keys.float(), float("-inf"))
    top = keys.amax(dim=-1, keepdim=True)  # NaN if a picked key is NaN: it propagates, as in softmax
    logits = torch.where(picked, (keys - top) / temperature, float("-inf"))
    return torch.where(picked, torch.softmax(logits, dim=-1), 0.0)

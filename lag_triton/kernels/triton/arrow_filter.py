"""Arrow retrieval for large libraries: a scoring GEMM whose epilogue keeps only the scores that can
still reach a row's top k, so the [T, N] fp32 matrix is never written nor read back (taken by
``arrow_topk`` when ``filter_gemm()`` is on and ``filter_plan`` accepts the shapes).

    scores[t, i] = P[i] . x[t]   (fp32)           x [T, d_in], P [N, d_in]
    idx[t]       = ``arrow_topk``'s contract and order (packed keys: ties -> lower index, NaN like -inf)

1. Seed: SEED adapters sampled with a stride, i = j * STRIDE (j < SEED), are scored by cuBLAS and
   their top k selected (``arrow_topk``'s GEMM + filtered select). Row t's k-th best sampled word is a
   threshold: an adapter outside the sample whose word does not beat it is beaten by k sampled
   ones, so it cannot be in the row's top k. Unless the scores repeat with period STRIDE, about
   k * N / SEED adapters per row beat it; ``filter_plan`` sizes SEED for ~512 of them.
2. ``_filter_gemm_kernel``: [BLOCK_M, BLOCK_N] tiles of x @ P^T over every adapter outside the
   sample (tl.dot, fp32 accumulation), P's column blocks outer so that the programs in flight share
   one block of P (read from HBM once) and the tokens stay in L2. The epilogue compares each score's
   packed word with its row's threshold and appends the survivors to the row's buffer of CAP words,
   one atomic slot each (their order is immaterial to a top-k; a prefix sum over the tile instead
   needs more registers than the 246 this epilogue takes, and spills).
3. ``_finish_kernel``, one program per row: the top k of the seed's k words and the row's
   survivors. A row with more than CAP survivors (the sample was a poor threshold for it) is
   rescored by its program instead -- every adapter, a streaming GEMV into the filtered buffer of
   ``_common.offer_block`` -- so the answer is exact whatever the data, only slower.

Each adapter's score comes from one computation (the sample is masked out of the tiles, and a
rescored row rescores all of it), so two summation orders never meet in one comparison. What it
saves is the T * N * 8 bytes that the GEMM + select path writes and reads back (1.6 GB at N = 100k,
T = 2048: 0.39 ms at the H200's measured 4,216 GB/s, beside a 1.26-TFLOP GEMM), provided the tl.dot
GEMM keeps up with cuBLAS: opt-in
until a GPU run has measured that (``LAG_TRITON_FILTER_GEMM=1``; the benchmarks' ``triton-filter``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .. import version_tuple
from ..common import score_row_chunks
from ._common import (
    EMPTY_SLOT,
    beats,
    cdiv,
    divisible_by_16,
    dot_scores,
    flush_buffer,
    interpreting,
    next_pow2,
    offer_block,
    order_key,
    pack,
    rows_contiguous,
    scope_allows,
    store_topk,
    upcast_dot,
)

#: largest k the path takes (its final merge is K_PAD rounds over the buffer)
MAX_K_PAD = 128
#: launch constants: the filtering GEMM's tiles, the finish kernel's rescoring GEMV
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3, RESCORE_N=64, RESCORE_D=32)
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1, RESCORE_N=32, RESCORE_D=32)
#: the smallest sample, library and batch the path takes (below them the [T, N] scores are cheap to
#: write), and the survivors per row the sample is sized for (the buffer holds 4x as many)
GPU_LIMITS = dict(seed=1024, n=16384, t=64, survivors=512)
INTERPRETER_LIMITS = dict(seed=16, n=64, t=1, survivors=256)
FINISH_WARPS = 4
#: take the survivors' buffer slots by an atomic on the tile flattened to 1-D: Triton 3.8 and 3.9
#: fail to compile the [BLOCK_M, BLOCK_N] atomic (an assertion in RemoveLayoutConversions); 3.7
#: compiles both, the flat one in fewer registers; 3.4 to 3.6 spill 160-436 bytes with it (sm_90).
FLAT_SLOTS = version_tuple(triton.__version__) >= (3, 7)


@triton.jit
def _sample_words(seed_idx_ptr, seed_score_ptr, offs, mask, STRIDE):
    """Packed words of the sample's top-k entries at ``offs`` into its [T, K] outputs: sample
    position j is adapter j * STRIDE; EMPTY_SLOT where masked or where the entry is empty (-1)."""
    j = tl.load(seed_idx_ptr + offs, mask=mask, other=-1)
    score = tl.load(seed_score_ptr + offs, mask=mask, other=0.0)
    return tl.where(j >= 0, pack(order_key(score), j * STRIDE), EMPTY_SLOT)


@triton.jit
def _filter_gemm_kernel(
    x_ptr,  # x [T, d_in]
    p_ptr,  # prototypes [N, d_in]
    seed_idx_ptr,  # the sample's top k per row, as sample positions j [T, K] int32 (-1: none)
    seed_score_ptr,  # their |scores| [T, K] fp32
    buf_ptr,  # out: survivors [T, CAP] int64 packed words (the first min(count, CAP) of a row)
    count_ptr,  # survivors per row [>= T] int32, zero before the launch (may end above CAP)
    allowed_ptr,  # scope masks [S, N] uint8 (when HAS_SCOPE)
    scope_ptr,  # scope row of each token [T] int32 (when HAS_SCOPE)
    T,
    N,
    D,
    K,
    S,
    STRIDE,  # sample stride: adapter j * STRIDE, j < SEED, is in the sample
    SEED,
    stride_xt,
    stride_pn,
    stride_allowed,
    HAS_SCOPE: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: bf16 tiles to fp32 before tl.dot (see _interpreter)
    FLAT_SLOTS: tl.constexpr,  # the slots' atomic on the flattened tile (see FLAT_SLOTS)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAP: tl.constexpr,
):
    """Survivors of one [BLOCK_M tokens, BLOCK_N adapters] tile of x @ P^T.
    Grid (cdiv(N, BLOCK_N) * cdiv(T, BLOCK_M),)."""
    num_m = tl.cdiv(T, BLOCK_M)
    pid_n = tl.program_id(0) // num_m  # adapter blocks outer: programs in flight share one P block
    pid_m = tl.program_id(0) % num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < T
    col_mask = cols < N
    acc = dot_scores(x_ptr, p_ptr, rows, row_mask, cols, col_mask, 0, D, stride_xt, stride_pn, BLOCK_K, UPCAST)
    in_sample = (cols % STRIDE == 0) & (cols // STRIDE < SEED)
    valid = row_mask[:, None] & (col_mask & ~in_sample)[None, :]
    if HAS_SCOPE:
        valid = scope_allows(allowed_ptr, scope_ptr, rows, row_mask, cols, valid, S, stride_allowed)
    keys = order_key(tl.abs(acc))
    # the row's k-th best sampled word (EMPTY_SLOT, which lets every word through, where fewer than
    # k sampled adapters were allowed)
    kth = _sample_words(seed_idx_ptr, seed_score_ptr, rows[:, None] * K + K - 1, row_mask[:, None], STRIDE)
    survives = valid & beats(keys, cols[None, :], kth)
    if tl.sum(tl.sum(survives.to(tl.int32), axis=1), axis=0) > 0:
        # ~k * N / SEED survivors per row in all: an atomic slot each (their order is immaterial)
        counters = count_ptr + rows[:, None] + 0 * cols[None, :]
        if FLAT_SLOTS:
            slot = tl.atomic_add(
                tl.reshape(counters, [BLOCK_M * BLOCK_N]),
                1,
                mask=tl.reshape(survives, [BLOCK_M * BLOCK_N]),
                sem="relaxed",
            )
            slot = tl.reshape(slot, [BLOCK_M, BLOCK_N])
        else:
            slot = tl.atomic_add(counters, 1, mask=survives, sem="relaxed")
        offs = rows[:, None] * CAP + slot  # int32: a row chunk's buffer is at most SCORE_CHUNK_BYTES
        tl.store(buf_ptr + offs, pack(keys, cols[None, :]), mask=survives & (slot < CAP))


@triton.jit
def _finish_kernel(
    x_ptr,  # x [T, d_in] (rescoring)
    p_ptr,  # prototypes [N, d_in] (rescoring)
    seed_idx_ptr,  # as in _filter_gemm_kernel
    seed_score_ptr,
    buf_ptr,  # survivors [T, CAP] int64; a rescored row's own scratch
    count_ptr,  # survivors per row [>= T] int32 (the GEMM's counts)
    idx_ptr,  # out: idx [T, K] int32
    score_ptr,  # out: |scores| [T, K] fp32
    allowed_ptr,  # scope masks [S, N] uint8 (when HAS_SCOPE)
    scope_ptr,  # scope row of each token [T] int32 (when HAS_SCOPE)
    N,
    D,
    K,
    S,
    STRIDE,
    stride_xt,
    stride_pn,
    stride_allowed,
    HAS_SCOPE: tl.constexpr,
    K_PAD: tl.constexpr,
    CAP: tl.constexpr,
    RESCORE_N: tl.constexpr,  # adapters per step of the rescoring GEMV (<= CAP)
    RESCORE_D: tl.constexpr,
):
    """Row t's top k: the seed's words and the survivors, or a rescoring of every adapter. Grid (T,)."""
    t = tl.program_id(0)
    rows = t + tl.arange(0, 1)
    buf = buf_ptr + t.to(tl.int64) * CAP
    count = tl.load(count_ptr + t)
    if count <= CAP:
        slot = tl.arange(0, K_PAD)[None, :]
        best = _sample_words(seed_idx_ptr, seed_score_ptr, t * K + slot, slot < K, STRIDE)
        best = flush_buffer(best, buf, count, K_PAD, CAP)
    else:  # the buffer overflowed: score every adapter again, filtered as arrow_topk's select does
        best = tl.full([1, K_PAD], EMPTY_SLOT, tl.int64)
        kth = tl.min(best, axis=1, keep_dims=True)
        count = count * 0
        offs_d = tl.arange(0, RESCORE_D)[:, None]  # [RESCORE_D, 1]
        for n0 in range(0, N, RESCORE_N):
            cols = n0 + tl.arange(0, RESCORE_N)
            offs = cols[None, :]  # [1, RESCORE_N]
            mask = offs < N
            z = tl.zeros([1, RESCORE_N], dtype=tl.float32)
            for d0 in range(0, D, RESCORE_D):
                d_mask = d0 + offs_d < D
                xv = tl.load(x_ptr + t.to(tl.int64) * stride_xt + d0 + offs_d, mask=d_mask, other=0.0)
                pt = tl.load(p_ptr + offs.to(tl.int64) * stride_pn + d0 + offs_d, mask=mask & d_mask, other=0.0)
                z += tl.sum(pt.to(tl.float32) * xv.to(tl.float32), axis=0, keep_dims=True)
            if HAS_SCOPE:
                mask = scope_allows(allowed_ptr, scope_ptr, rows, rows >= 0, cols, mask, S, stride_allowed)
            best, kth, count = offer_block(best, kth, count, order_key(tl.abs(z)), offs, mask, buf, K_PAD, CAP)
        if count > 0:
            best = flush_buffer(best, buf, count, K_PAD, CAP)
    store_topk(best, rows, rows >= 0, idx_ptr, score_ptr, K, K, K_PAD)


def finish_k_pad(k: int) -> int:
    """The finish kernel's running top-K_PAD for k: at least 2, since Triton 3.8 fails at random to
    compile its rescoring at K_PAD = 1 ('tt.broadcast' op requires the same element type); the k
    stored are the same (registers: bench/results/aot-sm90-triton-*.txt)."""
    return max(2, next_pow2(k))


def filter_config() -> dict:
    return dict(INTERPRETER_CONFIG if interpreting() else GPU_CONFIG)


def filter_plan(t: int, n: int, k: int) -> dict | None:
    """Sample size, stride and buffer of the filtering path for these shapes, or None where it does
    not apply (a small library or batch, k beyond MAX_K_PAD, a sample that would not be sparse)."""
    least = INTERPRETER_LIMITS if interpreting() else GPU_LIMITS
    cfg = filter_config()
    if t < least["t"] or n < least["n"] or next_pow2(k) > MAX_K_PAD:
        return None
    seed = max(least["seed"], next_pow2(cdiv(k * n, least["survivors"])))
    if 4 * seed > n:  # the sample would be a quarter of the library or more: nothing to gain
        return None
    cap = max(cfg["RESCORE_N"], next_pow2(4 * cdiv(k * n, seed)))
    return dict(cfg, SEED=seed, STRIDE=n // seed, CAP=cap)


def operands_fit(x: torch.Tensor, prototypes: torch.Tensor) -> bool:
    """Whether the GEMM's spill-free configurations (``_aot_check --resources``) apply: 16-bit
    operands, 16-byte aligned, with row strides that are multiples of 16 elements (what Triton's
    divisibility specialisation sees). fp32 (no tensor cores at the reference's ieee precision)
    and odd strides, which spill, keep the GEMM + select path. The interpreter takes any operands."""
    if interpreting():
        return True
    return x.dtype in (torch.float16, torch.bfloat16) and divisible_by_16(
        x, prototypes, ints=(x.stride(0), prototypes.stride(0))
    )


def filtered_arrow_topk(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    idx: torch.Tensor,
    scores: torch.Tensor,
    allowed: torch.Tensor | None,
    scope: torch.Tensor | None,
    plan: dict,
    seed_topk: Callable[..., None],
) -> None:
    """idx / scores [T, k] of ``arrow_topk`` (x, prototypes: same dtype, unit inner stride; shapes
    checked by the caller; ``plan`` from ``filter_plan``). ``seed_topk(x, prototypes, k, idx, scores,
    allowed, scope)`` is ``arrow_topk``'s GEMM + select path, which takes the sample's top k. Tokens
    go in row chunks whose survivor buffers hold at most ``common.SCORE_CHUNK_BYTES``."""
    t = x.shape[0]
    seed, stride, cap = plan["SEED"], plan["STRIDE"], plan["CAP"]
    sample = prototypes[::stride][:seed]  # a strided view: cuBLAS reads it in place
    seed_idx = torch.empty((t, k), dtype=torch.int32, device=x.device)
    seed_scores = torch.empty((t, k), dtype=torch.float32, device=x.device)
    seed_topk(x, sample, k, seed_idx, seed_scores, None if allowed is None else allowed[:, ::stride][:, :seed], scope)
    # the scope masks as the kernels read them (uint8 rows), once for every chunk
    allowed_u8 = None if allowed is None else rows_contiguous(allowed).view(torch.uint8)
    for rows in score_row_chunks(t, 2 * cap):  # a buffer row: cap int64 words, the bytes of 2 * cap scores
        _filter_rows(
            x[rows],
            prototypes,
            k,
            seed_idx[rows],
            seed_scores[rows],
            idx[rows],
            scores[rows],
            allowed_u8,
            None if scope is None else scope[rows],
            plan,
        )


def _filter_rows(x, prototypes, k, seed_idx, seed_scores, idx, scores, allowed_u8, scope, plan) -> None:
    """The filtering GEMM and the finish for one chunk of rows (arguments as filtered_arrow_topk's;
    ``allowed_u8``: its scope masks viewed as uint8, or None)."""
    t, d = x.shape
    n = prototypes.shape[0]
    cap = plan["CAP"]
    scoped = allowed_u8 is not None
    buf = torch.empty((t, cap), dtype=torch.int64, device=x.device)
    # zeroed per call, not the stream's cached ticket counters: the counts live from one launch to the
    # next, so a launch between them on the stream (another thread's fold), or a call interrupted
    # there, would corrupt a shared buffer for every later launch
    counts = torch.zeros(t, dtype=torch.int32, device=x.device)
    allowed_arg, scope_arg = (allowed_u8, scope) if scoped else (buf, buf)  # buf: an unread placeholder
    s_rows = allowed_u8.shape[0] if scoped else 0
    stride_allowed = allowed_u8.stride(0) if scoped else 0
    grid = (cdiv(n, plan["BLOCK_N"]) * cdiv(t, plan["BLOCK_M"]),)
    _filter_gemm_kernel[grid](
        x,
        prototypes,
        seed_idx,
        seed_scores,
        buf,
        counts,
        allowed_arg,
        scope_arg,
        t,
        n,
        d,
        k,
        s_rows,
        plan["STRIDE"],
        plan["SEED"],
        x.stride(0),
        prototypes.stride(0),
        stride_allowed,
        HAS_SCOPE=scoped,
        UPCAST=upcast_dot(x.dtype),
        FLAT_SLOTS=FLAT_SLOTS,
        BLOCK_M=plan["BLOCK_M"],
        BLOCK_N=plan["BLOCK_N"],
        BLOCK_K=plan["BLOCK_K"],
        CAP=cap,
        num_warps=plan["num_warps"],
        num_stages=plan["num_stages"],
    )
    _finish_kernel[(t,)](
        x,
        prototypes,
        seed_idx,
        seed_scores,
        buf,
        counts,
        idx,
        scores,
        allowed_arg,
        scope_arg,
        n,
        d,
        k,
        s_rows,
        plan["STRIDE"],
        x.stride(0),
        prototypes.stride(0),
        stride_allowed,
        HAS_SCOPE=scoped,
        K_PAD=finish_k_pad(k),
        CAP=cap,
        RESCORE_N=plan["RESCORE_N"],
        RESCORE_D=plan["RESCORE_D"],
        num_warps=FINISH_WARPS,
    )

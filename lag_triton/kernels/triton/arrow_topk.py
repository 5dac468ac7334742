"""Arrow retrieval on Triton: prototype scoring GEMM with a fused streaming top-k epilogue.

    scores[t, i] = |P[i] . x[t]|   (fp32 accumulation)          x [T, d_in], P [N, d_in]
    idx[t]       = the k adapters with the largest score, best first (ties -> lower index,
                   NaN ranks like -inf)                          idx [T, k] int32, scores [T, k] fp32

The T x N score matrix never reaches global memory: each program keeps a running top-K_PAD
(K_PAD = next_pow2(k)) of packed (score, index) int64 words in registers and merges every
[ROWS, BLOCK_N] score tile into it with ``tl.topk`` (skipping tiles that cannot change it).

Grid: (cdiv(T, ROWS), SPLITS). A program owns ROWS tokens. ``tl.dot`` needs >= 16 rows, so
for T < 16 (decode) the dot runs on BLOCK_T = 16 rows of which only ROWS = next_pow2(T) are
real, and the padding rows are dropped before the top-k epilogue: the sorting network, the
costly part of the epilogue, then works on 1-row tiles at T = 1 instead of 16-row ones.

When T alone gives too few programs (decode: T = 1, N up to 1e6) the N axis is split into
SPLITS contiguous ranges of whole BLOCK_N tiles, sized for ~1-2 programs per SM (enough to
stream P at bandwidth, and no more: every split adds K_PAD words to merge). Every split writes
its packed partial top-K_PAD to a [T, SPLITS, K_PAD] int64 scratch, and ``_merge_kernel``
reduces it to the final top-k (FAISS-style two-pass top-k) with tiles of next_pow2(T) <= 16
rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_topk_args, empty_topk_outputs
from ._common import (EMPTY_SLOT, interpreting, key_to_float, merge_topk_if_better, next_pow2, num_sms, order_key,
                      pack, rows_contiguous, unpack_index, unpack_key, upcast_dot)


@triton.jit
def _store_topk(best, rows, row_mask, idx_ptr, score_ptr, stride_o, K, K_PAD: tl.constexpr):
    """Decode packed words [ROWS, K_PAD] and write the first K columns of idx / scores."""
    cols = tl.arange(0, K_PAD)
    idx = unpack_index(best)
    score = key_to_float(unpack_key(best))
    score = tl.where(score == float("-inf"), float("nan"), score)  # |p.x| is never -inf: that key was NaN
    offs = rows[:, None] * stride_o + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < K)
    tl.store(idx_ptr + offs, idx, mask=mask)
    tl.store(score_ptr + offs, score, mask=mask)


@triton.jit
def _first_rows(acc, ROWS: tl.constexpr):
    """Rows [0, ROWS) of a [BLOCK_T, C] tile (ROWS divides BLOCK_T), bit-exact.

    Viewed as [BLOCK_T // ROWS, ROWS, C], group 0 holds the wanted rows; the other groups are
    replaced by 0.0 (they may hold 0 * inf = NaN) and summed in, which leaves every value as is.
    """
    BLOCK_T: tl.constexpr = acc.shape[0]
    C: tl.constexpr = acc.shape[1]
    if ROWS == BLOCK_T:
        out = acc
    else:
        g = tl.reshape(acc, [BLOCK_T // ROWS, ROWS, C])
        first = tl.arange(0, BLOCK_T // ROWS)[:, None, None] == 0
        out = tl.sum(tl.where(first, g, 0.0), axis=0)
    return out


@triton.jit
def _arrow_topk_kernel(
    x_ptr,  # x [T, d_in], row stride stride_xt, unit inner stride
    p_ptr,  # prototypes [N, d_in], row stride stride_pn, unit inner stride
    idx_ptr,  # out: idx [T, K] int32 (when not SPLIT)
    score_ptr,  # out: scores [T, K] fp32 (when not SPLIT)
    part_ptr,  # out: packed partial top-K_PAD [T, SPLITS, K_PAD] int64 (when SPLIT)
    T, N, D, K,
    n_per_split,  # adapters per split (multiple of BLOCK_N)
    stride_xt, stride_pn,
    SPLIT: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr,  # rows of the tl.dot tile (>= 16)
    ROWS: tl.constexpr,  # tokens per program (power of two <= BLOCK_T): the real rows of the dot tile
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter + bf16: fp32 tiles before tl.dot
):
    """Running top-K_PAD of |P x| over adapters [pid_s * n_per_split, +n_per_split) for ROWS tokens.

    Per BLOCK_N tile: acc [BLOCK_T, BLOCK_N] = X [BLOCK_T, d_in] @ P_tile^T (tl.dot, BLOCK_D at a
    time), keep the ROWS real rows, pack (|acc|, index) words, merge into best [ROWS, K_PAD].
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * ROWS + tl.arange(0, ROWS)
    row_mask = rows < T
    dot_rows = pid_t * ROWS + tl.arange(0, BLOCK_T)
    dot_mask = (tl.arange(0, BLOCK_T) < ROWS) & (dot_rows < T)  # rows >= ROWS only pad the dot to 16
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    offs_d0 = tl.arange(0, BLOCK_D)
    best = tl.full([ROWS, K_PAD], EMPTY_SLOT, tl.int64)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            d_mask = offs_d < D
            xt = tl.load(x_ptr + dot_rows[:, None] * stride_xt + offs_d[None, :],
                         mask=dot_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            pt = tl.load(p_ptr + offs_n[None, :].to(tl.int64) * stride_pn + offs_d[:, None],
                         mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N] = P^T tile
            if UPCAST:
                xt = xt.to(tl.float32)
                pt = pt.to(tl.float32)
            acc = tl.dot(xt, pt, acc, input_precision="ieee")
        acc = _first_rows(acc, ROWS)  # [ROWS, BLOCK_N]
        words = pack(order_key(tl.abs(acc)), offs_n[None, :])
        words = tl.where(row_mask[:, None] & n_mask[None, :], words, EMPTY_SLOT)
        best = merge_topk_if_better(best, words, K_PAD)
    if SPLIT:
        cols = tl.arange(0, K_PAD)
        offs = (rows[:, None] * SPLITS + pid_s) * K_PAD + cols[None, :]
        tl.store(part_ptr + offs, best, mask=row_mask[:, None])
    else:
        _store_topk(best, rows, row_mask, idx_ptr, score_ptr, K, K, K_PAD)


@triton.jit
def _merge_kernel(
    part_ptr,  # packed partial top-K_PAD lists [T, SPLITS, K_PAD] int64
    idx_ptr,  # out: idx [T, K] int32
    score_ptr,  # out: scores [T, K] fp32
    T, K,
    SPLITS: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program: next_pow2(T) capped at 16 (1 row at decode)
    BLOCK_C: tl.constexpr,  # words per chunk (power of two >= K_PAD)
):
    """Second pass of the split top-k, grid (cdiv(T, BLOCK_T),): for each token, the top-K_PAD of
    its SPLITS * K_PAD packed words, read in [BLOCK_T, BLOCK_C] chunks and merged into a running list."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    L: tl.constexpr = SPLITS * K_PAD
    best = tl.full([BLOCK_T, K_PAD], EMPTY_SLOT, tl.int64)
    for c0 in range(0, L, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        words = tl.load(part_ptr + rows[:, None] * L + cols[None, :],
                        mask=row_mask[:, None] & (cols[None, :] < L), other=EMPTY_SLOT)
        best = merge_topk_if_better(best, words, K_PAD)
    _store_topk(best, rows, row_mask, idx_ptr, score_ptr, K, K, K_PAD)


def _config(t: int, k_pad: int) -> dict:
    """Block sizes keyed on shape (fixed, no autotune: a launch stays capturable and deterministic)."""
    if interpreting():
        block_t = 16  # the interpreter's rank-count top-k builds [ROWS, C, C] tiles (<= 2^20 elements)
        block_n = max(k_pad, 128)
        block_d = 512
        cfg = dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=1)
    else:
        block_t = 16 if t <= 16 else (32 if t <= 64 else 64)
        block_n = max(k_pad, 64)
        block_d = 128 if block_t <= 32 else 64
        warps = 8 if block_t * (block_n + 2 * k_pad) >= 8192 else 4  # int64 top-k words live in registers
        cfg = dict(BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=3)
    cfg["ROWS"] = min(cfg["BLOCK_T"], next_pow2(t))
    return cfg


def _merge_block_c(rows: int, words: int, k_pad: int) -> int:
    """Chunk width of the merge: ~2K words per [rows, C] tile compiled (16 per thread at 4 warps),
    and a [rows, C, C] rank-count tile <= 2^20 elements under the interpreter."""
    if interpreting():
        cap = max(16, 1 << ((20 - (rows.bit_length() - 1)) // 2))
    else:
        cap = max(16, 2048 // rows)
    return max(k_pad, min(next_pow2(words), cap))


def arrow_topk(x: torch.Tensor, prototypes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow retrieval: the k adapters with the largest |p_i . x|, best first. See module docstring."""
    check_topk_args(x, prototypes, k)
    x = rows_contiguous(x)
    prototypes = rows_contiguous(prototypes)
    t, d = x.shape
    n = prototypes.shape[0]
    idx, scores = empty_topk_outputs(x, k)
    if t == 0:
        return idx, scores
    if prototypes.dtype != x.dtype:
        prototypes = prototypes.to(x.dtype)
    k_pad = next_pow2(k)
    cfg = _config(t, k_pad)
    rows, block_n = cfg["ROWS"], cfg["BLOCK_N"]
    t_blocks = triton.cdiv(t, rows)
    n_blocks = triton.cdiv(n, block_n)
    # Split N when the token tiles alone leave SMs idle: each split takes floor(n_blocks / want)
    # whole tiles, so there are between `want` and 2 * `want` splits (~1-2 programs per SM in all),
    # as few partial lists as that allows.
    want = triton.cdiv(num_sms(x.device), t_blocks)
    blocks_per_split = max(1, n_blocks // want)
    splits = triton.cdiv(n_blocks, blocks_per_split)
    n_per_split = blocks_per_split * block_n
    split = splits > 1
    part = (torch.empty((t, splits, k_pad), dtype=torch.int64, device=x.device) if split
            else torch.empty((1,), dtype=torch.int64, device=x.device))
    _arrow_topk_kernel[(t_blocks, splits)](
        x, prototypes, idx, scores, part, t, n, d, k, n_per_split, x.stride(0), prototypes.stride(0),
        SPLIT=split, SPLITS=splits, K_PAD=k_pad, UPCAST=upcast_dot(x.dtype), **cfg)
    if split:
        merge_t = min(16, next_pow2(t))
        block_c = _merge_block_c(merge_t, splits * k_pad, k_pad)
        _merge_kernel[(triton.cdiv(t, merge_t),)](
            part, idx, scores, t, k, SPLITS=splits, K_PAD=k_pad, BLOCK_T=merge_t, BLOCK_C=block_c, num_warps=4)
    return idx, scores

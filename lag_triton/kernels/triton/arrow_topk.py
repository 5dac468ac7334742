"""Arrow retrieval on Triton: a tensor-core scoring GEMM, then a filtered per-row k-select.

    scores[t, i] = P[i] . x[t]   (fp32)                           x [T, d_in], P [N, d_in]
    idx[t]       = the k adapters with the largest |scores[t, i]|, best first (ties -> lower
                   index, NaN ranks like -inf)                    idx [T, k] int32, |scores| [T, k] fp32

Scoring is a GEMM at full tensor-core rate with fp32 output (``common.prototype_scores``: cuBLAS
on CUDA). Selecting k of N per row is then a streaming problem over an fp32 [T, N] matrix, built
like FAISS GPU's WarpSelect / raft's ``warp_sort_filtered``: every value is compared with the
running k-th best and almost all are dropped; survivors are appended to a per-row buffer
(compacted with a prefix sum), and the top k is recomputed only when the buffer would overflow,
and once at the end. On i.i.d. scores the first merge (after CAP values) sets a threshold that
lets through ~k * N / CAP values of the rest, and the next one ~k, so a row of N = 100k costs
one pass of loads and compares plus ~3 merges, where the previous design ran a ``tl.topk``
sorting network on every tile (~85% of its time).

Exactness: the comparison is on the packed (score, index) order of ``_common`` (``key > kth``,
or equal key and lower index), so a filtered-out value can never belong to the top k, ties keep
the reference's order and NaN never enters ahead of a number.

With ``fold_splits()`` on, a few tokens (decode) take ``arrow_decode`` instead: scoring and select
in one launch. With ``filter_gemm()`` on, large libraries take ``arrow_filter``: a GEMM that keeps
only the scores that can reach the top k, the [T, N] matrix never written.

Grid: (T, SPLITS); a program owns one row and N-range. When T alone leaves SMs idle (decode),
N is split into contiguous ranges of whole BLOCKs; each split writes its packed top-K_PAD words
to a [T, SPLITS, K_PAD] int64 scratch, which ``_merge_kernel`` reduces (two-pass top-k) or, with
``fold_splits()``, the row's last split to finish reduces in the same launch (``_common``).
The [T, N] scores are produced and consumed in row chunks of at most ``common.SCORE_CHUNK_BYTES``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import (
    check_topk_args,
    empty_topk_outputs,
    matching_operands,
    prototype_scores,
    scoped_rows,
    score_row_chunks,
)
from ..reference import topk_of_scores
from ._common import (
    EMPTY_SLOT,
    cdiv,
    filter_gemm,
    flush_buffer,
    fold_splits,
    interpreting,
    last_to_arrive,
    merge_block_c,
    merge_partials,
    next_pow2,
    num_sms,
    offer_block,
    on_tensor_device,
    order_key,
    rows_contiguous,
    store_topk,
    ticket_counters,
)
from .arrow_decode import decode_arrow_topk, decode_plan
from .arrow_filter import filter_plan, filtered_arrow_topk, operands_fit
from .tuning import tuned

#: largest padded k the select keeps in registers; a larger k (a rerank of > 1024 candidates per
#: token, far from LAG's k ~ 20) ranks the scores with the reference's sort instead
MAX_K_PAD = 1024


@triton.jit
def _select_kernel(
    s_ptr,  # scores [T, N] fp32, row stride stride_s, unit inner stride (ranked by |s|)
    buf_ptr,  # scratch [T, SPLITS, CAP] int64: survivors waiting for a merge
    idx_ptr,  # out: idx [T, K] int32 (when not SPLIT)
    score_ptr,  # out: |scores| [T, K] fp32 (when not SPLIT)
    part_ptr,  # out: packed partial top-K_PAD [T, SPLITS, K_PAD] int64 (when SPLIT)
    ticket_ptr,  # per-row split counters [>= T] int32, zero between launches (when FOLD)
    allowed_ptr,  # scope masks [S, N] uint8 (when HAS_SCOPE): adapters token t may use are allowed[scope[t]]
    scope_ptr,  # scope row of each token [T] int32 (when HAS_SCOPE)
    N,
    K,
    S,
    n_per_split,  # columns per split (multiple of BLOCK)
    stride_s,
    stride_allowed,
    HAS_SCOPE: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK: tl.constexpr,  # columns loaded per step
    CAP: tl.constexpr,  # buffer words per (row, split) (>= BLOCK)
    K_PAD: tl.constexpr,
    FOLD: tl.constexpr,  # SPLIT only: the row's last split merges the partials (no _merge_kernel)
    MERGE_BLOCK_C: tl.constexpr,  # FOLD only: words per chunk of that merge
):
    """Top-K_PAD of |s[t, n]| over n in [pid_s * n_per_split, +n_per_split) for t = pid_t."""
    t = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    row = s_ptr + t.to(tl.int64) * stride_s
    buf = buf_ptr + (t.to(tl.int64) * SPLITS + pid_s) * CAP
    cols = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
    if HAS_SCOPE:  # a scope row out of [0, S) allows nothing
        srow = tl.load(scope_ptr + t)
        n_hi = tl.where((srow >= 0) & (srow < S), n_hi, n_lo)
        allowed_row = allowed_ptr + srow.to(tl.int64) * stride_allowed

    # An empty running top-K_PAD (kth = EMPTY_SLOT) lets everything through until the buffer first fills.
    best = tl.full([1, K_PAD], EMPTY_SLOT, tl.int64)
    kth = tl.min(best, axis=1, keep_dims=True)
    count = pid_s * 0  # int32 scalar carried through the loop
    for n0 in range(n_lo, n_hi, BLOCK):
        offs = n0 + cols
        mask = offs < n_hi
        if HAS_SCOPE:  # a disallowed adapter is never a candidate: no extra pass, one byte per score
            mask &= tl.load(allowed_row + offs, mask=mask, other=0) != 0
        keys = order_key(tl.abs(tl.load(row + offs, mask=mask, other=0.0)))
        best, kth, count = offer_block(best, kth, count, keys, offs, mask, buf, K_PAD, CAP)
    if count > 0:
        best = flush_buffer(best, buf, count, K_PAD, CAP)

    rows = t + tl.arange(0, 1)
    if SPLIT:
        tl.store(part_ptr + (rows[:, None] * SPLITS + pid_s) * K_PAD + tl.arange(0, K_PAD)[None, :], best)
        if FOLD:
            if last_to_arrive(ticket_ptr + t, SPLITS):
                best = merge_partials(part_ptr, rows, rows >= 0, SPLITS, K_PAD, MERGE_BLOCK_C)
                store_topk(best, rows, rows >= 0, idx_ptr, score_ptr, K, K, K_PAD)
    else:
        store_topk(best, rows, rows >= 0, idx_ptr, score_ptr, K, K, K_PAD)


@triton.jit
def _merge_kernel(
    part_ptr,  # packed partial top-K_PAD lists [T, SPLITS, K_PAD] int64
    idx_ptr,  # out: idx [T, K] int32
    score_ptr,  # out: |scores| [T, K] fp32
    T,
    K,
    SPLITS: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program: next_pow2(T) capped at 16 (1 row at decode)
    BLOCK_C: tl.constexpr,  # words per chunk (power of two >= K_PAD)
):
    """Second pass of the split top-k (unfolded), grid (cdiv(T, BLOCK_T),): each token's top-K_PAD
    of its SPLITS * K_PAD packed words."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    best = merge_partials(part_ptr, rows, row_mask, SPLITS, K_PAD, BLOCK_C)
    store_topk(best, rows, row_mask, idx_ptr, score_ptr, K, K, K_PAD)


def select_config(k_pad: int) -> dict:
    """Default block sizes of the select (a per-GPU table may override them: ``tuning``).

    BLOCK fp32 values per step (8 per thread in flight); CAP = 2 * BLOCK buffered words per
    merge. The interpreter gets small blocks so that the tests exercise many buffer merges.
    """
    block = 64 if interpreting() else 1024
    return dict(BLOCK=block, CAP=2 * block, num_warps=4)


def select_fold_consts(fold: bool, splits: int, k_pad: int) -> dict:
    """The select kernel's FOLD and the merge chunk only its fold reads (a constant when unused)."""
    return dict(FOLD=fold, MERGE_BLOCK_C=merge_block_c(1, splits * k_pad, k_pad) if fold else 1)


def split_plan(t: int, n: int, block: int, sms: int) -> tuple[int, int]:
    """(splits, columns per split): split N only when T rows leave SMs idle, ~2 programs per SM in
    all, and never below 4 blocks per split (each split adds a partial list to the merge)."""
    n_blocks = cdiv(n, block)
    want = min(cdiv(2 * sms, t), max(1, n_blocks // 4))
    per_split = cdiv(n_blocks, max(1, want)) * block
    return cdiv(n, per_split), per_split


def merge_rows(t: int, k_pad: int) -> int:
    """Token rows per program of the split-N merge: up to 16, fewer as k grows, so that its
    [rows, K_PAD + BLOCK_C] tiles stay ~2K words (16 rows at K_PAD = 1024 need 256 KB of shared
    memory on sm_90, over the 227 KB a block may have: the launch failed)."""
    return min(16, next_pow2(t), max(1, 2048 // k_pad))


def _select(
    scores: torch.Tensor,
    k: int,
    idx: torch.Tensor,
    out_scores: torch.Tensor,
    allowed: torch.Tensor | None,
    scope: torch.Tensor | None,
) -> None:
    """idx / out_scores [t, k] = the filtered top-k of |scores| [t, n] per row, among the adapters
    ``allowed[scope[row]]`` when scoped (one launch; two when N is split and the merge is not folded)."""
    t, n = scores.shape
    k_pad = next_pow2(k)
    if k_pad > MAX_K_PAD:
        valid = None if allowed is None else scoped_rows(allowed, scope)
        idx_sorted, values = topk_of_scores(scores.abs(), k, valid)
        found = idx_sorted.shape[1]  # fewer than k when n < k (the filtering GEMM's sample): -1 / NaN after
        idx[:, :found].copy_(idx_sorted)
        out_scores[:, :found].copy_(values)
        idx[:, found:].fill_(-1)
        out_scores[:, found:].fill_(float("nan"))
        return
    cfg = tuned("arrow_select", scores.device, select_config(k_pad), k_pad=k_pad, t=t, n=n)  # CAP >= BLOCK
    splits, per_split = split_plan(t, n, cfg["BLOCK"], num_sms(scores.device))
    chunks = score_row_chunks(t, 2 * splits * cfg["CAP"])  # a row's buffers: the bytes of 2 * CAP scores a split
    if len(chunks) > 1:  # so that they stay within SCORE_CHUNK_BYTES too (16 KB a row: 1 GiB at T = 64k)
        for rows in chunks:
            _select(scores[rows], k, idx[rows], out_scores[rows], allowed, None if scope is None else scope[rows])
        return
    buf = torch.empty((t, splits, cfg["CAP"]), dtype=torch.int64, device=scores.device)
    # buf stands in for the pointers a launch does not read (no split, no scope, no fold)
    part = torch.empty((t, splits, k_pad), dtype=torch.int64, device=scores.device) if splits > 1 else buf
    scoped = allowed is not None
    allowed_u8 = rows_contiguous(allowed).view(torch.uint8) if scoped else buf
    fold = splits > 1 and fold_splits()
    _select_kernel[(t, splits)](
        scores,
        buf,
        idx,
        out_scores,
        part,
        ticket_counters(scores.device, t) if fold else buf,
        allowed_u8,
        scope if scoped else buf,
        n,
        k,
        allowed.shape[0] if scoped else 0,
        per_split,
        scores.stride(0),
        allowed_u8.stride(0) if scoped else 0,
        HAS_SCOPE=scoped,
        SPLIT=splits > 1,
        SPLITS=splits,
        K_PAD=k_pad,
        **select_fold_consts(fold, splits, k_pad),
        **cfg,
    )
    if splits > 1 and not fold:
        merge_t = merge_rows(t, k_pad)
        block_c = merge_block_c(merge_t, splits * k_pad, k_pad)
        _merge_kernel[(cdiv(t, merge_t),)](
            part, idx, out_scores, t, k, SPLITS=splits, K_PAD=k_pad, BLOCK_T=merge_t, BLOCK_C=block_c, num_warps=4
        )


@on_tensor_device
def arrow_topk(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    allowed: torch.Tensor | None = None,
    scope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow retrieval: the k adapters with the largest |p_i . x|, best first (among
    ``allowed[scope[t]]`` when scoped; -1 / NaN past them). See module docstring."""
    check_topk_args(x, prototypes, k, allowed, scope)
    x = rows_contiguous(x)
    prototypes = rows_contiguous(prototypes)
    scope = None if scope is None else scope.contiguous()  # the kernels read it at scope_ptr + t
    x, prototypes = matching_operands(x, prototypes)
    t, n = x.shape[0], prototypes.shape[0]
    idx, scores = empty_topk_outputs(x, k)
    if t > 0 and fold_splits():  # a few tokens: scoring and select in one launch (arrow_decode)
        plan = decode_plan(t, n, x.shape[1], next_pow2(k), num_sms(x.device))
        if plan is not None:
            decode_arrow_topk(x, prototypes, k, idx, scores, allowed, scope, plan)
            return idx, scores
    if t > 0 and filter_gemm() and operands_fit(x, prototypes):  # a large library: no [T, N] scores
        plan = filter_plan(t, n, k)
        if plan is not None:
            filtered_arrow_topk(x, prototypes, k, idx, scores, allowed, scope, plan, seed_topk=gemm_then_select)
            return idx, scores
    gemm_then_select(x, prototypes, k, idx, scores, allowed, scope)
    return idx, scores


def gemm_then_select(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    idx: torch.Tensor,
    scores: torch.Tensor,
    allowed: torch.Tensor | None,
    scope: torch.Tensor | None,
) -> None:
    """idx / scores [T, k] = the filtered select over the fp32 scores of a cuBLAS GEMM, produced in
    row chunks of at most SCORE_CHUNK_BYTES."""
    for rows in score_row_chunks(x.shape[0], prototypes.shape[0]):
        _select(
            prototype_scores(x[rows], prototypes),
            k,
            idx[rows],
            scores[rows],
            allowed,
            None if scope is None else scope[rows],
        )

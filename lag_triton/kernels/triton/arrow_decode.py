"""Arrow retrieval for a few tokens in one launch: a split-d skinny GEMM over the prototypes with the
k-select folded in (taken by ``arrow_topk`` when ``fold_splits()`` is on; see ``decode_plan``).

    scores[t, i] = P[i] . x[t]   (fp32)           x [T <= 32, d_in], P [N, d_in]
    idx[t]       = the k adapters with the largest |scores[t, i]|, best first: ``arrow_topk``'s
                   contract and order (packed keys: ties -> lower index, NaN like -inf)

Grid (NB = cdiv(N, BLOCK_N), D_SPLITS). Program (b, s) multiplies the token rows (padded to 16 or
32, tl.dot tiles) with the BLOCK_N prototypes of block b over its d-range, fp32 accumulation, so P
is read once for all tokens. With D_SPLITS > 1 it stores that partial and the block's last split to
arrive (``last_to_arrive``) sums the D_SPLITS partials in split order, so the scores do not depend
on which program came last. That program ranks its block -- packed words, the top-K_PAD of each
row, RANK_ROWS rows at a time (a [32, 128] int64 sort would spill; 32 token rows always go through
the partials, which the ranking reads back 16 rows at a time) -- and stores them as the block's
list; the last block to arrive merges the NB lists of every row and writes idx / scores.

One launch replaces the GEMM, the select and its merge, and (b, s) programs are planned so that
the whole GPU streams P even at N = 1000, where the GEMM has a handful of output tiles. The final
merge reads T_PAD * NB * K_PAD words in one program, so N is capped (``decode_plan``); larger
libraries take the GEMM + filtered select, whose N-splits fold the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    EMPTY_SLOT,
    cdiv,
    dot_scores,
    interpreting,
    last_to_arrive,
    merge_block_c,
    merge_partials,
    next_pow2,
    order_key,
    pack,
    rows_contiguous,
    scope_allows,
    store_topk,
    ticket_counters,
    topk_words,
    upcast_dot,
)

#: tokens per launch: the rows of one tl.dot tile (16 or 32)
DECODE_MAX_T = 32
#: rows ranked (and merged) at a time
RANK_ROWS = 16
#: blocks whose lists the last program merges, at most, for RANK_ROWS token rows (NB * K_PAD words
#: per row); 32 token rows take half as many, so the merging program reads no more words
DECODE_MAX_BLOCKS = 128
#: the block ranking sorts [16, 128] int64 words: at 4 warps that takes ~250 registers per thread
#: (fp32 spills), at 8 warps ~165 and no spills on sm_90 (``_aot_check --resources``)
DECODE_WARPS = 8


@triton.jit
def _decode_kernel(
    x_ptr,  # x [T, d_in]
    p_ptr,  # prototypes [N, d_in]
    zp_ptr,  # scratch: partial scores [D_SPLITS, T_PAD, N] fp32 (when STAGED)
    part_ptr,  # scratch: each block's top-K_PAD words per row [T_PAD, NB, K_PAD] int64
    ticket_ptr,  # counters [NB + 1] int32, zero between launches: one per block (its d-splits), one for the merge
    idx_ptr,  # out: idx [T, K] int32
    score_ptr,  # out: |scores| [T, K] fp32
    allowed_ptr,  # scope masks [S, N] uint8 (when HAS_SCOPE)
    scope_ptr,  # scope row of each token [T] int32 (when HAS_SCOPE)
    T,
    N,
    D,
    K,
    S,
    d_per_split,  # d_in per split (a multiple of BLOCK_D)
    stride_xt,
    stride_pn,
    stride_allowed,
    HAS_SCOPE: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: bf16 tiles to fp32 before tl.dot (see _interpreter)
    T_PAD: tl.constexpr,  # token rows of the tl.dot tile: 16 or 32
    RANK_ROWS: tl.constexpr,
    STAGED: tl.constexpr,  # scores go through zp_ptr (decode_plan)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_SPLITS: tl.constexpr,
    NB: tl.constexpr,
    K_PAD: tl.constexpr,
    MERGE_BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    rows = tl.arange(0, T_PAD)
    cols = b * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    d_lo = s * d_per_split
    d_hi = tl.minimum(D, d_lo + d_per_split)
    acc = dot_scores(x_ptr, p_ptr, rows, rows < T, cols, col_mask, d_lo, d_hi, stride_xt, stride_pn, BLOCK_D, UPCAST)

    if STAGED:
        zp = zp_ptr + (s * T_PAD + rows[:, None]).to(tl.int64) * N + cols[None, :]
        tl.store(zp, acc, mask=col_mask[None, :])
        ranks_block = last_to_arrive(ticket_ptr + b, D_SPLITS)
    else:
        ranks_block = s == 0
    if ranks_block:
        for g in tl.static_range(T_PAD // RANK_ROWS):
            group = g * RANK_ROWS + tl.arange(0, RANK_ROWS)
            if STAGED:  # the block's scores: its partials summed in split order
                z = tl.zeros([RANK_ROWS, BLOCK_N], dtype=tl.float32)
                for s2 in range(D_SPLITS):
                    z += tl.load(
                        zp_ptr + (s2 * T_PAD + group[:, None]).to(tl.int64) * N + cols[None, :],
                        mask=col_mask[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
            else:
                z = acc
            valid = (group < T)[:, None] & col_mask[None, :]
            if HAS_SCOPE:
                valid = scope_allows(allowed_ptr, scope_ptr, group, group < T, cols, valid, S, stride_allowed)
            words = tl.where(valid, pack(order_key(tl.abs(z)), cols[None, :]), EMPTY_SLOT)
            best = topk_words(words, K_PAD)  # [RANK_ROWS, K_PAD], best first
            tl.store(part_ptr + (group[:, None] * NB + b) * K_PAD + tl.arange(0, K_PAD)[None, :], best)
        if last_to_arrive(ticket_ptr + NB, NB):
            for g in tl.static_range(T_PAD // RANK_ROWS):
                group = g * RANK_ROWS + tl.arange(0, RANK_ROWS)
                best = merge_partials(part_ptr, group, group < T, NB, K_PAD, MERGE_BLOCK_C)
                store_topk(best, group, group < T, idx_ptr, score_ptr, K, K, K_PAD)


#: the plan's launch constants (``decode_plan`` adds the runtime ``d_per_split``)
PLAN_CONSTEXPRS = ("T_PAD", "STAGED", "BLOCK_N", "BLOCK_D", "D_SPLITS", "NB", "MERGE_BLOCK_C")


def decode_plan(t: int, n: int, d: int, k_pad: int, sms: int) -> dict | None:
    """Launch constants of the one-launch Arrow for these shapes, or None where it does not apply
    (more than DECODE_MAX_T tokens, more blocks than the merge takes, k_pad > BLOCK_N)."""
    block_n, block_d = (32, 32) if interpreting() else (128, 64)
    nb = cdiv(n, block_n)
    t_pad = RANK_ROWS if t <= RANK_ROWS else DECODE_MAX_T
    if t > DECODE_MAX_T or nb * t_pad > DECODE_MAX_BLOCKS * RANK_ROWS or k_pad > block_n:
        return None
    # ~2 programs per SM in all: split d_in when there are fewer blocks than that
    d_blocks = max(1, cdiv(d, block_d))  # d_in = 0: one empty split, every score 0
    per = cdiv(d_blocks, max(1, min(d_blocks, cdiv(2 * sms, nb))))
    splits = cdiv(d_blocks, per)
    return dict(
        T_PAD=t_pad,
        # partials to sum, or 32 token rows, which are ranked 16 at a time from what the GEMM
        # stored (a register tile cannot be sliced)
        STAGED=splits > 1 or t_pad > RANK_ROWS,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        NB=nb,
        D_SPLITS=splits,
        d_per_split=per * block_d,
        MERGE_BLOCK_C=merge_block_c(RANK_ROWS, nb * k_pad, k_pad),
    )


def decode_arrow_topk(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    idx: torch.Tensor,
    scores: torch.Tensor,
    allowed: torch.Tensor | None,
    scope: torch.Tensor | None,
    plan: dict,
) -> None:
    """idx / scores [T, k] of ``arrow_topk`` in one launch (x, prototypes: same dtype, unit inner
    stride; shapes and scope checked by the caller; ``plan`` from ``decode_plan``)."""
    t, d = x.shape
    n = prototypes.shape[0]
    k_pad = next_pow2(k)
    dev = x.device
    splits, nb, t_pad = plan["D_SPLITS"], plan["NB"], plan["T_PAD"]
    zp = torch.empty((splits, t_pad, n) if plan["STAGED"] else (1,), dtype=torch.float32, device=dev)
    part = torch.empty((t_pad, nb, k_pad), dtype=torch.int64, device=dev)
    scoped = allowed is not None
    allowed_u8 = rows_contiguous(allowed).view(torch.uint8) if scoped else part  # part: an unread placeholder
    _decode_kernel[(nb, splits)](
        x,
        prototypes,
        zp,
        part,
        ticket_counters(dev, nb + 1),
        idx,
        scores,
        allowed_u8,
        scope if scoped else part,
        t,
        n,
        d,
        k,
        allowed.shape[0] if scoped else 0,
        plan["d_per_split"],
        x.stride(0),
        prototypes.stride(0),
        allowed_u8.stride(0) if scoped else 0,
        HAS_SCOPE=scoped,
        UPCAST=upcast_dot(x.dtype),
        RANK_ROWS=RANK_ROWS,
        K_PAD=k_pad,
        num_warps=DECODE_WARPS,
        **{key: plan[key] for key in PLAN_CONSTEXPRS},
    )

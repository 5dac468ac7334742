"""SpectR rerank on Triton: gather-GEMV of each token's candidates, norms, top-m and weights fused.

    z[t, c]  = A*[cand[t, c]] @ x[t]            (fp32, [r])      x [T, d_in], A* [N, r, d_in]
    key[t,c] = ||z[t, c]||_2   (or candidate_scores[t, c] when given: the "arrow" router)
    sel[t]   = the top_m candidates by key, best first (ties -> lower ADAPTER index, NaN ~ -inf)
    w[t]     = 1 (m = 1) | softmax(key_sel / temperature) | 1 / m          sel/w [T, m], z_out [T, m, r]

Paths, chosen from shapes only (no host sync):

* fused (one kernel, ``_select_kernel`` with Z_MODE=0): one program per token streams its
  candidates in BLOCK_K chunks, computes z on the fly from [BLOCK_K, R_PAD, BLOCK_D] A* tiles,
  keeps a running top-M_PAD of packed (key, adapter) words, then recomputes z of the m winners.
* split-d (few tokens, e.g. decode): ``_partial_z_kernel`` on a (T, k-blocks, D_SPLITS) grid
  writes partial z sums [D_SPLITS, T, k, r] fp32 so the whole GPU streams A*; ``_select_kernel``
  (Z_MODE=1) sums the partials, ranks and gathers the winners' z -- or, with ``fold_splits()``,
  the token's last partial program to finish does that in the same launch (``_common``).
* grouped (many tokens sharing adapters): the (token, candidate) pairs are grouped by adapter on
  the GPU by a counting sort (``group_pairs_by_adapter``: histogram, scan, scatter; no host sync,
  no comparison sort); ``_grouped_z_kernel`` takes BLOCK_P grouped pairs per program and, for
  each distinct adapter in the tile, one tl.dot of the gathered x rows with that adapter's A*
  (A* read once per adapter per tile, x rows stay L2-resident), writing z [T, k, r] fp32;
  ``_select_kernel`` (Z_MODE=1) finishes.

Scratch is O(T * k * r) fp32 (times D_SPLITS <= a few waves of programs on the split-d path).
Candidate rows are expected to hold distinct adapters (arrow_topk and the routers produce them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..common import check_rerank_args, empty_rerank_outputs, matching_operands
from ._common import (
    EMPTY_SLOT,
    NO_ADAPTER,
    cdiv,
    divisible_by_16,
    fold_splits,
    interpreting,
    last_to_arrive,
    merge_topk,
    next_pow2,
    num_sms,
    on_tensor_device,
    order_key,
    pack,
    prev_pow2,
    rows_contiguous,
    ticket_counters,
    unpack_index,
    upcast_dot,
)
from .group_by_adapter import group_pairs_by_adapter


@triton.jit
def _gather_z(
    x_ptr,
    a_ptr,
    t,
    adapters,
    a_mask,
    N,
    R,
    d_lo,
    d_hi,
    stride_xt,
    stride_an,
    stride_ar,
    R_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z[c, :] = sum_{d in [d_lo, d_hi)} A*[adapters[c], :, d] * x[t, d]  -> [C, R_PAD] fp32 (gather-GEMV)."""
    offs_r = tl.arange(0, R_PAD)
    ok = a_mask & (adapters >= 0) & (adapters < N)
    base = adapters.to(tl.int64) * stride_an
    z = tl.zeros([adapters.shape[0], R_PAD], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_hi
        # int64 row offset: x may hold more than 2**31 elements (a long prompt through a wide layer)
        xv = tl.load(x_ptr + t.to(tl.int64) * stride_xt + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + base[:, None, None] + offs_r[None, :, None] * stride_ar + offs_d[None, None, :],
            mask=ok[:, None, None] & (offs_r[None, :, None] < R) & d_mask[None, None, :],
            other=0.0,
        )  # [C, R_PAD, BLOCK_D]
        z += tl.sum(a.to(tl.float32) * xv[None, None, :], axis=2)
    return z


@triton.jit
def _partial_z_kernel(
    x_ptr,  # x [T, d_in]
    a_ptr,  # A* [N, R, d_in]
    cand_ptr,  # candidates [T, K] int32
    zp_ptr,  # out: partial z [Z_SPLITS, T, K, R] fp32
    sel_ptr,  # out: sel [T, M] int32 (FOLD)
    w_ptr,  # out: w [T, M] fp32 (FOLD)
    z_ptr,  # out: z [T, M, R] fp32 (FOLD)
    ticket_ptr,  # per-token counters [>= T] int32, zero between launches (FOLD)
    T,
    N,
    R,
    D,
    K,
    M,
    temperature,
    d_per_split,
    stride_xt,
    stride_an,
    stride_ar,
    Z_SPLITS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    R_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FOLD: tl.constexpr,  # the token's last program to finish ranks it (no _select_kernel launch)
):
    """Split-d gather-GEMV: program (t, kb, s) sums d in [s*d_per_split, +d_per_split) for BLOCK_K candidates."""
    t = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    s = tl.program_id(2)
    k_mask = offs_k < K
    # int32 offsets suffice: rerank_plan takes this path for few tokens only (T * k-blocks < 2 * SMs),
    # so Z_SPLITS * T * K stays far below 2**31
    cand = tl.load(cand_ptr + t * K + offs_k, mask=k_mask, other=0)
    d_lo = s * d_per_split
    d_hi = tl.minimum(D, d_lo + d_per_split)
    z = _gather_z(x_ptr, a_ptr, t, cand, k_mask, N, R, d_lo, d_hi, stride_xt, stride_an, stride_ar, R_PAD, BLOCK_D)
    offs_r = tl.arange(0, R_PAD)
    out = zp_ptr + ((s * T + t) * K + offs_k[:, None]).to(tl.int64) * R + offs_r[None, :]
    tl.store(out, z, mask=k_mask[:, None] & (offs_r[None, :] < R))
    if FOLD:
        if last_to_arrive(ticket_ptr + t, tl.num_programs(1) * tl.num_programs(2)):
            _rank_token(
                t,
                x_ptr,
                a_ptr,
                cand_ptr,
                zp_ptr,  # no candidate scores on this path: an unread placeholder
                zp_ptr,
                sel_ptr,
                w_ptr,
                z_ptr,
                T,
                N,
                R,
                D,
                K,
                M,
                temperature,
                stride_xt,
                stride_an,
                stride_ar,
                stride_cs=0,
                Z_MODE=1,
                Z_SPLITS=Z_SPLITS,
                HAS_SCORES=False,
                SOFTMAX=SOFTMAX,
                R_PAD=R_PAD,
                M_PAD=M_PAD,
                BLOCK_K=BLOCK_K,
                BLOCK_D=BLOCK_D,
            )


@triton.jit
def _grouped_z_kernel(
    x_ptr,  # x [T, d_in]
    a_ptr,  # A* [N, R, d_in]
    sorted_ad_ptr,  # adapters of the (token, candidate) pairs, grouped (group_pairs_by_adapter) [P] int32
    sorted_pair_ptr,  # pair id t*K + c of each grouped entry [P] int64
    z_ptr,  # out: z [T, K, R] fp32 (= [P, R])
    P,
    N,
    R,
    D,
    K,
    stride_xt,
    stride_an,
    stride_ar,
    R_PAD: tl.constexpr,  # >= 16 (tl.dot)
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """SGMV-style shrink: for each distinct adapter a in this tile of sorted pairs,
    z[rows of a] = X[tokens of those rows] @ A*_a^T  ([BLOCK_P, BLOCK_D] x [BLOCK_D, R_PAD] tl.dot)."""
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # P = T * K: may pass 2**31
    p_mask = offs_p < P
    ad = tl.load(sorted_ad_ptr + offs_p, mask=p_mask, other=NO_ADAPTER)
    ad = tl.where(p_mask & (ad >= 0) & (ad < N), ad, NO_ADAPTER)
    pair = tl.load(sorted_pair_ptr + offs_p, mask=p_mask, other=0)
    tok = pair // K
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    z = tl.zeros([BLOCK_P, R_PAD], dtype=tl.float32)
    cur = tl.min(ad, axis=0)
    while cur < NO_ADAPTER:
        rows = ad == cur
        acc = tl.zeros([BLOCK_P, R_PAD], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            xt = tl.load(
                x_ptr + tok[:, None] * stride_xt + offs_d[None, :], mask=rows[:, None] & d_mask[None, :], other=0.0
            )  # [BLOCK_P, BLOCK_D]
            at = tl.load(
                a_ptr + cur.to(tl.int64) * stride_an + offs_r[None, :] * stride_ar + offs_d[:, None],
                mask=r_mask[None, :] & d_mask[:, None],
                other=0.0,
            )  # [BLOCK_D, R_PAD] = A*_a^T tile
            if UPCAST:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        z = tl.where(rows[:, None], acc, z)
        cur = tl.min(tl.where(ad > cur, ad, NO_ADAPTER), axis=0)
    tl.store(z_ptr + pair[:, None] * R + offs_r[None, :], z, mask=p_mask[:, None] & r_mask[None, :])


@triton.jit
def _select_kernel(
    x_ptr,  # x [T, d_in]                       (Z_MODE 0)
    a_ptr,  # A* [N, R, d_in]                   (Z_MODE 0)
    cand_ptr,  # candidates [T, K] int32
    cs_ptr,  # candidate_scores [T, K] fp32     (HAS_SCORES)
    zp_ptr,  # precomputed (partial) z [Z_SPLITS, T, K, R] fp32 (Z_MODE 1)
    sel_ptr,  # out: sel [T, M] int32
    w_ptr,  # out: w [T, M] fp32
    z_ptr,  # out: z [T, M, R] fp32
    T,
    N,
    R,
    D,
    K,
    M,
    temperature,
    stride_xt,
    stride_an,
    stride_ar,
    stride_cs,
    Z_MODE: tl.constexpr,
    Z_SPLITS: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    SOFTMAX: tl.constexpr,
    R_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One token per program: rank its K candidates (streamed in BLOCK_K chunks), write the top M."""
    _rank_token(
        tl.program_id(0),
        x_ptr,
        a_ptr,
        cand_ptr,
        cs_ptr,
        zp_ptr,
        sel_ptr,
        w_ptr,
        z_ptr,
        T,
        N,
        R,
        D,
        K,
        M,
        temperature,
        stride_xt,
        stride_an,
        stride_ar,
        stride_cs,
        Z_MODE,
        Z_SPLITS,
        HAS_SCORES,
        SOFTMAX,
        R_PAD,
        M_PAD,
        BLOCK_K,
        BLOCK_D,
    )


@triton.jit
def _rank_token(
    t,
    x_ptr,
    a_ptr,
    cand_ptr,
    cs_ptr,
    zp_ptr,
    sel_ptr,
    w_ptr,
    z_ptr,
    T,
    N,
    R,
    D,
    K,
    M,
    temperature,
    stride_xt,
    stride_an,
    stride_ar,
    stride_cs,
    Z_MODE: tl.constexpr,
    Z_SPLITS: tl.constexpr,
    HAS_SCORES: tl.constexpr,
    SOFTMAX: tl.constexpr,
    R_PAD: tl.constexpr,
    M_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rank token t's K candidates by key, write its top M (sel, w, z). Pointers as in _select_kernel;
    precomputed z (Z_MODE 1) is read through L2, as a folding launch's other programs wrote it."""
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    # int64 bases of the token's rows: T * K and T * M * R may pass 2**31 (a long prompt on the grouped
    # path); offsets within one token's rows stay int32
    t64 = t.to(tl.int64)
    cand_row = cand_ptr + t64 * K
    zp_tok = zp_ptr + t64 * K * R  # split s's partials lie s * T * K * R further on
    split_stride = tl.cast(T, tl.int64) * K * R
    best = tl.full([1, M_PAD], EMPTY_SLOT, tl.int64)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        # .cg, as every load of a folding launch after its ticket (_aot_check.fold_ordering_error)
        cand = tl.load(cand_row + offs_k, mask=k_mask, other=0, cache_modifier=".cg")
        if HAS_SCORES:
            key = tl.load(cs_ptr + t64 * stride_cs + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        else:
            if Z_MODE == 0:
                z = _gather_z(
                    x_ptr, a_ptr, t, cand, k_mask, N, R, 0, D, stride_xt, stride_an, stride_ar, R_PAD, BLOCK_D
                )
            else:
                z = tl.zeros([BLOCK_K, R_PAD], dtype=tl.float32)
                for s in range(Z_SPLITS):
                    z += tl.load(
                        zp_tok + s * split_stride + (offs_k[:, None] * R + offs_r[None, :]),
                        mask=k_mask[:, None] & r_mask[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
            # correctly rounded, as torch's norm: tl.sqrt is sqrt.approx.ftz on the GPU (np.sqrt under
            # the interpreter), which flushes sums of squares below 2**-126 to 0 and so ties tiny-norm
            # candidates that the reference ranks (on sm_90 sqrt.rn adds no spills: _aot_check --resources)
            key = tl.sqrt_rn(tl.sum(z * z, axis=1))
        words = pack(order_key(key), cand)
        words = tl.where(k_mask & (cand >= 0) & (cand < N), words, EMPTY_SLOT)  # -1: no candidate (a scope)
        best = merge_topk(best, tl.reshape(words, [1, BLOCK_K]), M_PAD)
    # Winners (adapter ids), then their position in the candidate row (for scores / precomputed z).
    sel = tl.reshape(unpack_index(best), [M_PAD])
    offs_m = tl.arange(0, M_PAD)
    m_mask = offs_m < M
    ok = m_mask & (sel >= 0) & (sel < N)
    if HAS_SCORES or Z_MODE == 1:
        pos = tl.full([M_PAD], 2147483647, tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            cand = tl.load(cand_row + offs_k, mask=offs_k < K, other=-1, cache_modifier=".cg")
            hit = cand[None, :] == sel[:, None]
            pos = tl.minimum(pos, tl.min(tl.where(hit, offs_k[None, :], 2147483647), axis=1))
        ok = ok & (pos < K)
        pos = tl.where(ok, pos, 0)
    if Z_MODE == 0:
        zs = _gather_z(x_ptr, a_ptr, t, sel, ok, N, R, 0, D, stride_xt, stride_an, stride_ar, R_PAD, BLOCK_D)
    else:
        zs = tl.zeros([M_PAD, R_PAD], dtype=tl.float32)
        for s in range(Z_SPLITS):
            zs += tl.load(
                zp_tok + s * split_stride + (pos[:, None] * R + offs_r[None, :]),
                mask=ok[:, None] & r_mask[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
    if HAS_SCORES:
        skey = tl.load(cs_ptr + t64 * stride_cs + pos, mask=ok, other=0.0).to(tl.float32)
    else:
        skey = tl.sqrt_rn(tl.sum(zs * zs, axis=1))  # as the ranking's key
    # Weights over the valid picks only (fewer than M when a scope left fewer candidates); others 0.
    if SOFTMAX:
        # (key - max key) / temperature, as common.selection_weights: no inf / inf at a tiny temperature
        v = tl.where(ok, skey, float("-inf"))
        e = tl.where(ok, tl.exp((v - tl.max(v, axis=0)) / temperature), 0.0)
        total = tl.sum(e, axis=0)
        w = tl.where(ok, e / tl.where(total == 0, 1.0, total), 0.0)  # no pick: 0; an inf key: NaN, as softmax
    else:
        w = tl.where(ok, 1.0 / tl.maximum(tl.sum(ok.to(tl.float32), axis=0), 1.0), 0.0)
    tl.store(sel_ptr + t64 * M + offs_m, tl.where(ok, sel, -1), mask=m_mask)
    tl.store(w_ptr + t64 * M + offs_m, w, mask=m_mask)
    z_out = z_ptr + t64 * M * R + (offs_m[:, None] * R + offs_r[None, :])
    tl.store(z_out, zs, mask=m_mask[:, None] & r_mask[None, :])


#: fp32 values of one gather-GEMV tile [candidates, R_PAD, BLOCK_D] of the partial-z programs (128 per
#: thread at 4 warps; half of it in a select that gathers): on sm_90 the rank-6 to rank-128
#: configurations compile without spills at these sizes (``_aot_check --resources``)
GATHER_TILE = 16384
#: the same for operands without Triton's divisibility-16 specialisation (odd d_in): their loads are
#: scalar, each holding a 64-bit address, so a tile costs four times the registers or more (sm_90:
#: an aligned rank-6 partial-z tile 63 registers, the same tile unaligned 255 and spilling)
UNALIGNED_GATHER_TILE = GATHER_TILE // 8


@dataclass(frozen=True)
class RerankPlan:
    """How one call runs (from shapes only): which z path, and every launch constant."""

    path: str  # "scores" (rank by candidate_scores), "fused", "split" (split-d partial z) or "grouped"
    m_pad: int
    r_pad: int
    block_k: int  # candidates per step of the select (and of the partial-z programs)
    block_d: int  # d_in per step of the gather-GEMV tiles
    gather_warps: int = 4  # of the programs that gather A* tiles (partial z; the select when z_mode 0)
    z_splits: int = 1  # split path: partial z sums over d
    d_per_split: int = 0  # split path: d_in per split (a multiple of block_d)
    block_p: int = 0  # grouped path: sorted (token, candidate) pairs per program
    grouped_block_d: int = 0  # grouped path: d_in per tl.dot step

    @property
    def z_mode(self) -> int:
        """0: the select computes z itself; 1: it reads precomputed (partial) z."""
        return 1 if self.path in ("split", "grouped") else 0

    def partial_fold_consts(self, fold: bool, softmax: bool) -> dict:
        """The partial-z kernel's FOLD and the constants only its fold reads (fixed when not folding,
        so that one variant compiles)."""
        if not fold:
            return dict(FOLD=False, Z_SPLITS=1, SOFTMAX=False, M_PAD=1)
        return dict(FOLD=True, Z_SPLITS=self.z_splits, SOFTMAX=softmax, M_PAD=self.m_pad)

    @property
    def select_warps(self) -> int:
        return self.gather_warps if self.z_mode == 0 else 4


def _gather_blocks(m_pad: int, r_pad: int, tile: int, min_block_d: int) -> dict:
    """Launch constants of the gather-GEMV tiles [BLOCK_K or M_PAD, R_PAD, BLOCK_D]: at most ``tile``
    fp32 values, a large rank taking fewer candidates per step (down to M_PAD, which the running
    top-m needs) while the d step keeps 16 elements (32 bytes of a row: whole sectors), then a
    shorter d step (down to ``min_block_d``); a tile still larger gets 8 warps."""
    if interpreting():  # larger steps: fewer interpreted iterations
        block_k = max(m_pad, 64)
        return dict(block_k=block_k, block_d=max(16, min(128, prev_pow2(8192 // (max(m_pad, 16) * r_pad)))))
    block_k = max(m_pad, min(16, tile // (r_pad * 16)))
    block_d = max(min_block_d, min(64, prev_pow2(tile // (block_k * r_pad))))
    return dict(block_k=block_k, block_d=block_d, gather_warps=8 if block_k * r_pad * block_d > tile else 4)


def rerank_plan(
    t: int, n: int, r: int, d: int, k: int, m: int, has_scores: bool, sms: int, aligned: bool = True
) -> RerankPlan:
    """The launch plan of ``spectr_rerank`` for these shapes on a GPU with ``sms`` SMs; ``aligned``:
    x and A* get Triton's divisibility-16 specialisation (:func:`._common.divisible_by_16`)."""
    m_pad, r_pad = next_pow2(m), next_pow2(r)
    pads = dict(m_pad=m_pad, r_pad=r_pad)
    # A vectorised load needs a d step of at least one 16-byte vector per row and lane group; scalar
    # loads can step by less, which keeps the largest tiles (top_m 16 at rank 128) spill-free.
    tile, min_block_d = (GATHER_TILE, 16) if aligned else (UNALIGNED_GATHER_TILE, 4)
    # The select that gathers z itself (fused, scores) keeps its running top-m and the winners' tile
    # live beside the gather tile: half the tile of the partial-z programs.
    if has_scores:  # ranking needs no z: the select computes only the winners' z
        return RerankPlan("scores", **pads, **_gather_blocks(m_pad, r_pad, tile // 2, min_block_d))
    blocks = _gather_blocks(m_pad, r_pad, tile, min_block_d)
    if t >= 64 and t * k >= n:  # many tokens sharing adapters; [BLOCK_P, R_PAD] fp32 accumulators x 2
        block_p = 128 if interpreting() else (64 if r_pad <= 32 else 32)
        block_d = 128 if interpreting() else (64 if aligned else 16)
        return RerankPlan("grouped", **pads, **blocks, block_p=block_p, grouped_block_d=block_d)
    # Whether to split d follows the shapes alone (the candidate blocks of the aligned tiles): an odd
    # d_in takes the path of its aligned neighbours.
    k_blocks = cdiv(k, (blocks if aligned else _gather_blocks(m_pad, r_pad, GATHER_TILE, 16))["block_k"])
    if t * k_blocks < 2 * sms:  # few tokens: split d across programs so that the whole GPU streams A*
        d_blocks = max(1, cdiv(d, blocks["block_d"]))  # d_in = 0: one split, whose z sums nothing
        splits = max(1, min(d_blocks, cdiv(4 * sms, t * k_blocks), 64))
        per = cdiv(d_blocks, splits)
        z_splits = cdiv(d_blocks, per)
        return RerankPlan("split", **pads, **blocks, z_splits=z_splits, d_per_split=per * blocks["block_d"])
    return RerankPlan("fused", **pads, **_gather_blocks(m_pad, r_pad, tile // 2, min_block_d))


@on_tensor_device
def spectr_rerank(
    x: torch.Tensor,
    a_star: torch.Tensor,
    candidates: torch.Tensor,
    top_m: int,
    combine: str = "softmax",
    temperature: float = 1.0,
    candidate_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpectR rerank of each token's k candidates (see module docstring for the math and paths)."""
    check_rerank_args(x, a_star, candidates, top_m, combine, temperature, candidate_scores)
    x = rows_contiguous(x)
    a_star = rows_contiguous(a_star)
    if a_star.stride(1) * max(0, a_star.shape[1] - 1) >= 2**31:
        # rank offsets are int32 in the kernels (int64 would cost registers in every layout): a view
        # of [r, N, d_in]-like storage, whose rank stride is N * d_in, is copied to rows of rank rows
        a_star = a_star.contiguous()
    candidates = candidates.contiguous()
    x, a_star = matching_operands(x, a_star)
    t, d = x.shape
    n, r, _ = a_star.shape
    k = candidates.shape[1]
    m = top_m
    dev = x.device
    sel, w, z = empty_rerank_outputs(x, m, r)
    if t == 0 or r == 0:
        if r == 0 and t > 0:  # degenerate library: as one of rank 1 whose A* is 0 (every norm 0), z [T, m, 0]
            zeros = torch.zeros((n, 1, d), dtype=x.dtype, device=dev)
            sel, w, _ = spectr_rerank(x, zeros, candidates, top_m, combine, temperature, candidate_scores)
        return sel, w, z
    has_scores = candidate_scores is not None
    cs = candidate_scores.float().contiguous() if has_scores else w  # dummy pointer when absent
    strides = (x.stride(0), a_star.stride(0), a_star.stride(1))
    aligned = divisible_by_16(x, a_star, ints=(d, *strides))
    plan = rerank_plan(t, n, r, d, k, m, has_scores, num_sms(dev), aligned)
    softmax = m > 1 and combine == "softmax"
    zp = w  # dummy pointer unless a z path writes it
    if plan.path == "grouped":
        p = t * k
        sorted_ad, order = group_pairs_by_adapter(candidates, n)
        zp = torch.empty((t, k, r), dtype=torch.float32, device=dev)
        _grouped_z_kernel[(cdiv(p, plan.block_p),)](
            x,
            a_star,
            sorted_ad,
            order,
            zp,
            p,
            n,
            r,
            d,
            k,
            *strides,
            R_PAD=max(plan.r_pad, 16),
            BLOCK_P=plan.block_p,
            BLOCK_D=plan.grouped_block_d,
            UPCAST=upcast_dot(x.dtype),
            num_warps=4,
        )
    elif plan.path == "split":
        zp = torch.empty((plan.z_splits, t, k, r), dtype=torch.float32, device=dev)
        fold = fold_splits()
        _partial_z_kernel[(t, cdiv(k, plan.block_k), plan.z_splits)](
            x,
            a_star,
            candidates,
            zp,
            sel,
            w,
            z,
            ticket_counters(dev, t) if fold else sel,  # sel: an unread placeholder
            t,
            n,
            r,
            d,
            k,
            m,
            float(temperature),
            plan.d_per_split,
            *strides,
            R_PAD=plan.r_pad,
            BLOCK_K=plan.block_k,
            BLOCK_D=plan.block_d,
            **plan.partial_fold_consts(fold, softmax),
            num_warps=plan.gather_warps,
        )
        if fold:
            return sel, w, z
    _select_kernel[(t,)](
        x,
        a_star,
        candidates,
        cs,
        zp,
        sel,
        w,
        z,
        t,
        n,
        r,
        d,
        k,
        m,
        float(temperature),
        *strides,
        k,
        Z_MODE=plan.z_mode,
        Z_SPLITS=plan.z_splits,
        HAS_SCORES=has_scores,
        SOFTMAX=softmax,
        R_PAD=plan.r_pad,
        M_PAD=plan.m_pad,
        BLOCK_K=plan.block_k,
        BLOCK_D=plan.block_d,
        num_warps=plan.select_warps,
    )
    return sel, w, z

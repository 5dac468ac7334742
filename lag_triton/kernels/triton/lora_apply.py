"""Segmented gather-BGMV apply on Triton.

    y[t] += sum_j w[t, j] * B*[sel[t, j]] @ z[t, j]        y [T, d_out], B* [N, d_out, r],
                                                           sel/w [T, m], z [T, m, r] fp32
summed in fp32, rounded once into y's dtype, in place.

One kernel, grid (cdiv(T, BLOCK_T), cdiv(d_out, BLOCK_O)). A program owns BLOCK_T token rows
and BLOCK_O outputs, so each y element is read and written exactly once (no atomics, any
top_m). Per choice j and rank chunk it needs, for each row, the row's adapter tile
B*[sel[t, j], o-block, r-chunk]:

* gather (BGMV): each row loads its own tile ([BLOCK_O, BLOCK_T, BLOCK_R], row-specific base
  offsets), multiplies it by the row's w_j z_j chunk and sums over r. No sort, no loop over the
  distinct adapters of a tile; rows that share an adapter read the same bytes, which L1/L2 serve.
* shared segment (SGMV-style): when every row of the tile uses one adapter for choice j, that
  adapter's [BLOCK_O, BLOCK_R] tile is loaded once and broadcast over the rows.

Decode (T < SORT_MIN_T) takes the rows in order. Prefill first sorts the tokens by their first
choice on the GPU (torch.sort: no host sync), so that tokens routed to one adapter sit in the
same tiles and take the shared path. A tile mixing adapters stays on the gather path: looping
over the distinct adapters of a tile serially (the first SGMV of this backend) was 9x slower than
a gather at T = 2048, N = 1000 on the H100 (bench/results/nvidia-h100-80gb-hbm3-2026-11-26.md).
Both paths form the same fp32 products and sum them over r in the same chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_apply_args
from ._common import NO_ADAPTER, interpreting, next_pow2, num_sms

#: from this many tokens on, rows are grouped by adapter (sorted by their first choice) before the apply
SORT_MIN_T = 64


@triton.jit
def _lora_apply_kernel(
    y_ptr,  # y [T, DOUT], row stride stride_yt, unit inner stride (read-modify-write)
    b_ptr,  # B* [N, DOUT, R], strides (stride_bn, stride_bo, 1)
    sel_ptr,  # sel [T, M] int32, contiguous
    w_ptr,  # w [T, M] fp32, contiguous
    z_ptr,  # z [T, M, R] fp32, contiguous
    order_ptr,  # token order [T] int64: tokens sorted by sel[:, 0] (read only when SORTED)
    T, N, DOUT, R, M,
    stride_yt, stride_bn, stride_bo,
    SORTED: tl.constexpr,  # rows come in order_ptr's order and tiles that share an adapter load it once
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rank chunk (power of two); R is covered in cdiv(R, BLOCK_R) steps
):
    """y[rows, o-block] += sum_j sum_r B*[sel[rows, j], o-block, r] * (w[rows, j] z[rows, j, r]), in fp32."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = offs_t < T
    if SORTED:
        rows = tl.load(order_ptr + offs_t, mask=row_mask, other=0)
    else:
        rows = offs_t.to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < DOUT
    offs_r0 = tl.arange(0, BLOCK_R)
    # Tiles are laid out [BLOCK_O, BLOCK_T(, BLOCK_R)], o before t: Triton orders the dims of equal
    # (unknown) contiguity by position, so this puts a warp's threads on neighbouring outputs of one
    # row (r fastest, then o: one contiguous run of B* per row) instead of on 4 different rows.
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    for j in range(0, M):
        ad = tl.load(sel_ptr + rows * M + j, mask=row_mask, other=0)
        ok = row_mask & (ad >= 0) & (ad < N)  # an out-of-range index contributes nothing (never read)
        wj = tl.load(w_ptr + rows * M + j, mask=ok, other=0.0)
        base = ad.to(tl.int64) * stride_bn  # row-specific adapter base: the gather
        # One adapter for every valid row (never true for a tile without valid rows: MAX > -1).
        lo = tl.min(tl.where(ok, ad, NO_ADAPTER), axis=0)
        shared = lo == tl.max(tl.where(ok, ad, -1), axis=0)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + offs_r0
            r_mask = offs_r < R
            zj = tl.load(z_ptr + (rows[:, None] * M + j) * R + offs_r[None, :],
                         mask=ok[:, None] & r_mask[None, :], other=0.0) * wj[:, None]  # [BLOCK_T, BLOCK_R]
            if SORTED and shared:
                b_tile = tl.load(b_ptr + lo.to(tl.int64) * stride_bn + offs_o[:, None].to(tl.int64) * stride_bo
                                 + offs_r[None, :], mask=o_mask[:, None] & r_mask[None, :],
                                 other=0.0)  # [BLOCK_O, BLOCK_R]: the tile's one adapter, loaded once
                acc += tl.sum(b_tile.to(tl.float32)[:, None, :] * zj[None, :, :], axis=2)
            else:
                b_rows = tl.load(b_ptr + base[None, :, None] + offs_o[:, None, None].to(tl.int64) * stride_bo
                                 + offs_r[None, None, :],
                                 mask=o_mask[:, None, None] & ok[None, :, None] & r_mask[None, None, :],
                                 other=0.0)  # [BLOCK_O, BLOCK_T, BLOCK_R]: B*[sel[t, j], o-block, r-chunk] per row
                acc += tl.sum(b_rows.to(tl.float32) * zj[None, :, :], axis=2)
    y_ptrs = y_ptr + rows[None, :] * stride_yt + offs_o[:, None]  # [BLOCK_O, BLOCK_T]
    mask = o_mask[:, None] & row_mask[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=mask)


def _config(t: int, d_out: int, r: int, device: torch.device) -> dict:
    """Block sizes from shapes only. The gathered [BLOCK_O, BLOCK_T, BLOCK_R] tile is bounded
    (~4K fp32 products: 32 per thread at 4 warps) so it stays in registers at any r; r beyond
    BLOCK_R = 16 is looped over."""
    block_r = min(next_pow2(r), 16)
    block_t = min(next_pow2(t), 1 if t == 1 else 8)
    block_o = max(16, min(256, 4096 // (block_t * block_r)))
    if not interpreting():
        # Few tokens: narrower o-blocks so the grid still covers the SMs (decode: T = 1).
        while block_o > 32 and triton.cdiv(t, block_t) * triton.cdiv(d_out, block_o) < 2 * num_sms(device):
            block_o //= 2
    return dict(BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_R=block_r, num_warps=4)


def lora_apply(
    y: torch.Tensor, b_star: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """y += sum_j w[:, j] * (B*[sel[:, j]] @ z[:, j]), summed in fp32, written in y's dtype, in place."""
    check_apply_args(y, b_star, sel, w, z)
    t, d_out = y.shape
    n, _, r = b_star.shape
    m = sel.shape[1]
    if t == 0 or r == 0 or m == 0 or d_out == 0:
        return y
    target = y if y.stride(-1) == 1 else y.contiguous()
    b_star = b_star.contiguous()
    sel = sel.contiguous()
    w = w.contiguous()
    z = z.contiguous()
    sort = t >= SORT_MIN_T
    order = torch.sort(sel[:, 0]).indices if sort else sel  # sel: an unread placeholder pointer
    cfg = _config(t, d_out, r, y.device)
    grid = (triton.cdiv(t, cfg["BLOCK_T"]), triton.cdiv(d_out, cfg["BLOCK_O"]))
    _lora_apply_kernel[grid](
        target, b_star, sel, w, z, order, t, n, d_out, r, m, target.stride(0), b_star.stride(0), b_star.stride(1),
        SORTED=sort, **cfg)
    if target is not y:
        y.copy_(target)
    return y

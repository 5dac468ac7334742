"""Segmented gather-BGMV apply on Triton.

    y[t] += sum_j w[t, j] * B*[sel[t, j]] @ z[t, j]        y [T, d_out], B* [N, d_out, r] (any strides),
                                                           sel/w [T, m], z [T, m, r] fp32
summed in fp32, rounded once into y's dtype, in place.

One kernel, grid (cdiv(T, BLOCK_T), cdiv(d_out, BLOCK_O)). A program owns BLOCK_T token rows
and BLOCK_O outputs, so each y element is read and written exactly once (no atomics, any
top_m). For each choice j it walks the rank: per c < r, each row loads the column
B*[sel[t, j], o-block, c] (a gather: row-specific base offsets) and adds it times w_j z_j[c].
With B* laid out rank-major (``prepare_b_star``: stride 1 along d_out) that column is contiguous,
so the loads are 16-byte vectors along the outputs with no rank padding, as in Punica's BGMV;
the [N, d_out, r] layout of a library file works too, with strided loads.

When every row of the tile uses one adapter for choice j (shared segment, SGMV-style), that
adapter's column is loaded once and broadcast over the rows. Decode (T < SORT_MIN_T) takes the
rows in order. Prefill first groups the tokens by their first choice on the GPU (a counting sort,
``group_by_adapter``: no host sync), so that tokens routed to one adapter share tiles. Both paths
form the same fp32 products in the same order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_apply_args
from ._common import NO_ADAPTER, cdiv, interpreting, next_pow2, num_sms, on_tensor_device
from .group_by_adapter import group_pairs_by_adapter
from .tuning import tuned

#: from this many tokens on, rows are grouped by adapter (by their first choice) before the apply
SORT_MIN_T = 64


@triton.jit
def _lora_apply_kernel(
    y_ptr,  # y [T, DOUT], row stride stride_yt, unit inner stride (read-modify-write)
    b_ptr,  # B* [N, DOUT, R], strides (stride_bn, stride_bo, stride_br)
    sel_ptr,  # sel [T, M] int32, contiguous
    w_ptr,  # w [T, M] fp32, contiguous
    z_ptr,  # z [T, M, R] fp32, contiguous
    order_ptr,  # token order [T] int64: tokens grouped by sel[:, 0] (read only when SORTED)
    T,
    N,
    DOUT,
    R,
    M,
    stride_yt,
    stride_bn,
    stride_bo,
    stride_br,
    SORTED: tl.constexpr,  # rows come in order_ptr's order and tiles that share an adapter load it once
    BLOCK_T: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """y[rows, o-block] += sum_j sum_c B*[sel[rows, j], o-block, c] * (w[rows, j] z[rows, j, c]), in fp32."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = offs_t < T
    if SORTED:
        rows = tl.load(order_ptr + offs_t, mask=row_mask, other=0)
    else:
        rows = offs_t.to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < DOUT
    o_off = offs_o.to(tl.int64) * stride_bo
    # Tiles are [BLOCK_O, BLOCK_T]: outputs first, so a warp's threads sit on neighbouring outputs
    # of one row (one contiguous run of B* and of y) rather than on different rows.
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    for j in range(0, M):
        ad = tl.load(sel_ptr + rows * M + j, mask=row_mask, other=0)
        ok = row_mask & (ad >= 0) & (ad < N)  # an out-of-range index contributes nothing (never read)
        wj = tl.load(w_ptr + rows * M + j, mask=ok, other=0.0)
        base = ad.to(tl.int64) * stride_bn  # row-specific adapter base: the gather
        # One adapter for every valid row (never true for a tile without valid rows: MAX > -1).
        lo = tl.min(tl.where(ok, ad, NO_ADAPTER), axis=0)
        shared = lo == tl.max(tl.where(ok, ad, -1), axis=0)
        z_row = z_ptr + (rows * M + j) * R
        for c in range(0, R):
            zc = tl.load(z_row + c, mask=ok, other=0.0) * wj  # [BLOCK_T]
            # c * stride_br passes 2**31 in some layouts of B* ([r, N, d_out] viewed as [N, d_out, r]:
            # stride_br = N * d_out), so it is summed in int64 from two int32 products, exact for r < 2**15
            # (and wherever one int32 product was): one int64 product of the loop counter let LLVM's loop
            # strength reduction give the tile's addresses 64-bit induction variables (sm_90 prefill
            # tile: 122 -> 168 registers)
            b_rank = b_ptr + (tl.cast(c * (stride_br >> 16), tl.int64) << 16) + c * (stride_br & 65535)
            if SORTED and shared:
                b_col = tl.load(
                    b_rank + lo.to(tl.int64) * stride_bn + o_off, mask=o_mask, other=0.0
                )  # [BLOCK_O]: the tile's one adapter, loaded once
                # rows without a pick add nothing, not 0 * B* (NaN where B* holds an inf)
                acc += tl.where(ok[None, :], b_col.to(tl.float32)[:, None] * zc[None, :], 0.0)
            else:
                b_cols = tl.load(
                    b_rank + base[None, :] + o_off[:, None],
                    mask=o_mask[:, None] & ok[None, :],
                    other=0.0,
                )  # [BLOCK_O, BLOCK_T] per row
                acc += b_cols.to(tl.float32) * zc[None, :]
    y_ptrs = y_ptr + rows[None, :] * stride_yt + offs_o[:, None]  # [BLOCK_O, BLOCK_T]
    mask = o_mask[:, None] & row_mask[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=mask)


def apply_config(t: int, d_out: int, sms: int) -> dict:
    """Default block sizes from shapes only (and the GPU's SM count; a per-GPU table may override them:
    ``tuning``): a [BLOCK_O, BLOCK_T] fp32 accumulator of <= 16 values per thread."""
    block_t = min(next_pow2(t), 1 if t == 1 else 8)
    block_o = 256
    if not interpreting():
        # Few tokens: narrower o-blocks so the grid still covers the SMs (decode: T = 1).
        while block_o > 64 and cdiv(t, block_t) * cdiv(d_out, block_o) < 2 * sms:
            block_o //= 2
    warps = max(1, min(4, block_o * block_t // 512))
    return dict(BLOCK_T=block_t, BLOCK_O=block_o, num_warps=warps)


def prepare_b_star(b_star: torch.Tensor) -> torch.Tensor:
    """B* [N, d_out, r] stored rank-major (a view with stride 1 along d_out): what the kernel reads fastest."""
    if b_star.dim() == 3 and b_star.stride(1) == 1:
        return b_star
    return b_star.transpose(1, 2).contiguous().transpose(1, 2)


@on_tensor_device
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
    sel = sel.contiguous()
    w = w.contiguous()
    z = z.contiguous()
    sort = t >= SORT_MIN_T
    # tokens grouped by their first choice (pair id = token id, as sel[:, :1] has one column)
    order = group_pairs_by_adapter(sel[:, :1], n)[1] if sort else sel  # sel: an unread placeholder pointer
    cfg = tuned("lora_apply", y.device, apply_config(t, d_out, num_sms(y.device)), t=t, d_out=d_out, r=r)
    grid = (cdiv(t, cfg["BLOCK_T"]), cdiv(d_out, cfg["BLOCK_O"]))
    _lora_apply_kernel[grid](
        target, b_star, sel, w, z, order, t, n, d_out, r, m, target.stride(0), *b_star.stride(), SORTED=sort, **cfg
    )
    if target is not y:
        y.copy_(target)
    return y

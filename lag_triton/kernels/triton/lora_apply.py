"""Gather-BGMV / SGMV apply on Triton.

    y[t] += sum_j w[t, j] * B*[sel[t, j]] @ z[t, j]        y [T, d_out], B* [N, d_out, r],
                                                           sel/w [T, m], z [T, m, r] fp32
summed in fp32, rounded once into y's dtype, in place.

One kernel, grid (cdiv(T, BLOCK_T), cdiv(d_out, BLOCK_O)). A program owns BLOCK_T token rows
(so each y element is read and written exactly once: no atomics, any top_m) and, for every
choice j and every distinct adapter a among its rows' sel[:, j], does one
[BLOCK_T, R_PAD] x [R_PAD, BLOCK_O] tl.dot of the (w-scaled, row-masked) z with B*_a^T.

* BGMV path (few tokens): rows are the tokens in order.
* SGMV path (many tokens): rows are the tokens sorted on the GPU by their first choice
  (torch.sort, no host sync), so a tile's rows share few adapters and each B*_a tile is loaded
  once for all of them. Choices j >= 1 fall back to per-adapter loads inside the tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import check_apply_args
from ._common import NO_ADAPTER, interpreting, next_pow2, rows_contiguous


@triton.jit
def _lora_apply_kernel(
    y_ptr,  # y [T, DOUT], row stride stride_yt (read-modify-write)
    b_ptr,  # B* [N, DOUT, R]
    sel_ptr,  # sel [T, M] int32
    w_ptr,  # w [T, M] fp32
    z_ptr,  # z [T, M, R] fp32
    perm_ptr,  # token order [T] int64 (SORTED)
    T, N, DOUT, R, M,
    stride_yt, stride_bn, stride_bo,
    SORTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
    R_PAD: tl.constexpr,  # >= 16 (tl.dot)
):
    """y[rows, o-block] += sum_j sum_a (w_j z_j masked to rows of adapter a) @ B*_a[o-block]^T."""
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = offs < T
    if SORTED:
        tok = tl.load(perm_ptr + offs, mask=row_mask, other=0)
    else:
        tok = offs.to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < DOUT
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for j in range(0, M):
        ad = tl.load(sel_ptr + tok * M + j, mask=row_mask, other=NO_ADAPTER)
        ad = tl.where(row_mask & (ad >= 0) & (ad < N), ad, NO_ADAPTER)
        wj = tl.load(w_ptr + tok * M + j, mask=row_mask, other=0.0)
        zj = tl.load(z_ptr + (tok[:, None] * M + j) * R + offs_r[None, :],
                     mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_T, R_PAD]
        zj = zj * wj[:, None]
        cur = tl.min(ad, axis=0)
        while cur < NO_ADAPTER:
            zm = tl.where((ad == cur)[:, None], zj, 0.0)
            bt = tl.load(b_ptr + cur.to(tl.int64) * stride_bn + offs_o[None, :].to(tl.int64) * stride_bo
                         + offs_r[:, None],
                         mask=r_mask[:, None] & o_mask[None, :], other=0.0)  # [R_PAD, BLOCK_O] = B*_a^T tile
            acc = tl.dot(zm, bt.to(tl.float32), acc, input_precision="ieee")
            cur = tl.min(tl.where(ad > cur, ad, NO_ADAPTER), axis=0)
    y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_o[None, :]
    mask = row_mask[:, None] & o_mask[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(yv.dtype), mask=mask)


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
    interp = interpreting()
    sorted_path = t >= 32
    if sorted_path:
        perm = torch.sort(sel[:, 0], stable=False).indices  # int64, on device, no sync
    else:
        perm = sel  # unused dummy pointer
    block_t = 16 if t <= 16 else (32 if interp else 64)
    block_o = 128 if interp else (64 if t <= 16 else 128)
    grid = (triton.cdiv(t, block_t), triton.cdiv(d_out, block_o))
    _lora_apply_kernel[grid](
        target, b_star, sel, w, z, perm, t, n, d_out, r, m, target.stride(0), b_star.stride(0), b_star.stride(1),
        SORTED=sorted_path, BLOCK_T=block_t, BLOCK_O=block_o, R_PAD=max(16, next_pow2(r)), num_warps=4)
    if target is not y:
        y.copy_(target)
    return y

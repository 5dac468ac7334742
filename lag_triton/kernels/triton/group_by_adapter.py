"""Group (token, choice) pairs by adapter on the device: a counting sort in three launches.

    counts[a]  = #pairs whose adapter is a            (bucket N: no adapter, -1 or out of range)
    cursor     = exclusive prefix sum of counts        (torch.cumsum: on the device, no host sync)
    slot[p]    = cursor[adapter[p]]++                  (atomic; order inside a segment is free)

The grouped SpectR rerank (SGMV-style shrink per adapter segment) and the prefill apply (tokens
grouped by their first choice) both need adapter segments, not a comparison sort: this replaces
``torch.sort`` (a multi-pass radix sort over T·k keys) with one read for the histogram and one for
the scatter, O(P + N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv


@triton.jit
def _pairs_and_buckets(cand_ptr, P, N, BLOCK: tl.constexpr):
    """This program's pair ids, their mask, adapters and buckets (bucket N: no adapter)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # P = T * K: may pass 2**31
    mask = offs < P
    ad = tl.load(cand_ptr + offs, mask=mask, other=-1)
    return offs, mask, ad, tl.where((ad >= 0) & (ad < N), ad, N)


@triton.jit
def _count_pairs_kernel(
    cand_ptr,  # candidates [P] int32 (the [T, K] matrix, flat)
    count_ptr,  # in/out: pairs per adapter [N + 1] (SLOTS), zeroed; bucket N = no adapter (-1 or out of range)
    P,
    N,
    BLOCK: tl.constexpr,
):
    offs, mask, ad, bucket = _pairs_and_buckets(cand_ptr, P, N, BLOCK)
    tl.atomic_add(count_ptr + bucket, 1, mask=mask, sem="relaxed")


@triton.jit
def _scatter_pairs_kernel(
    cand_ptr,  # candidates [P] int32
    cursor_ptr,  # in/out: next free slot of each adapter's segment [N + 1] (SLOTS; exclusive scan of counts)
    grouped_ad_ptr,  # out: adapter of each grouped slot [P] int32 (-1 for no adapter, last)
    grouped_pair_ptr,  # out: pair id t*K + c of each grouped slot [P] int64
    P,
    N,
    BLOCK: tl.constexpr,
):
    offs, mask, ad, bucket = _pairs_and_buckets(cand_ptr, P, N, BLOCK)
    slot = tl.atomic_add(cursor_ptr + bucket, 1, mask=mask, sem="relaxed")
    tl.store(grouped_ad_ptr + slot, tl.where(bucket < N, ad, -1), mask=mask)
    tl.store(grouped_pair_ptr + slot, offs.to(tl.int64), mask=mask)


GROUP_BLOCK = 1024  # pairs per program of the counting sort
#: SLOTS, the counters' dtype: int32, or int64 from this many pairs on (T * K past int32; P is then i64 too)
WIDE_SLOTS_FROM = 2**31


def group_pairs_by_adapter(candidates: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of the (token, candidate) pairs of ``candidates`` [T, K] by adapter.

    Returns (adapter [P] int32, pair id [P] int64) with every adapter's pairs contiguous, adapters
    ascending, pairs without an adapter (-1) last. The order inside a segment follows the atomics
    and may differ between runs; nothing downstream depends on it (each pair's z is computed from
    its own row and written to its own slot).
    """
    # the kernels read pair p at flat offset p: a strided view (a column of sel) must be copied, as
    # reshape would keep its stride
    flat = candidates.reshape(-1).contiguous()
    p = flat.numel()
    slots = torch.int32 if p < WIDE_SLOTS_FROM else torch.int64
    counts = torch.zeros(n + 1, dtype=slots, device=flat.device)
    grid = (cdiv(p, GROUP_BLOCK),)
    _count_pairs_kernel[grid](flat, counts, p, n, BLOCK=GROUP_BLOCK)
    cursor = torch.cumsum(counts, 0, dtype=slots).sub_(counts)
    grouped_ad = torch.empty(p, dtype=torch.int32, device=flat.device)
    grouped_pair = torch.empty(p, dtype=torch.int64, device=flat.device)
    _scatter_pairs_kernel[grid](flat, cursor, grouped_ad, grouped_pair, p, n, BLOCK=GROUP_BLOCK)
    return grouped_ad, grouped_pair

"""Shared pieces of the Triton backend: launch configuration helpers, the packed sort keys, the
running top-k lists built on them (merge, store, the filtered buffer of ``offer_block``), split
folding (a split reduction finished by the last program to arrive: ``last_to_arrive``) and the
opt-in switches of paths that await a GPU measurement (``OptIn``).

Ranking rule of every op (docs/design.md §1): larger key first, equal keys -> lower adapter index,
NaN ranks like -inf (the reference maps NaN to -inf), so indices always stay in range.

A (fp32 value, adapter index) pair is packed into one int64 whose signed order is that rank:

    high 32 bits: order-preserving int32 image of the value (-0 -> +0, NaN -> image of -inf)
    low 32 bits:  0x7FFFFFFF - index   (lower index -> larger word)

so ``tl.topk``/``tl.sort`` on the int64 words (no payload support needed) sort by value
descending, then index ascending. INT64_MIN is the "empty slot" sentinel: it ranks below every
real word (even NaN) and decodes to an out-of-range index that is never written when k <= N.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# EMPTY_SLOT (INT64_MIN, the empty-slot word) is defined with the interpreter's top-k, which needs it.
from ._interpreter import EMPTY_SLOT, USE_BITONIC, interpreting, topk_by_rank, upcast_dot  # noqa: F401

#: set to 1 to finish split reductions inside the launch that writes their partials (``fold_splits``)
FOLD_ENV = "LAG_TRITON_FOLD_SPLITS"
#: set to 1 to score large libraries with a GEMM that keeps only possible top-k scores (``arrow_filter``)
FILTER_ENV = "LAG_TRITON_FILTER_GEMM"

# Globals read inside @triton.jit code must be tl.constexpr (compiled Triton rejects plain globals).
NO_ADAPTER = tl.constexpr(2147483647)  # int32 max: "no adapter" marker inside tiles


# Host-side launch arithmetic in plain Python: Triton 3.6's triton.cdiv / next_power_of_2 are
# constexpr functions whose every host call unwraps its arguments (~2 us each, ~20 per layer).


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int, minimum: int = 1) -> int:
    """The least power of two >= max(n, 1), and at least ``minimum``."""
    return max(minimum, 1 << (max(1, int(n)) - 1).bit_length())


def prev_pow2(n: int) -> int:
    """The largest power of two <= n; 0 for n < 1 (a tile budget smaller than one row: callers clamp)."""
    return 1 << (int(n).bit_length() - 1) if n >= 1 else 0


def divisible_by_16(*tensors: torch.Tensor, ints: tuple[int, ...] = ()) -> bool:
    """Whether a launch gets Triton's divisibility-16 specialisation on these operands: every data
    pointer 16-byte aligned and every integer (widths, row strides) a multiple of 16. Only then do
    loads along a unit-stride dim vectorise; without it every scalar load holds its own 64-bit
    address, so the launch plans give such operands smaller tiles (``_aot_check --resources``)."""
    bits = 0  # a multiple of 16 exactly when every value is: OR their bits, test the low four once
    for t in tensors:
        bits |= t.data_ptr()
    for i in ints:
        bits |= i
    return bits % 16 == 0


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with unit stride; copy only when it is not (a shape/stride check, no sync)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def other_gpu(t: torch.Tensor) -> int | None:
    """The index of the GPU holding ``t`` when it is not the current device, else None.

    Triton launches a kernel on the *current* device and its current stream, whatever device the
    tensor arguments live on; a layer on cuda:1 of a model split over GPUs (``device_map="auto"``)
    would otherwise be launched on cuda:0 with pointers into cuda:1's memory (an illegal address,
    or with peer access a read across the link, unordered with cuda:1's stream)."""
    if t.is_cuda:
        index = t.get_device()
        if index != torch.cuda.current_device():
            return index
    return None


def on_tensor_device(op):
    """Decorator for a Triton op whose first argument is a tensor: it launches on that tensor's GPU."""

    @functools.wraps(op)
    def run(first: torch.Tensor, *args, **kwargs):
        # not a tensor: the op's own argument check says what is wrong
        index = other_gpu(first) if isinstance(first, torch.Tensor) else None
        if index is None:
            return op(first, *args, **kwargs)
        with torch.cuda.device(index):
            return op(first, *args, **kwargs)

    return run


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a few programs per launch keep CPU runs short


@triton.jit
def order_key(v):
    """fp32 -> int32 whose signed order is the float order; -0 -> +0 and NaN -> the image of -inf."""
    v = tl.where(v == 0.0, 0.0, v)
    v = tl.where(v != v, float("-inf"), v)
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def key_to_float(k):
    """Inverse of order_key (NaN comes back as -inf)."""
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def pack(key, index):
    """(int32 order key, int32 index) -> int64 word; larger word = better (ties -> lower index)."""
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)


@triton.jit
def unpack_index(word):
    return (0x7FFFFFFF - (word & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def unpack_key(word):
    return (word >> 32).to(tl.int32)


@triton.jit
def topk_words(words, K_PAD: tl.constexpr):
    """Top-K_PAD of packed words [ROWS, C] (C >= K_PAD, powers of two), best first."""
    if K_PAD == 1:  # tl.topk(x, 1) fails to compile for [1, C] tiles
        return tl.max(words, axis=1, keep_dims=True)
    elif USE_BITONIC:
        return tl.topk(words, K_PAD)
    else:
        return topk_by_rank(words, K_PAD)


@triton.jit
def merge_topk(best, cand, K_PAD: tl.constexpr):
    """Running top-K_PAD of a [ROWS, K_PAD] best list and a [ROWS, C] candidate block (C >= K_PAD, powers of two)."""
    ROWS: tl.constexpr = best.shape[0]
    C: tl.constexpr = cand.shape[1]
    if C > K_PAD:
        cand = topk_words(cand, K_PAD)
    both = tl.reshape(tl.join(best, cand), [ROWS, 2 * K_PAD])
    return topk_words(both, K_PAD)


@triton.jit
def merge_topk_if_better(best, cand, K_PAD: tl.constexpr):
    """merge_topk(best, cand), skipped when no candidate word beats its row's worst kept word.

    Exact: real words are unique (distinct indices) and best is a top-K_PAD list, so a block whose
    words are all <= min(best) per row cannot change it (EMPTY_SLOT ties change nothing either).
    One scalar branch per block (any row may trigger it) saves the sorting network on the blocks
    that come after the running top-K_PAD has settled.
    """
    worst = tl.min(best, axis=1, keep_dims=True)  # [ROWS, 1]
    improves = tl.max(tl.max((cand > worst).to(tl.int32), axis=1), axis=0)
    if improves > 0:
        best = merge_topk(best, cand, K_PAD)
    return best


@triton.jit
def store_topk(best, rows, row_mask, idx_ptr, score_ptr, stride_o, K, K_PAD: tl.constexpr):
    """Decode packed words [ROWS, K_PAD] and write the first K columns of idx / scores."""
    cols = tl.arange(0, K_PAD)
    empty = best == EMPTY_SLOT  # fewer candidates than K (a scope): idx -1, score NaN
    idx = tl.where(empty, -1, unpack_index(best))
    score = key_to_float(unpack_key(best))
    score = tl.where((score == float("-inf")) | empty, float("nan"), score)  # |p.x| is never -inf: that key was NaN
    offs = rows[:, None] * stride_o + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < K)
    tl.store(idx_ptr + offs, idx, mask=mask)
    tl.store(score_ptr + offs, score, mask=mask)


@triton.jit
def merge_partials(part_ptr, rows, row_mask, SPLITS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """Top-K_PAD of the SPLITS * K_PAD partial words of each row in ``rows``, read in [ROWS, BLOCK_C]
    chunks (through L2: other programs of a folding launch wrote them) and merged into a running list."""
    L: tl.constexpr = SPLITS * K_PAD
    best = tl.full([rows.shape[0], K_PAD], EMPTY_SLOT, tl.int64)
    for c0 in range(0, L, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        words = tl.load(
            part_ptr + rows[:, None] * L + cols[None, :],
            mask=row_mask[:, None] & (cols[None, :] < L),
            other=EMPTY_SLOT,
            cache_modifier=".cg",
        )
        best = merge_topk_if_better(best, words, K_PAD)
    return best


def merge_block_c(rows: int, words: int, k_pad: int) -> int:
    """Chunk width of the merge: ~2K words per [rows, C] tile compiled (16 per thread at 4 warps),
    and a [rows, C, C] rank-count tile <= 2^20 elements under the interpreter."""
    if interpreting():
        cap = max(16, 1 << ((20 - (rows.bit_length() - 1)) // 2))
    else:
        cap = max(16, 2048 // rows)
    return max(k_pad, min(next_pow2(words), cap))


@triton.jit
def dot_scores(
    x_ptr,
    p_ptr,
    rows,
    row_mask,
    cols,
    col_mask,
    d_lo,
    d_hi,
    stride_xt,
    stride_pn,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """x[rows, d_lo:d_hi] . P[cols, d_lo:d_hi] -> [ROWS, COLS] fp32 in tl.dot steps of BLOCK_K (masked
    rows and columns score 0). UPCAST: bf16 tiles to fp32 first (the interpreter's bf16 dot is wrong)."""
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_K):
        offs_d = d0 + tl.arange(0, BLOCK_K)
        d_mask = offs_d < d_hi
        xt = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * stride_xt + offs_d[None, :],
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [ROWS, BLOCK_K]
        pt = tl.load(
            p_ptr + cols[None, :].to(tl.int64) * stride_pn + offs_d[:, None],
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_K, COLS] = a P^T tile
        if UPCAST:
            xt = xt.to(tl.float32)
            pt = pt.to(tl.float32)
        acc = tl.dot(xt, pt, acc, input_precision="ieee")
    return acc


@triton.jit
def scope_allows(allowed_ptr, scope_ptr, rows, row_mask, cols, valid, S, stride_allowed):
    """valid [ROWS, C] & allowed[scope[row], col] (uint8 masks): a scope row out of [0, S) allows nothing.

    Loads through L2 (.cg), as every load that may follow a fold's ticket (``last_to_arrive``)."""
    srow = tl.load(scope_ptr + rows, mask=row_mask, other=-1, cache_modifier=".cg")
    valid &= ((srow >= 0) & (srow < S))[:, None]
    allowed = tl.load(
        allowed_ptr + srow[:, None].to(tl.int64) * stride_allowed + cols[None, :],
        mask=valid,
        other=0,
        cache_modifier=".cg",
    )
    return valid & (allowed != 0)


# ----------------------------------------------------------------------------- filtered running top-k
#
# FAISS GPU's WarpSelect / raft's warp_sort_filtered, on packed words: a running top-K_PAD list, a
# per-program buffer of the values that beat its k-th best, and a merge only when the buffer
# fills. Used by the Arrow select (arrow_topk) and the filtering GEMM's rescoring (arrow_filter).


@triton.jit
def top_of(best, cand, K_PAD: tl.constexpr):
    """Top-K_PAD of the words of best [1, K_PAD] and cand [1, C], best first.

    K_PAD rounds of "take the largest word, blank it": real words are unique (one per index), so
    each round removes exactly one. A loop of reductions rather than a sorting network: it
    compiles in seconds at any C (a tl.topk network over 2K int64 words took minutes), runs as
    is under the interpreter, and a flush needs only the k winners, not a sorted buffer.
    """
    out = tl.full([1, K_PAD], EMPTY_SLOT, tl.int64)
    slot = tl.arange(0, K_PAD)[None, :]
    for i in range(K_PAD):
        top = tl.maximum(tl.max(best, axis=1, keep_dims=True), tl.max(cand, axis=1, keep_dims=True))  # [1, 1]
        out = tl.where(slot == i, top, out)
        best = tl.where(best == top, EMPTY_SLOT, best)
        cand = tl.where(cand == top, EMPTY_SLOT, cand)
    return out


@triton.jit
def flush_buffer(best, buf, count, K_PAD: tl.constexpr, CAP: tl.constexpr):
    """Merge the `count` buffered words at `buf` into best [1, K_PAD]."""
    cols = tl.arange(0, CAP)[None, :]
    tl.debug_barrier()  # the words were stored by other threads of this program
    words = tl.load(buf + cols, mask=cols < count, other=EMPTY_SLOT, cache_modifier=".cg")
    best = top_of(best, words, K_PAD)
    tl.debug_barrier()  # every thread has read the buffer before it is overwritten
    return best


@triton.jit
def beats(keys, offs, kth):
    """word(keys, offs) > kth, without building the int64 words of the values that lose."""
    kth_key = unpack_key(kth)
    return (keys > kth_key) | ((keys == kth_key) & (offs < unpack_index(kth)))


@triton.jit
def offer_block(best, kth, count, keys, offs, mask, buf, K_PAD: tl.constexpr, CAP: tl.constexpr):
    """Offer a block of (key, index) pairs [1, BLOCK] (where ``mask``) to a running top-K_PAD.

    A value that beats the k-th best word ``kth`` is appended to the buffer at ``buf`` (``count``
    words so far; slots from a prefix sum); when the block's survivors would not fit, the buffer is
    merged first and the block filtered again against the tighter k-th. BLOCK <= CAP. Returns
    (best, kth, count).
    """
    survives = mask & beats(keys, offs, kth)
    hits = tl.sum(survives.to(tl.int32))
    if count + hits > CAP:  # no room: merge the buffer, tighten the threshold, filter again
        best = flush_buffer(best, buf, count, K_PAD, CAP)
        kth = tl.min(best, axis=1, keep_dims=True)
        count = count * 0
        survives = mask & beats(keys, offs, kth)
        hits = tl.sum(survives.to(tl.int32))
    if hits > 0:
        slot = count + tl.cumsum(survives.to(tl.int32), axis=1) - 1
        tl.store(buf + slot, pack(keys, offs), mask=survives)
        count += hits
    return best, kth, count


# ----------------------------------------------------------------------------- split folding
#
# A split reduction (the Arrow select's N-splits, the rerank's d-splits) writes per-split partials
# and used to need a second launch to reduce them. Folded, each program counts itself in on a
# per-row ticket after storing its partial; the program that arrives last reduces the row in the
# same launch (CUB's "last block" / threadFenceReduction pattern): at decode that is one launch
# fewer per op, and no launch gap between the two passes.
#
# Memory ordering: every thread's partial stores -> CTA barrier -> one acq_rel atomic at GPU
# scope (release: cumulative over the CTA's stores the barrier ordered before it). The last
# program's atomic acquires every earlier release; a barrier then orders its threads' partial
# loads after it, and those loads bypass L1 (.cg). The last program resets the ticket to 0, so
# the counters stay zeroed between launches and are allocated (zeroed) once.


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class OptIn:
    """A kernel path that stays off until a GPU run has measured it: on with ``<env>=1``, or inside
    ``with switch.forced(True)`` (benchmarks compare both settings in one process)."""

    def __init__(self, env: str) -> None:
        self.env = env
        self._forced: bool | None = None

    def __call__(self) -> bool:
        if self._forced is not None:
            return self._forced
        value = os.environ.get(self.env, "").strip().lower()
        if value in _OFF:
            return False
        if value in _ON:
            return True
        raise ValueError(f"{self.env}={os.environ[self.env]!r}: set it to 1 (on) or 0 (off)")

    @contextlib.contextmanager
    def forced(self, enabled: bool = True) -> Iterator[None]:
        before, self._forced = self._forced, enabled
        try:
            yield
        finally:
            self._forced = before


#: Fold split reductions into one launch (``LAG_TRITON_FOLD_SPLITS=1``). Opt-in until a GPU run has
#: checked the ticket's memory ordering on hardware (the interpreter runs programs one after
#: another, so the CPU tests check the fold's logic, not its ordering): the next GPU run tests and
#: times both settings, then this becomes the default.
fold_splits = OptIn(FOLD_ENV)
folding = fold_splits.forced

#: Score large libraries with the filtering GEMM (``arrow_filter``; ``LAG_TRITON_FILTER_GEMM=1``):
#: opt-in until a GPU run shows its tl.dot GEMM + epilogue beating cuBLAS + the filtered select.
filter_gemm = OptIn(FILTER_ENV)


_ticket_buffers: dict[tuple, torch.Tensor] = {}


def ticket_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 ticket counters for one launch on ``device``'s current stream.

    Kernels leave every counter they use at 0, so a buffer is zeroed once, when created, and
    serves every later eager launch on its stream (launches on one stream run in order). One
    buffer per (device, stream, size class): launches on concurrent streams never share counters.
    While a CUDA graph is being captured each launch gets its own counters, zeroed by the graph on
    every replay: a buffer created during a capture would be zeroed only in that one graph, and
    another graph captured later on the stream could replay it first, from whatever it held.
    """
    size = next_pow2(n, 1024)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream, size)
    buf = _ticket_buffers.get(key)
    if buf is None:
        buf = _ticket_buffers[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return buf


@triton.jit
def last_to_arrive(ticket_ptr, arrivals):
    """Count this program in at ``ticket_ptr`` after its partial stores; True in the program that
    arrives last of ``arrivals``, which then sees every other program's partials and resets the
    ticket to 0 for the next launch."""
    tl.debug_barrier()  # every thread of this program has issued its partial stores
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == arrivals - 1
    tl.store(ticket_ptr, 0, mask=last)  # all others are counted in: nobody adds to it again
    tl.debug_barrier()  # the partial loads of every thread come after the acquire
    return last

"""Everything the kernels do differently under the Triton interpreter (TRITON_INTERPRET=1), in one place.

CI has no GPU: there the Triton kernels run on CPU tensors under the interpreter, against the
PyTorch reference. Where the interpreter cannot run a GPU construct correctly or in reasonable
time, the kernel takes one of the switches below; what covers the GPU construct instead is named
with each. Everything else in the kernels is the GPU code as it runs.

- ``upcast_dot``: the interpreter's ``tl.dot`` gives wrong results on bf16 operands, so tiles
  are upcast to fp32 before the dot there (exact: products of bf16 are exact in fp32). The bf16
  dot itself is compiled for sm_90 by ``_aot_check`` (CI) and run by the GPU tests.
- ``USE_BITONIC`` / ``topk_by_rank``: the interpreter runs ``tl.topk``'s bitonic network one
  scalar compare at a time (minutes per call); there the top-k of a tile is a rank count instead
  (a few whole-tile numpy ops, same result on unique words). ``tl.topk`` is compiled by
  ``_aot_check`` and run by the GPU tests. The Arrow select needs neither (it has no network).
- ``interpreting()`` in the launch configs: smaller tiles under the interpreter, chosen so that
  the CPU tests cross the same tile, split and buffer boundaries at small sizes that real shapes
  cross at large ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import triton_interpreter_enabled

# The empty-slot word of the packed top-k keys (_common): ranks below every real word. A global read by
# @triton.jit code, hence tl.constexpr.
EMPTY_SLOT = tl.constexpr(-9223372036854775808)  # INT64_MIN


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (CPU tensors)."""
    return triton_interpreter_enabled()


def upcast_dot(dtype: torch.dtype) -> bool:
    """Upcast bf16 tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong."""
    return interpreting() and dtype == torch.bfloat16


USE_BITONIC = tl.constexpr(not triton_interpreter_enabled())


@triton.jit
def topk_by_rank(words, K_PAD: tl.constexpr):
    """Interpreter top-k of int64 words [ROWS, C] (real words unique, EMPTY_SLOT may repeat), best first.

    rank_i = #{j: w_j > w_i}; column r of the result is the word of rank r.
    """
    rank = tl.sum((words[:, None, :] > words[:, :, None]).to(tl.int32), axis=2)  # [ROWS, C]
    cols = tl.arange(0, K_PAD)[None, None, :]
    hit = tl.where(rank[:, :, None] == cols, words[:, :, None], EMPTY_SLOT)  # [ROWS, C, K_PAD]
    return tl.max(hit, axis=1)

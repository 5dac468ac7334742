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

And two changes to the interpreter itself: ``patch_language_once`` (speed; changes no result) and
``round_bf16_like_the_gpu`` (its fp32 -> bf16 conversion truncated; now it rounds to nearest even,
as the GPU's ``cvt.rn.bf16.f32`` and torch do, so a bf16 output equals the reference's bit for bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import triton_interpreter_enabled

try:  # the interpreter's internals, for patch_language_once (absent or different: left alone)
    from triton.runtime import interpreter as _triton_interpreter
except ImportError:  # pragma: no cover - every Triton we support has it
    _triton_interpreter = None

# The empty-slot word of the packed top-k keys (_common): ranks below every real word. A global read by
# @triton.jit code, hence tl.constexpr.
EMPTY_SLOT = tl.constexpr(-9223372036854775808)  # INT64_MIN


#: Triton decides between compiling and interpreting a kernel when ``@triton.jit`` defines it, at
#: import: read TRITON_INTERPRET then, not on every launch.
_INTERPRETING = triton_interpreter_enabled()


def interpreting() -> bool:
    """True when the kernels run under TRITON_INTERPRET=1 (CPU tensors)."""
    return _INTERPRETING


def upcast_dot(dtype: torch.dtype) -> bool:
    """Upcast bf16 tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong."""
    return interpreting() and dtype == torch.bfloat16


USE_BITONIC = tl.constexpr(not _INTERPRETING)


@triton.jit
def topk_by_rank(words, K_PAD: tl.constexpr):
    """Interpreter top-k of int64 words [ROWS, C] (real words unique, EMPTY_SLOT may repeat), best first.

    rank_i = #{j: w_j > w_i}; column r of the result is the word of rank r.
    """
    rank = tl.sum((words[:, None, :] > words[:, :, None]).to(tl.int32), axis=2)  # [ROWS, C]
    cols = tl.arange(0, K_PAD)[None, None, :]
    hit = tl.where(rank[:, :, None] == cols, words[:, :, None], EMPTY_SLOT)  # [ROWS, C, K_PAD]
    return tl.max(hit, axis=1)


class _LaunchLanguagePatch:
    """State of ``patch_language_once``: which language modules has the running launch patched?"""

    launches = 0  # GridExecutor calls in progress (kernels do not launch kernels: 0 or 1)
    patched: frozenset = frozenset()  # of triton.language / triton.language.core, during a launch


def patch_language_once() -> bool:
    """Make the interpreter patch triton.language once per launch instead of once per call.

    Triton 3.6's interpreter maps triton.language onto numpy when a launch starts (``_patch_lang``:
    ``inspect.getmembers`` over the language, a new wrapper per builtin) and undoes it when the
    launch ends -- and it repeats the patching, never undone, on every call of a nested
    ``@triton.jit`` function (``top_of``, ``order_key``, ``tl.min``, ...): ~2 ms a call, half of
    CI's interpreter time (a k = 96 select makes ~37,000 such calls). It patches the language
    modules the function's globals name (``triton.language``, or ``.core`` for Triton's own
    library); a nested call whose modules this launch has already patched gets no second,
    equivalent patching: same programs, same results. Idempotent; returns whether the
    interpreter has the expected internals (if not, nothing changes).
    """
    ti = _triton_interpreter
    needed = ("_patch_lang", "_LangPatchScope", "GridExecutor")
    if ti is None or not all(hasattr(ti, name) for name in needed):
        return False
    if getattr(ti._patch_lang, "_lag_once", False):
        return True
    state, original_patch, original_launch = _LaunchLanguagePatch, ti._patch_lang, ti.GridExecutor.__call__

    languages, named = (tl, tl.core), {}  # named: id(module globals) -> the language modules they hold

    def patch_lang(fn):
        key = id(fn.__globals__)
        names = named.get(key)
        if names is None:
            names = named[key] = frozenset(id(m) for m in fn.__globals__.values() if any(m is x for x in languages))
        if state.launches and names and names <= state.patched:  # this launch patched them already
            return ti._LangPatchScope()  # records nothing, restores nothing
        scope = original_patch(fn)
        if state.launches:
            state.patched |= names
        return scope

    def launch(self, *args, **kwargs):
        state.launches += 1
        try:
            return original_launch(self, *args, **kwargs)  # patches (the call above), runs, restores
        finally:
            state.launches -= 1
            state.patched = frozenset()

    patch_lang._lag_once = True
    ti._patch_lang = patch_lang
    ti.GridExecutor.__call__ = launch
    return True


def round_bf16_like_the_gpu() -> bool:
    """Make the interpreter's fp32 <-> bf16 conversions those of the GPU (and of torch).

    Triton 3.6's interpreter converts fp32 to bf16 in numpy bit arithmetic (``_convert_float``)
    that drops the low 16 bits (round toward zero) for a plain ``.to(tl.bfloat16)``, where the
    compiled kernel rounds to nearest even (``cvt.rn.bf16.f32``); its "rtne" adds the cut-off bit
    without ties-to-even, and subnormals come out wrong either way. A bf16 ``y`` written by a kernel
    then differed from the GPU's (and the reference's) by an ulp on about one element in 2^16 or
    (on exact data) on every tie. Here those two conversions go through torch, whose casts are IEEE
    round-to-nearest-even with NaN, inf and subnormals kept; every other conversion (fp16, fp8,
    round-toward-zero requests) is the interpreter's. Idempotent; returns whether the interpreter
    has the expected internals (if not, nothing changes).
    """
    ti = _triton_interpreter
    if ti is None or not hasattr(ti, "_convert_float"):
        return False
    if getattr(ti._convert_float, "_lag_rne", False):
        return True
    original = ti._convert_float
    numpy_of = {tl.float32: ("float32", torch.float32), tl.bfloat16: ("uint16", torch.bfloat16)}

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        rtz = rounding_mode is not None and rounding_mode != ti._ir.ROUNDING_MODE.RTNE
        if rtz or {input_dtype, output_dtype} != {tl.float32, tl.bfloat16}:
            return original(input, input_dtype, output_dtype, rounding_mode)
        np_in, torch_in = numpy_of[input_dtype]
        np_out, torch_out = numpy_of[output_dtype]
        src = torch.from_numpy(input.view(np_in).copy())
        if torch_in == torch.bfloat16:
            src = src.view(torch.bfloat16)
        out = src.to(torch_out)
        return (out.view(torch.uint16) if torch_out == torch.bfloat16 else out).numpy().view(np_out)

    convert_float._lag_rne = True
    ti._convert_float = convert_float
    return True


if _INTERPRETING:
    patch_language_once()
    round_bf16_like_the_gpu()

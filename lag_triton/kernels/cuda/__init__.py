"""CUDA C++ backend (``backend="cuda"``): the three LAG ops from ``csrc/`` (docs/design.md §3.2).

Same signatures and semantics as ``lag_triton.kernels.reference``. The kernels live in
``csrc/*.cu`` (CUDA headers only) behind a small torch binding (``csrc/binding.cpp``). The
extension comes from, in order of preference:

1. a module prebuilt by ``setup.py`` (``lag_triton._lag_cuda``), when importable;
2. a JIT build with ``torch.utils.cpp_extension.load`` (ninja + nvcc) on first use, cached by
   torch in its extensions directory.

``extension_unavailable_reason()`` never compiles anything unless torch is a CUDA build with a
visible device; it returns why the backend cannot run, or None. No op does a host
synchronisation: outputs are allocated with ``torch.empty`` and kernels are launched on the
caller's current stream, so a patched forward stays capturable in a CUDA graph.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import ModuleType

import torch

from .. import reference
from ..common import (
    check_apply_args,
    check_rerank_args,
    check_topk_args,
    empty_rerank_outputs,
    empty_topk_outputs,
    matching_operands,
    prototype_scores,
    score_row_chunks,
)
from .build_info import NVCC_FLAGS, SOURCES, find_nvcc

__all__ = [
    "arrow_topk",
    "spectr_rerank",
    "lora_apply",
    "extension_unavailable_reason",
    "csrc_dir",
    "SOURCES",
    "raise_on_error",
]

#: largest k the arrow select kernel handles; larger k falls back to the reference op
ARROW_MAX_K = 128
PREBUILT_MODULE = "lag_triton._lag_cuda"
JIT_NAME = "lag_triton_cuda_ext"

_lock = threading.Lock()
_ext: ModuleType | None = None
_error: str | None = None


#: the copy of csrc/ that a wheel or a non-editable install carries (setup.py's build_py)
PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"


def csrc_dir() -> Path:
    """The CUDA sources: LAG_TRITON_CSRC if set, else the installed package's copy, else csrc/ next
    to the lag_triton package in the repository (an editable install, a checkout on PYTHONPATH)."""
    override = os.environ.get("LAG_TRITON_CSRC")
    if override:
        return Path(override)
    if PACKAGED_CSRC.is_dir():
        return PACKAGED_CSRC
    return Path(__file__).resolve().parents[3] / "csrc"


def _nvcc_available() -> bool:
    from torch.utils import cpp_extension

    return find_nvcc(cpp_extension.CUDA_HOME) is not None


def _precondition_reason() -> str | None:
    """Why no extension can be used here, checked without compiling anything."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def _load() -> ModuleType:
    """Import the prebuilt extension or JIT-build it; raises RuntimeError with the reason."""
    global _ext, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _error is not None:
            raise RuntimeError(_error)
        reason = _precondition_reason()
        if reason is not None:  # not cached: a device may appear later (e.g. CUDA_VISIBLE_DEVICES)
            raise RuntimeError(reason)
        try:
            import importlib

            _ext = importlib.import_module(PREBUILT_MODULE)
            return _ext
        except ImportError:
            pass
        src = csrc_dir()
        missing = [name for name in SOURCES if not (src / name).is_file()]
        if missing:
            _error = f"CUDA sources not found in {src} (missing {', '.join(missing)}); set LAG_TRITON_CSRC"
            raise RuntimeError(_error)
        from torch.utils import cpp_extension

        if not _nvcc_available():
            _error = "nvcc not found (install the CUDA toolkit or set CUDA_HOME) and no prebuilt extension"
            raise RuntimeError(_error)
        if not cpp_extension.is_ninja_available():
            _error = "ninja not found (pip install ninja), needed to JIT-build the CUDA extension"
            raise RuntimeError(_error)
        try:
            _ext = cpp_extension.load(
                name=JIT_NAME,
                sources=[str(src / name) for name in SOURCES],
                extra_include_paths=[str(src)],
                extra_cuda_cflags=list(NVCC_FLAGS),
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the build log is the reason we report
            _error = f"building the CUDA extension failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_error) from exc
        return _ext


def extension_unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here (None when it can). May JIT-build on first call."""
    try:
        _load()
    except RuntimeError as exc:
        return str(exc)
    return None


def _ext_for(*tensors: torch.Tensor) -> ModuleType:
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"the cuda backend needs CUDA tensors, got a tensor on {t.device}")
    try:
        return _load()
    except RuntimeError as exc:
        raise RuntimeError(f"lag_triton cuda backend is unavailable: {exc}") from None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def raise_on_error(result: object) -> None:
    """Binding ops return '' on success or the error message (they never throw: csrc/binding.cpp).

    Raises RuntimeError(message) for a non-empty string. None (an older prebuilt module) is success.
    """
    if result:
        raise RuntimeError(str(result))


def arrow_topk(
    x: torch.Tensor,
    prototypes: torch.Tensor,
    k: int,
    allowed: torch.Tensor | None = None,
    scope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow retrieval: idx [T, k] int32 (best first, ties -> lower index) and scores [T, k] fp32.

    The scores are one cuBLAS GEMM with fp32 output (``prototype_scores``, as the Triton backend
    scores) and the filtered select kernel takes each row's top-k (csrc/arrow_topk.cu), at every T.
    """
    check_topk_args(x, prototypes, k, allowed, scope)
    ext = _ext_for(x, prototypes)
    if k > ARROW_MAX_K:  # the select keeps at most 128 candidates per token
        return reference.arrow_topk(x, prototypes, k, allowed, scope)
    x, prototypes = matching_operands(x, prototypes)
    idx, scores = empty_topk_outputs(x, k)
    mask = allowed.contiguous().view(torch.uint8) if allowed is not None else None
    for rows in score_row_chunks(x.shape[0], prototypes.shape[0]):
        raise_on_error(
            ext.arrow_select(
                prototype_scores(x[rows], prototypes),
                k,
                idx[rows],
                scores[rows],
                mask,
                None if scope is None else scope[rows].contiguous(),
                _stream(x.device),
            )
        )
    return idx, scores


def spectr_rerank(
    x: torch.Tensor,
    a_star: torch.Tensor,
    candidates: torch.Tensor,
    top_m: int,
    combine: str = "softmax",
    temperature: float = 1.0,
    candidate_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SpectR rerank: sel [T, m] int32, w [T, m] fp32, z [T, m, r] fp32 (see the reference)."""
    check_rerank_args(x, a_star, candidates, top_m, combine, temperature, candidate_scores)
    ext = _ext_for(x, a_star, candidates)
    x, a_star = matching_operands(x.contiguous(), a_star.contiguous())
    candidates = candidates.contiguous()
    if candidate_scores is not None:
        candidate_scores = candidate_scores.to(device=x.device, dtype=torch.float32).contiguous()
    sel, w, z = empty_rerank_outputs(x, top_m, a_star.shape[1])
    if x.shape[0] == 0:  # no tokens: nothing to rank (the binding refuses an empty library first)
        return sel, w, z
    raise_on_error(
        ext.spectr_rerank(
            x,
            a_star,
            candidates,
            top_m,
            combine == "uniform",
            float(temperature),
            candidate_scores,
            sel,
            w,
            z,
            _stream(x.device),
        )
    )
    return sel, w, z


def lora_apply(
    y: torch.Tensor, b_star: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, z: torch.Tensor
) -> torch.Tensor:
    """y += sum_j w[:, j] * (B*[sel[:, j]] @ z[:, j]) in fp32, written in y's dtype, in place."""
    check_apply_args(y, b_star, sel, w, z)
    ext = _ext_for(y, b_star, sel, w, z)
    if y.shape[0] == 0 or sel.shape[1] == 0:  # nothing to add (the binding refuses an empty library first)
        return y
    b_star = b_star.contiguous()
    sel = sel.contiguous()
    w = w.contiguous()
    z = z.contiguous()
    if y.is_contiguous():
        raise_on_error(ext.lora_apply(y, b_star, sel, w, z, _stream(y.device)))
        return y
    out = y.contiguous()
    raise_on_error(ext.lora_apply(out, b_star, sel, w, z, _stream(y.device)))
    y.copy_(out)
    return y

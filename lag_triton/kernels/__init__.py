"""Kernel backends. Each backend module exposes the same three ops with the same signatures:

    arrow_topk(x, prototypes, k) -> (idx, scores)
    spectr_rerank(x, a_star, candidates, top_m, combine, temperature, candidate_scores) -> (sel, w, z)
    lora_apply(y, b_star, sel, w, z) -> y

``reference`` (backend "torch") is the definition; ``triton`` and ``cuda`` are tested against it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("triton", "cuda", "torch")
_MODULES = {"torch": ".reference", "triton": ".triton", "cuda": ".cuda"}
ENV_OVERRIDE = "LAG_TRITON_BACKEND"


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device`` (None if it can)."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install 'lag_triton[triton]')"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
            return None
        return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got device {device}"
        from .cuda import extension_unavailable_reason

        return extension_unavailable_reason()
    return f"unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn "auto" (or LAG_TRITON_BACKEND) into a concrete backend name for ``device``; raise if unusable."""
    device = torch.device(device)
    if backend == "auto":
        backend = os.environ.get(ENV_OVERRIDE, "auto") or "auto"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in BACKENDS:
            if _unavailable_reason(name, device) is None:
                return name
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"lag_triton backend {backend!r} is unavailable: {reason}")
    return backend


def get_ops(backend: str) -> ModuleType:
    """The module implementing ``backend``'s three ops (imports it on first use)."""
    if backend not in _MODULES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return importlib.import_module(_MODULES[backend], __name__)

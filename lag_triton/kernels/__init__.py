"""Kernel backends: the three LAG ops, one implementation per backend, one contract (``Backend``).

    arrow_topk(x, prototypes, k, allowed=None, scope=None) -> (idx, scores)
    spectr_rerank(x, a_star, candidates, top_m, combine, temperature, candidate_scores) -> (sel, w, z)
    lora_apply(y, b_star, sel, w, z) -> y

``reference`` (backend "torch") is the definition; ``triton`` and ``cuda`` are tested against it.
``get_ops(name)`` returns an :class:`Ops`: plain calls go straight to the backend's functions;
while ``torch.compile`` traces, they go through the ``torch.ops.lag_triton`` custom ops
(``custom_ops``), which the compiler treats as opaque, so a patched model compiles with
``fullgraph=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Protocol

import torch

from .custom_ops import backend_module

BACKENDS = ("triton", "cuda", "torch")
ENV_OVERRIDE = "LAG_TRITON_BACKEND"
#: the oldest Triton the kernels compile with: ``tl.topk`` (the running top-k lists) came in 3.4
#: (torch 2.8's Triton). Checked on CPU by compiling every kernel for sm_90 with each release.
MIN_TRITON = (3, 4)


class Backend(Protocol):
    """What a backend provides: the reference's three functions, same signatures and contracts."""

    def arrow_topk(
        self,
        x: torch.Tensor,
        prototypes: torch.Tensor,
        k: int,
        allowed: torch.Tensor | None = None,
        scope: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def spectr_rerank(
        self,
        x: torch.Tensor,
        a_star: torch.Tensor,
        candidates: torch.Tensor,
        top_m: int,
        combine: str = "softmax",
        temperature: float = 1.0,
        candidate_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def lora_apply(
        self, y: torch.Tensor, b_star: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor: ...

    def prepare_b_star(self, b_star: torch.Tensor) -> torch.Tensor:
        """B* [N, d_out, r] in the memory layout this backend's apply reads fastest (same shape and
        values; ``patch`` stores it so, once). Every backend accepts any layout."""
        ...


@dataclass(frozen=True)
class Ops:
    """Backend ``name``'s ops (a :class:`Backend`). Holds only the name: it pickles and deep-copies."""

    name: str

    @property
    def module(self):
        """The module that implements this backend."""
        return backend_module(self.name)

    @property
    def differentiable(self) -> bool:
        """Whether autograd sees these ops (only the reference's, run eagerly): the kernels and every
        backend's custom ops under torch.compile write their outputs outside autograd."""
        return self.name == "torch" and not torch.compiler.is_compiling()

    def arrow_topk(self, x, prototypes, k, allowed=None, scope=None):
        if torch.compiler.is_compiling():
            return torch.ops.lag_triton.arrow_topk(x, prototypes, k, allowed, scope, self.name)
        return self.module.arrow_topk(x, prototypes, k, allowed, scope)

    def spectr_rerank(self, x, a_star, candidates, top_m, combine="softmax", temperature=1.0, candidate_scores=None):
        if torch.compiler.is_compiling():
            return torch.ops.lag_triton.spectr_rerank(
                x, a_star, candidates, top_m, combine, float(temperature), candidate_scores, self.name
            )
        return self.module.spectr_rerank(x, a_star, candidates, top_m, combine, temperature, candidate_scores)

    def lora_apply(self, y, b_star, sel, w, z):
        if torch.compiler.is_compiling():
            torch.ops.lag_triton.lora_apply(y, b_star, sel, w, z, self.name)
            return y
        return self.module.lora_apply(y, b_star, sel, w, z)

    def prepare_b_star(self, b_star):
        prepare = getattr(self.module, "prepare_b_star", None)
        return b_star if prepare is None else prepare(b_star)


def triton_interpreter_enabled() -> bool:
    """Whether Triton runs its kernels under the interpreter: TRITON_INTERPRET read as Triton reads it
    (1, true, on, yes, y in any case; anything else is off: "false" too)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def use_triton_interpreter_without_gpu() -> None:
    """Without a CUDA device, run the Triton kernels under the Triton interpreter on CPU tensors
    (tests, CPU benchmarks) unless TRITON_INTERPRET says otherwise. Triton chooses the interpreter
    when a kernel is defined: call this before lag_triton.kernels.triton is imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as Triton's ``3.9.0`` or ``3.6.0+git...``."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def triton_too_old_reason(version: str) -> str | None:
    """Why Triton ``version`` cannot compile these kernels (None if it can)."""
    if version_tuple(version) >= MIN_TRITON:
        return None
    floor = ".".join(map(str, MIN_TRITON))
    return (
        f"triton {version} is installed and the Triton kernels need triton >= {floor} (they use tl.topk; "
        "torch >= 2.8 brings it); with this Triton use backend='cuda' or 'torch'"
    )


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on tensors of ``device`` (None if it can)."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton
        except ImportError:
            return "triton is not installed (pip install 'lag_triton[triton]')"
        too_old = triton_too_old_reason(triton.__version__)
        if too_old is not None:
            return too_old
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
    source = ""
    if backend == "auto":
        backend = os.environ.get(ENV_OVERRIDE, "auto") or "auto"
        source = "" if backend == "auto" else f" (from {ENV_OVERRIDE})"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for name in BACKENDS:
            if backend_unavailable_reason(name, device) is None:
                return name
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"lag_triton backend {backend!r}{source} is unavailable: {reason}")
    return backend


def get_ops(backend: str) -> Ops:
    """Backend ``backend``'s three ops (its module is imported on first use)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return Ops(backend)

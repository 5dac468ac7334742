"""Triton backend: the three LAG ops with the reference signatures (see ..reference)."""

import triton as _triton

from .. import triton_too_old_reason as _too_old

if (_refused := _too_old(_triton.__version__)) is not None:  # here, not as an AttributeError at a launch
    raise ImportError(_refused)

from .arrow_topk import arrow_topk
from .lora_apply import lora_apply, prepare_b_star
from .spectr_rerank import spectr_rerank

__all__ = ["arrow_topk", "spectr_rerank", "lora_apply", "prepare_b_star"]

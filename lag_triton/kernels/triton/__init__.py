"""Triton backend: the three LAG ops with the reference signatures (see ..reference)."""

import triton as _triton

from .. import triton_too_old_reason as _too_old

if _too_old(_triton.__version__) is not None:  # refused here, not by an AttributeError at the first launch
    raise ImportError(_too_old(_triton.__version__))

from .arrow_topk import arrow_topk
from .lora_apply import lora_apply, prepare_b_star
from .spectr_rerank import spectr_rerank

__all__ = ["arrow_topk", "spectr_rerank", "lora_apply", "prepare_b_star"]

"""Triton backend: the three LAG ops with the reference signatures (see ..reference)."""

from .arrow_topk import arrow_topk
from .lora_apply import lora_apply, prepare_b_star
from .spectr_rerank import spectr_rerank

__all__ = ["arrow_topk", "spectr_rerank", "lora_apply", "prepare_b_star"]

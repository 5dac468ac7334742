"""Triton backend: the three LAG ops with the reference signatures (see ..reference)."""

from .arrow_topk import arrow_topk

__all__ = ["arrow_topk"]

"""``lag_triton.scope``: per-request adapter sets. Each batch row may only use its own adapters.

In a shared deployment each request may only use its own tenant's (or access level's)
documents. Inside ``with lag_triton.scope(model, allowed):`` every patched layer routes the
tokens of batch row b among the adapters ``allowed`` gives row b, and no others: the scope is
enforced inside Arrow retrieval (a disallowed adapter is never a candidate, for every router and
top_m; the "spectr" router reranks only the allowed ones). A row with fewer than k allowed
adapters gets fewer candidates, and a row with none gets no adapter output at all (the base
model). Traces show it: a pick that found no adapter is -1.

``allowed`` is one entry per batch row, each None (every adapter) or a collection of adapter
names (several libraries: each library uses the names it has) or of integer indices into the
library's ``names`` (one library only); or a bool tensor [B, N] (one library); or a dict
{library index: one of those} (libraries in the order they were attached; a library left out is
unrestricted).

Tokens belong to rows by the layer input's leading dimension: x [B, S, d_in] (what Hugging Face
models feed their linear layers, in prefill and in cached decoding alike) has S tokens per row.

A scope covers every forward of the model while it is open, whichever thread runs it (``generate``
started in a thread beside a streamer included). So one thread at a time may hold scopes on a
model: a scope opened while another thread's is open on any of the same layers raises, before
changing anything, instead of routing one request's tokens by another request's adapter sets.
Concurrent requests share a model by being batched into one scope (a row each).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["scope"]

_OPENING = threading.Lock()  # taken while a scope is installed on, or removed from, a model's layers


class _ScopeMasks:
    """The masks of one scope, per patched route: allowed [B, N_module] bool on the route's device."""

    def __init__(self, rows: int, masks: dict[int, torch.Tensor]) -> None:
        self.owner = threading.get_ident()  # the thread that opened the scope
        self.rows = rows
        self._masks = masks  # id(LibraryRoute) -> mask; routes of unrestricted libraries are absent
        self._token_rows: dict[tuple, torch.Tensor] = {}

    def for_route(self, route: nn.Module, x: torch.Tensor, layer_name: str):
        """(allowed [B, N] bool, scope [T] int32) for the rows of ``x`` [B, ..., d_in], or (None, None)."""
        mask = self._masks.get(id(route))
        if mask is None:
            return None, None
        rows = x.shape[0] if x.dim() >= 2 else 1
        if rows != self.rows:
            repeated = (
                f". generate with num_beams or num_return_sequences = {rows // self.rows} repeats each row: give "
                f"one entry per repeated row ([entry for entry in allowed for _ in range({rows // self.rows})])"
                if rows > self.rows and rows % self.rows == 0
                else ""
            )
            raise ValueError(
                f"lag_triton.scope was given {self.rows} batch rows, but layer {layer_name!r} got "
                f"an input of shape {tuple(x.shape)} ({rows} rows){repeated}"
            )
        per_row = x.numel() // max(1, rows * x.shape[-1])
        key = (rows, per_row, mask.device)
        token_rows = self._token_rows.get(key)
        if token_rows is None:
            token_rows = torch.arange(rows, dtype=torch.int32, device=mask.device).repeat_interleave(per_row)
            self._token_rows[key] = token_rows
        return mask, token_rows


def _row_mask(entry, names: list[str], library: int, several: bool) -> torch.Tensor:
    """One batch row's allowed set in one library -> bool [N_library]."""
    n = len(names)
    if entry is None:
        return torch.ones(n, dtype=torch.bool)
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Iterable):
        raise TypeError(f"a scope row must be None or a collection of adapter names or indices, got {entry!r}")
    mask = torch.zeros(n, dtype=torch.bool)
    where = {name: i for i, name in enumerate(names)}
    for item in entry:
        if isinstance(item, str):
            if item in where:
                mask[where[item]] = True
        elif isinstance(item, int) and not isinstance(item, bool):
            if several:
                raise TypeError(
                    "with several libraries, scope rows name adapters (or pass a dict "
                    "{library index: rows}); an integer index is ambiguous"
                )
            if not 0 <= item < n:
                raise ValueError(f"adapter index {item} is out of range for library {library} ({n} adapters)")
            mask[item] = True
        else:
            raise TypeError(f"a scope row holds adapter names (str) or indices (int), got {item!r}")
    return mask


def _library_masks(spec, names: list[str], library: int, several: bool) -> torch.Tensor:
    """One library's [B, N_library] bool mask from a tensor or a sequence of row entries."""
    if isinstance(spec, torch.Tensor):
        if spec.dtype != torch.bool or spec.dim() != 2 or spec.shape[1] != len(names):
            raise ValueError(
                f"a scope mask for library {library} must be bool [B, N={len(names)}], got "
                f"{spec.dtype} {tuple(spec.shape)}"
            )
        return spec.cpu()
    if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Iterable):
        raise TypeError(
            "scope() takes one entry per batch row (a list), a bool tensor [B, N], or a dict "
            f"{{library index: rows}}; got {type(spec).__name__}"
        )
    rows = list(spec)
    if not rows:
        raise ValueError("scope() needs at least one batch row")
    return torch.stack([_row_mask(entry, names, library, several) for entry in rows])


def _resolve(allowed, library_names: dict[int, list[str]]) -> dict[int, torch.Tensor]:
    """library index -> [B, N_library] bool (CPU), checking every name exists somewhere."""
    several = len(library_names) > 1
    if isinstance(allowed, Mapping):
        unknown = set(allowed) - set(library_names)
        if unknown:
            raise ValueError(f"scope() got libraries {sorted(unknown)}; the model has {sorted(library_names)}")
        masks = {lib: _library_masks(spec, library_names[lib], lib, False) for lib, spec in allowed.items()}
    else:
        masks = {lib: _library_masks(allowed, names, lib, several) for lib, names in library_names.items()}
        if not isinstance(allowed, torch.Tensor):
            known = set().union(*library_names.values())
            missing = sorted(
                {
                    item
                    for row in allowed
                    if row is not None
                    for item in row
                    if isinstance(item, str) and item not in known
                }
            )
            if missing:
                raise ValueError(f"scope() names adapters that no attached library has: {missing[:10]}")
    rows = {m.shape[0] for m in masks.values()}
    if len(rows) > 1:
        raise ValueError(f"scope() got different batch sizes per library: {sorted(rows)}")
    return masks


@contextlib.contextmanager
def scope(model: nn.Module, allowed) -> Iterator[None]:
    """Restrict, per batch row, the adapters each token may be routed to (see the module docstring).

    Scopes nest: an inner block replaces the outer one for its duration. The model is the one
    ``patch`` was called on; calls inside the block must have as many batch rows as ``allowed``.
    """
    from .patching import LagLinear

    if not isinstance(model, nn.Module):
        raise TypeError(f"scope() needs a torch.nn.Module, got {type(model).__name__}")
    library_names = getattr(model, "_lag_library_names", None)
    layers = [m for m in model.modules() if isinstance(m, LagLinear)]
    if not layers or not library_names:
        raise ValueError(f"{type(model).__name__} has no LAG-patched modules; call lag_triton.patch first")
    masks = _resolve(allowed, library_names)
    rows = next(iter(masks.values())).shape[0]
    per_route = {}
    for layer in layers:
        for route in layer.routes:
            mask = masks.get(route.library_index)
            if mask is not None:
                ids = route.adapter_ids.long().cpu()
                per_route[id(route)] = mask[:, ids].to(route.a_star.device)
    state = _ScopeMasks(rows, per_route)
    with _OPENING:  # check and set at once: two threads opening scopes together cannot both pass
        held = {layer._scope.owner for layer in layers if layer._scope is not None} - {state.owner}
        if held:
            raise RuntimeError(
                f"another thread holds a lag_triton.scope on this {type(model).__name__}: a scope covers "
                "every forward of the model, whichever thread runs it, so two threads cannot scope it "
                "at once (each request's tokens would be routed by the other's adapter sets). Batch "
                "concurrent requests into one scope (a row each), or give each thread its own model"
            )
        previous = [layer._scope for layer in layers]
        for layer in layers:
            layer._scope = state
    try:
        yield
    finally:
        with _OPENING:
            for layer, prev in zip(layers, previous):
                layer._scope = prev

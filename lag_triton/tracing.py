"""``lag_triton.trace``: which adapters each token used, per patched module.

A trace covers the patched layers of one model and collects what those layers select during
its ``with`` block, in the thread that opened it. Traces nest and several threads can each
have their own: every active trace gets every record of its own block. While no trace covers a
layer, the layer pays one integer test per forward (``LagLinear._trace_count``), which keeps
an untraced forward free of Python-level lookups (and of graph breaks under torch.compile).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

_local = threading.local()  # .active: the traces open in this thread, outermost first
_count_lock = threading.Lock()  # layers' _trace_count is shared by every thread


class Trace:
    """Which adapters each token used: filled by ``with lag_triton.trace(model) as tr``.

    ``selections[module]`` is a LongTensor [tokens, top_m] of indices into the library's
    ``names``, concatenated over every forward call in order. When several libraries route the
    same module, that module is in ``library_selections[i]`` (i = order of attachment) only.
    """

    def __init__(self, layers=()) -> None:
        self._layer_ids = frozenset(id(m) for m in layers)
        self._records: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.library_selections: dict[int, dict[str, torch.Tensor]] = {}
        self.selections: dict[str, torch.Tensor] = {}

    def covers(self, layer: nn.Module) -> bool:
        return id(layer) in self._layer_ids

    def record(self, module: str, library_index: int, selection: torch.Tensor) -> None:
        # Kept on the device: copying to the host here would synchronise every layer. No
        # dict.setdefault: torch < 2.5 cannot compile it into a patched forward's graph.
        chunks = self._records.get((module, library_index))
        if chunks is None:
            self._records[(module, library_index)] = [selection]
        else:
            chunks.append(selection)

    def _finish(self) -> None:
        libraries_per_module: dict[str, int] = {}
        for (module, lib), chunks in self._records.items():
            sel = torch.cat(chunks).cpu()
            self.library_selections.setdefault(lib, {})[module] = sel
            libraries_per_module[module] = libraries_per_module.get(module, 0) + 1
        for lib_sel in self.library_selections.values():
            for module, sel in lib_sel.items():
                if libraries_per_module[module] == 1:
                    self.selections[module] = sel
        self._records.clear()


def active_traces(layer: nn.Module) -> list[Trace]:
    """The traces open in the calling thread that cover ``layer``."""
    return [t for t in getattr(_local, "active", ()) if t.covers(layer)]


@contextlib.contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """Record the adapters selected by every patched module of ``model`` inside the block.

    Only forwards run by the thread that opened the block are recorded.
    """
    from .patching import LagLinear, patched_root

    if not isinstance(model, nn.Module):
        raise TypeError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, LagLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LAG-patched modules; call lag_triton.patch first")
    patched_root(model, "trace")  # records are keyed by (layer name, library index): one root's
    tracer = Trace(layers)
    stack = _local.__dict__.setdefault("active", [])
    with _count_lock:
        for m in layers:
            m._trace_count += 1
    stack.append(tracer)
    try:
        yield tracer
    finally:
        stack.remove(tracer)
        with _count_lock:
            for m in layers:
                m._trace_count -= 1
        tracer._finish()

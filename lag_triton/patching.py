"""Attach LAG libraries to a model in place: ``patch``, ``unpatch`` and ``trace`` (DESIGN §4).

Each targeted nn.Linear (or transformers' Conv1D) is swapped for a :class:`LagLinear` that runs
the original module and then adds, per attached library, the routed adapter output. Patching
validates every module of every library before changing anything, and ``unpatch`` puts the
original module objects back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch import nn

from .kernels import get_ops, resolve_backend
from .library import Library
from .routing import RoutingConfig, route_and_apply

LibraryLike = Union[Library, str, Path]

try:  # GPT-2 style layers keep weight as [d_in, d_out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep patching usable without it
    Conv1D = ()


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a module LAG can wrap, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


class LibraryRoute(nn.Module):
    """One library's factors for one module, on the module's device and dtype, plus how to route them."""

    def __init__(self, library_index: int, weights, config: RoutingConfig, backend: str):
        super().__init__()
        self.library_index = library_index
        self.config = config
        self.backend = backend
        self.ops = get_ops(backend)
        # Buffers (not parameters, not in state_dict) so that model.to(...) carries them along.
        self.register_buffer("a_star", weights.a_star, persistent=False)
        self.register_buffer("b_star", weights.b_star, persistent=False)
        self.register_buffer("prototypes", weights.prototypes, persistent=False)
        self.register_buffer("adapter_ids", weights.adapter_ids, persistent=False)

    def extra_repr(self) -> str:
        n, r, d_in = self.a_star.shape
        return f"library={self.library_index}, adapters={n}, r={r}, backend={self.backend}, {self.config}"


class LagLinear(nn.Module):
    """A linear layer plus the routed LoRA output of every attached library."""

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.in_features, self.out_features = _linear_shape(base_layer)
        self.routes = nn.ModuleList()
        self.tracer: Trace | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        x2 = x.reshape(-1, self.in_features)
        y2 = y.reshape(-1, self.out_features)
        for route in self.routes:
            xr = x2 if x2.dtype == route.a_star.dtype else x2.to(route.a_star.dtype)
            sel = route_and_apply(xr, y2, route.a_star, route.b_star, route.prototypes, route.config, route.ops)
            if self.tracer is not None:
                self.tracer.record(self.module_name, route.library_index, route.adapter_ids[sel.long()])
        return y2.view(y.shape)


def _as_libraries(libraries: LibraryLike | Sequence[LibraryLike]) -> list[Library]:
    if isinstance(libraries, (Library, str, Path)):
        libraries = [libraries]
    out = []
    for lib in libraries:
        if isinstance(lib, (str, Path)):
            lib = Library.load(lib)
        if not isinstance(lib, Library):
            raise TypeError(f"expected a lag_triton.Library or a path to one, got {type(lib).__name__}")
        out.append(lib)
    if not out:
        raise ValueError("patch() needs at least one library")
    return out


def patch(model: nn.Module, libraries: LibraryLike | Sequence[LibraryLike], *, k: int = 20, top_m: int = 1,
          router: str = "lag", temperature: float = 1.0, combine: str = "softmax",
          backend: str = "auto") -> nn.Module:
    """Route ``libraries`` (a Library, a saved library path, or a list of them) through ``model`` in place.

    Every module a library targets gets LAG routing with the given settings; several libraries
    add their contributions. Library tensors are moved to each module's device and dtype here,
    once. All checks run before the model is touched: on any error the model is unchanged.
    Calling ``patch`` again attaches more libraries. Returns ``model``.
    """
    config = RoutingConfig(k=k, top_m=top_m, router=router, temperature=temperature, combine=combine)
    libs = _as_libraries(libraries)
    already = getattr(model, "_lag_num_libraries", 0)
    modules = dict(model.named_modules())
    plan = []  # (module name, library index, weights on target device/dtype, backend)
    for offset, lib in enumerate(libs):
        for name, weights in lib.modules.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(f"library {lib.label} targets module {name!r}, which {type(model).__name__} "
                                 "does not have (was it built for another base model?)")
            base = module.base_layer if isinstance(module, LagLinear) else module
            shape = _linear_shape(base)
            if shape is None:
                raise TypeError(f"library {lib.label} targets module {name!r} of type {type(base).__name__}; "
                                "LAG wraps nn.Linear and transformers' Conv1D only")
            if shape != (weights.d_in, weights.d_out):
                raise ValueError(f"library {lib.label}, module {name!r}: adapters are {weights.d_in} -> "
                                 f"{weights.d_out} but the model's layer is {shape[0]} -> {shape[1]}")
            weight = base.weight
            if not weight.is_floating_point():
                raise TypeError(f"module {name!r} has a {weight.dtype} weight (quantized?); LAG needs a float layer")
            plan.append((name, already + offset, weights, resolve_backend(backend, weight.device), weight))
    # Move everything first (this is where memory can run out), then swap modules: all-or-nothing.
    moved = [(name, idx, w.to(weight.device, weight.dtype), be) for name, idx, w, be, weight in plan]
    for name, idx, weights, be in moved:
        module = model.get_submodule(name)
        if not isinstance(module, LagLinear):
            module = LagLinear(module, name)
            _set_submodule(model, name, module)
        module.routes.append(LibraryRoute(idx, weights, config, be))
    model._lag_num_libraries = already + len(libs)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every LAG library: the original module objects go back where they were."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LagLinear):
            _set_submodule(model, name, module.base_layer)
    if hasattr(model, "_lag_num_libraries"):
        del model._lag_num_libraries
    return model


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class Trace:
    """Which adapters each token used: filled by ``with lag_triton.trace(model) as tr``.

    ``selections[module]`` is a LongTensor [tokens, top_m] of indices into the library's
    ``names``, concatenated over every forward call in order. When several libraries route the
    same module, that module is in ``library_selections[i]`` (i = order of attachment) only.
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.library_selections: dict[int, dict[str, torch.Tensor]] = {}
        self.selections: dict[str, torch.Tensor] = {}

    def record(self, module: str, library_index: int, selection: torch.Tensor) -> None:
        # Kept on the device: copying to the host here would synchronise every layer.
        self._records.setdefault((module, library_index), []).append(selection)

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


@contextlib.contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """Record the adapters selected by every patched module of ``model`` inside the block."""
    tracer = Trace()
    layers = [m for m in model.modules() if isinstance(m, LagLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LAG-patched modules; call lag_triton.patch first")
    for m in layers:
        m.tracer = tracer
    try:
        yield tracer
    finally:
        for m in layers:
            m.tracer = None
        tracer._finish()

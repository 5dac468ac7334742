"""Attach LAG libraries to a model in place: ``patch`` and ``unpatch`` (docs/design.md §4).

Each targeted linear-like layer (nn.Linear, transformers' Conv1D, or a quantised layer such as
bitsandbytes' Linear4bit or a GPTQ QuantLinear: see :mod:`.layers`) is swapped for a
:class:`LagLinear` that runs the original module and then adds, per attached library, the routed
adapter output.

What a patched model promises:
- ``patch`` checks every module of every library, and copies the library tensors it keeps,
  before changing anything: on any error the model is untouched, and afterwards it never reads
  the library file again.
- Its ``state_dict()`` (so ``save_pretrained``) holds the base model's own keys and values and
  loads into the unpatched class; a base checkpoint loads into it. The library is not model
  state: save it with ``Library.save`` and patch again after loading.
- It deep-copies, pickles and ``torch.save``s; it runs under ``torch.autocast`` and after
  ``model.double()``/``.half()``/``.to(device)``.
- A backward pass differentiates the routed term with the routing held fixed, on every backend
  (the kernels' term through ``routing.routed_term_vjp``); sharded routing refuses one.
- ``unpatch`` puts the original module objects back.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .kernels import resolve_backend
from .layers import Conv1D, LayerInfo, activation_dtype, describe_layer
from .layers import route_dtype as _route_dtype
from .library import Library
from .moe import LagExperts, RouterView, check_router, expert_parent, is_router, unfold
from .routed_layers import LagLinear, LagRouter, LibraryRoute, _wrap, in_training_mode_of
from .routing import RoutingConfig
from .tracing import Trace, trace

__all__ = ["LagLinear", "LagRouter", "LibraryRoute", "LibraryNotSavedWarning", "patch", "unpatch", "trace", "Trace"]

LibraryLike = Library | str | os.PathLike


class LibraryNotSavedWarning(UserWarning):
    """A patched model's state_dict (and save_pretrained) holds the base model only, not the library."""


def _warn_library_not_saved(module, prefix, keep_vars) -> None:
    warnings.warn(
        "state_dict()/save_pretrained() of a LAG-patched model holds the base model's weights only: "
        "the LAG library is not model state. Save it with Library.save and call lag_triton.patch "
        "again after loading the model.",
        LibraryNotSavedWarning,
        stacklevel=3,
    )


# -- argument checks -------------------------------------------------------------------------------
def _as_libraries(libraries) -> list[Library]:
    if isinstance(libraries, (Library, str, os.PathLike)):
        libraries = [libraries]
    elif isinstance(libraries, (dict, bytes)) or not isinstance(libraries, (list, tuple)):
        raise TypeError(
            "patch() takes a lag_triton.Library, a path to a saved library, or a list or tuple of "
            f"them; got {type(libraries).__name__}"
        )
    out = []
    for lib in libraries:
        if isinstance(lib, (str, os.PathLike)):
            lib = Library.load(lib, check_values=False)  # patch checks the copies it keeps
        if not isinstance(lib, Library):
            raise TypeError(f"expected a lag_triton.Library or a path to one, got {type(lib).__name__}")
        out.append(lib)
    if not out:
        raise ValueError("patch() needs at least one library")
    return out


def _name_hint(name: str, model: nn.Module) -> str:
    """Why a library's module name is missing from ``model``: the same layer under another prefix
    (adapters trained on ``LlamaForCausalLM`` patched into its inner ``LlamaModel``, or a text
    model's adapters into a multimodal model), else another base model."""
    parts = name.split(".")

    def shared_tail(other: str) -> int:
        n = 0
        for a, b in zip(reversed(parts), reversed(other.split("."))):
            if a != b:
                break
            n += 1
        return n

    best = max((m for m, _ in model.named_modules() if m), key=shared_tail, default="")
    tail = shared_tail(best) if best else 0
    if not any(part.isdigit() for part in parts[len(parts) - tail :]):
        # no layer index in common: a layer this model lacks (fewer layers, other names)
        return " (was it built for another base model?)"
    ours = "".join(part + "." for part in parts[: len(parts) - tail])
    theirs = best[: len(best) - len(name) + len(ours)]
    if not theirs:
        rename = f"name.removeprefix({ours!r})"
    elif not ours:
        rename = f"{theirs!r} + name"
    else:
        rename = f"name.replace({ours!r}, {theirs!r}, 1)"
    return (
        f"; it has {best!r}, the same layer under another prefix. Patch the model the adapters were "
        "trained on, or rename the library's modules to this model's names: "
        f"Library(library.names, {{{rename}: w for name, w in library.modules.items()}})"
    )


def _check_layer(
    lib: Library, name: str, module: nn.Module | None, weights, model: nn.Module, router: bool = False
) -> LayerInfo:
    """The base layer's sizes, device and compute dtype (``.device``, ``.dtype``), after checking
    that ``weights`` can route this layer. Which layers qualify and which dtype: :mod:`.layers`."""
    if name == "":
        raise ValueError(
            f"library {lib.label} targets module '' (the model itself, a {type(model).__name__}): patch swaps "
            "a model's layers for wrapped ones, so it cannot wrap the module it is given. Patch a module that "
            "holds this layer (e.g. nn.Sequential(layer)) with the library's module renamed to its name there"
        )
    if module is None:
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            raise ValueError(
                f"library {lib.label} targets module {name!r}, and {type(model).__name__} is a PEFT model (its "
                "layers are PEFT's adapter wrappers, named under base_model.model.): LAG patches the base model "
                "itself. Take it out first: model = peft_model.unload() (or merge_and_unload() to keep the "
                "active adapter merged in), then patch that"
            )
        raise ValueError(
            f"library {lib.label} targets module {name!r}, which {type(model).__name__} "
            f"does not have{_name_hint(name, model)}"
        )
    base = module.base_layer if isinstance(module, LagLinear) else module
    if router:  # an MoE router (:func:`_targets` tells)
        try:
            base = RouterView(base, check_router(name, base))
        except ValueError as e:
            raise ValueError(f"library {lib.label}: {e}") from None
    try:
        layer = describe_layer(name, base, lambda: activation_dtype(model))
    except (TypeError, ValueError) as e:
        raise type(e)(f"library {lib.label}: {e}") from None  # e names the module
    if (layer.d_in, layer.d_out) != (weights.d_in, weights.d_out):
        raise ValueError(
            f"library {lib.label}, module {name!r}: adapters are {weights.d_in} -> "
            f"{weights.d_out} but the model's layer is {layer.d_in} -> {layer.d_out}"
        )
    if weights.device.type == "meta":
        raise ValueError(f"library {lib.label}, module {name!r}: the library tensors are on the meta device")
    return layer


# -- patch / unpatch -------------------------------------------------------------------------------
def patch(
    model: nn.Module,
    libraries: LibraryLike | Sequence[LibraryLike],
    *,
    k: int = 20,
    top_m: int = 1,
    router: str = "lag",
    temperature: float = 1.0,
    combine: str = "softmax",
    backend: str = "auto",
    process_group=None,
) -> nn.Module:
    """Route ``libraries`` (a Library, a saved library path, or a list of them) through ``model`` in place.

    Every module a library targets gets LAG routing with the given settings; several libraries
    add their contributions. The library tensors are copied once, to each module's device and
    dtype (fp32 for an fp64 layer). Everything is checked before the model is touched, values
    included (ids in range, finite factors): on any error the model is unchanged. Calling
    ``patch`` again attaches more libraries. Returns ``model``.

    With ``process_group`` (a ``torch.distributed`` group; every rank calls ``patch`` alike), each
    rank keeps ~1/P of every module's adapters and the ranks route together (:mod:`.sharding`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() needs a torch.nn.Module, got {type(model).__name__}")
    given, model = model, _uncompiled(model)

    def routing_config() -> RoutingConfig:
        return RoutingConfig(k=k, top_m=top_m, router=router, temperature=temperature, combine=combine)

    if process_group is not None:  # sharded over ranks: lag_triton.sharding owns that path (loading and
        from .sharding import patch_sharded  # the settings too: what one rank refuses must fail every rank)

        patch_sharded(model, libraries, routing_config, backend, process_group)
        return given
    config = routing_config()
    check_patched_root(model, "patch")
    libs = _as_libraries(libraries)
    already = getattr(model, "_lag_num_libraries", 0)
    targets = _targets(model, libs)
    plan = []  # (module name, library index, weights, backend, LayerInfo: .device, compute .dtype)
    for offset, lib in enumerate(libs):
        for name, weights in lib.modules.items():
            layer = _check_layer(lib, name, targets.modules.get(name), weights, model, name in targets.routers)
            plan.append((name, already + offset, weights, resolve_backend(backend, layer.device), layer))

    # Build every route first -- the library copies, checked on the copies the model will keep, in
    # the layout each backend reads: every allocation, so where memory can run out -- then swap
    # modules, which allocates nothing: all-or-nothing.
    def build(name, idx, weights, be, layer):
        lib = libs[idx - already]
        copy = weights.to(layer.device, _route_dtype(layer.dtype), copy=True)
        try:
            copy.check_values(len(lib.names))
        except ValueError as e:
            raise ValueError(f"library {lib.label}, module {name!r}: {e}") from None
        # a router whose forward casts its weight (to fp32) computes in that dtype whatever the model is cast to
        fixed = layer.dtype if name in targets.routers and layer.dtype_from == "compute_dtype" else None
        return LibraryRoute(idx, copy, config, be, requested=backend, fixed_dtype=fixed)

    def held_bytes(weights, layer):
        return weights.nbytes(_route_dtype(layer.dtype))

    _attach(model, _build_routes(plan, libs, already, build, held_bytes), libs, already, targets)
    return given


class _Targets(NamedTuple):
    """Where each library module of a patch lives in the model."""

    modules: dict[str, nn.Module]  # library module name -> the module it routes (or None: not found)
    paths: dict[str, str]  # library module name -> that module's path, where the two differ
    unfolded: dict[str, LagExperts]  # expert modules to swap in first, by path (:mod:`.moe`)
    routers: set[str]  # library module names whose module is an MoE router (:func:`.moe.is_router`)


def _targets(model: nn.Module, libs: list[Library]) -> _Targets:
    """The modules the libraries' module names refer to: a module's path; ``<experts>.<parameter>.<e>``,
    an expert of a transformers expert module (unfolded here, swapped in by ``_attach``); or
    ``<module>.weight``, a layer or router whose weight PEFT adapted (``target_parameters``). Raises
    ValueError naming the library and module for those it cannot route."""
    # every path to every module: one shared under two names (encoder and decoder, say) is at both
    modules = dict(model.named_modules(remove_duplicate=False))
    found: dict[str, nn.Module] = {}
    paths: dict[str, str] = {}
    wanted: dict[str, list[str]] = {}
    labels: dict[str, str] = {}  # expert module -> the first library that targets it, for messages
    for lib in libs:
        for name in lib.modules:
            wrapper = _wrapper_holding(name, modules)
            if wrapper is not None:
                raise ValueError(
                    f"library {lib.label} targets module {name!r}, a part of the LAG-patched layer {wrapper!r} (its "
                    f"wrapper's {name[len(wrapper) + 1 :]!r}): a library routes the layer, by its name {wrapper!r}"
                )
            if name in modules:
                found[name] = modules[name]
            elif (path := expert_parent(name, modules)) is not None:
                wanted.setdefault(path, []).append(name)
                labels.setdefault(path, lib.label)
            elif name.endswith(".weight") and name[: -len(".weight")] in modules:
                path = name[: -len(".weight")]
                found[name], paths[name] = _weight_owner(lib, name, modules[path]), path
    by_path: dict[str, str] = {}  # two library modules routed at one layer must have one name (traces, scopes)
    by_object: dict[int, str] = {}  # ... and one layer object one path (its wrapper goes in one place)
    for name, module in found.items():
        path = paths.get(name, name)
        if (first := by_object.setdefault(id(module), path)) != path:
            raise ValueError(
                f"modules {first!r} and {path!r}, both targeted, are one module object (shared under two paths): a "
                "library routes it under one of its names"
            )
        named = module.module_name if isinstance(module, LagLinear) else by_path.setdefault(path, name)
        if named != name:
            raise ValueError(
                f"module {path!r} is targeted both as {named!r} and as {name!r} (a LoRA of the layer and one of its "
                "weight, target_parameters): build one library with one of the two"
            )
    unfolded = {}
    for path, names in wanted.items():
        try:
            unfolded[path] = unfold(path, modules[path], names)
        except ValueError as e:
            raise ValueError(f"library {labels[path]}: {e}") from None
    for wrapper in unfolded.values():
        found.update(wrapper.projections())
    # told once per module: for an nn.Linear subclass with its own forward it takes a dummy forward
    routers = {name for name, module in found.items() if is_router(getattr(module, "base_layer", module))}
    return _Targets(found, paths, unfolded, routers)


def _wrapper_holding(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The path of the LAG wrapper (a patched layer, an unfolded expert module) whose own parts, its
    base layer or routes, ``name`` lies in: a name PEFT's "all-linear" may give a patched model's
    ``...up_proj.base_layer``, which wrapped again would be nested out of unpatch's reach."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] in ("base_layer", "routes") and isinstance(
            modules.get(".".join(parts[:i])), (LagLinear, LagExperts)
        ):
            return ".".join(parts[:i])
    return None


def _weight_owner(lib: Library, name: str, module: nn.Module) -> nn.Module:
    """The layer whose 2-D weight the library module ``name`` (``<module>.weight``) adapts."""
    base = module.base_layer if isinstance(module, LagLinear) else module
    if Conv1D and isinstance(base, Conv1D):
        raise ValueError(
            f"library {lib.label}, module {name!r}: a LoRA of a Conv1D's weight (PEFT target_parameters), which "
            "Conv1D stores [d_in, d_out], so PEFT's update is the transpose of the layer's own LoRA, and its Arrow "
            "prototype another vector: train it with target_modules"
        )
    return module


def _build_routes(plan: list, libs: list[Library], already: int, build, held_bytes) -> list:
    """[(module name, ``build(name, library index, weights, backend, layer)``)] for every plan entry:
    every allocation of a patch (plain or sharded), before the model changes.

    On an allocation failure raises torch.OutOfMemoryError naming the library, module and device
    and what the libraries being attached need there (``held_bytes(weights, layer)`` per entry on
    that device). It is raised outside its handler and the built routes are dropped first, so
    neither they nor the failed allocation's frames outlive the failure; any other error drops them
    too before it propagates.
    """
    routes = []
    try:
        for name, idx, weights, be, layer in plan:
            routes.append((name, build(name, idx, weights, be, layer)))
    except torch.OutOfMemoryError as e:
        routes = []
        need = sum(held_bytes(w, info) for _, _, w, _, info in plan if info.device == layer.device)
        error = torch.OutOfMemoryError(_out_of_memory(libs[idx - already], name, layer.device, need, e))
    except BaseException:
        routes = []  # the traceback keeps this frame alive, not the routes
        raise
    else:
        return routes
    raise error


def _attach(model: nn.Module, routes: list, libs: list[Library], already: int, targets: _Targets) -> nn.Module:
    """Swap the built routes [(module name, route)] into ``model`` (allocates nothing, so it cannot
    fail halfway) and record the ``libs`` attached after the ``already`` attached ones. ``targets``:
    where each module is (:func:`_targets`; unfolded expert modules are swapped in first)."""
    wrappers = {}  # by path, every wrapper made before the first swap: a layer it cannot wrap changes nothing
    for name, _ in routes:
        module, path = targets.modules[name], targets.paths.get(name, name)
        if path not in wrappers:
            wrappers[path] = module if isinstance(module, LagLinear) else _wrap(module, name, name in targets.routers)
    for path, wrapper in targets.unfolded.items():
        _set_submodule(model, path, in_training_mode_of(wrapper, wrapper.base_layer))
    for name, route in routes:
        path = targets.paths.get(name, name)
        if model.get_submodule(path) is not wrappers[path]:
            _set_submodule(model, path, wrappers[path])
        wrappers[path].routes.append(route.train(wrappers[path].training))
    if not already:
        model.register_state_dict_pre_hook(_warn_library_not_saved)
    model._lag_num_libraries = already + len(libs)
    # adapter names per attached library, for lag_triton.scope to resolve
    model._lag_library_names = {
        **getattr(model, "_lag_library_names", {}),
        **{already + i: list(lib.names) for i, lib in enumerate(libs)},
    }
    return model


def _out_of_memory(lib: Library, name: str, device: torch.device, need: int, error: Exception) -> str:
    """The message of an allocation that failed while patch copied ``lib``'s module ``name`` to
    ``device``, where the libraries being attached need ``need`` bytes in all."""
    free = ""
    if device.type == "cuda":
        free_bytes, total = torch.cuda.mem_get_info(device)
        free = f" ({_gib(free_bytes)} of {_gib(total)} free now)"
    return (
        f"lag_triton.patch ran out of memory on {device} copying library {lib.label}, module {name!r}: "
        f"the libraries being attached need {_gib(need)} on {device}{free}, plus one module's B* "
        "again while it is laid out for the kernels. The model is unchanged. Use fewer adapters or "
        "modules, a 16-bit model dtype, or shard the library over GPUs (process_group=). "
        f"torch: {error}"
    )


def _gib(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.2f} KiB"


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module whose layers patch swaps: for ``torch.compile(model)`` the model it wraps (its
    module names are the model's; the compiled wrapper recompiles on its next call)."""
    original = model._modules.get("_orig_mod")  # checked first: no torch._dynamo import for a plain model
    return original if original is not None and isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every LAG library: the original module objects go back where they were. ``model`` is
    the module ``patch`` was called on, or one that contains it."""
    given, model = model, _uncompiled(model)
    roots = [m for m in model.modules() if _is_root(m)]
    if not roots:
        check_patched_root(model, "unpatch")
    for kind in (LagLinear, LagExperts):  # LagLinears inside LagExperts first: those go back whole
        for name, module in list(model.named_modules()):
            if isinstance(module, kind):
                _set_submodule(model, name, module.base_layer)
    for root in roots:
        for attr in (_ROOT_ATTR, "_lag_library_names"):
            delattr(root, attr)
        hooks = getattr(root, "_state_dict_pre_hooks", {})
        for key in [k for k, hook in hooks.items() if hook is _warn_library_not_saved]:
            del hooks[key]
    return given


_ROOT_ATTR = "_lag_num_libraries"  # set on the module patch was called on, with "_lag_library_names"


def _is_root(module: nn.Module) -> bool:
    """Whether ``patch`` was called on ``module`` itself (its own attribute: a torch.compile wrapper
    forwards attribute reads to the model it wraps, which would count it twice)."""
    return _ROOT_ATTR in module.__dict__


def patched_roots(model: nn.Module) -> list[str]:
    """The names, under ``model`` ("" for itself), of the modules ``patch`` attached libraries through."""
    return [name for name, m in model.named_modules() if _is_root(m)]


def patched_root(model: nn.Module, call: str) -> nn.Module | None:
    """The one module under ``model`` (itself included) that ``patch`` attached libraries through, or
    None when they were attached through a module that contains ``model``. Raises ValueError for
    several (models patched apart in one container): each numbers and names its own libraries, so
    ``call``'s library indices and layer names would mix."""
    roots = patched_roots(model)
    if len(roots) > 1:
        raise ValueError(
            f"lag_triton.{call}: {type(model).__name__} holds libraries patched through several of its modules "
            f"({', '.join(map(repr, roots))}), each numbering and naming its own: {call} each of those modules"
        )
    return model.get_submodule(roots[0]) if roots else None


def check_patched_root(model: nn.Module, call: str) -> None:
    """Refuse ``call`` on a module that holds LAG layers attached through another module: library
    indices and names live on the module patch was called on, so two roots would number their
    libraries alike (a scope's mask applied to the other's adapters, traces merged)."""
    if _is_root(model) or not any(isinstance(m, LagLinear) for m in model.modules()):
        return
    roots = patched_roots(model)
    if roots:
        where = f"its submodule{'s' if len(roots) > 1 else ''} {', '.join(map(repr, roots))}"
        hint = f"call {call} on that module" + ("" if call == "unpatch" else ", or unpatch first")
    else:
        where = "a module that contains it"
        hint = (
            f"call {call} on that module (a copy of a part of a patched model has none: copy the module patch "
            "was called on, or the part before patching it)"
        )
    raise ValueError(
        f"lag_triton.{call}: {type(model).__name__} holds LAG-patched layers attached through {where} (where patch "
        f"was called, which numbers and names their libraries): {hint}"
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

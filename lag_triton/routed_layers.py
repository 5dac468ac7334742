"""The modules ``patch`` swaps in (docs/design.md §7): a :class:`LagLinear` runs the layer it
wraps and adds, per attached library, the routed output that its :class:`LibraryRoute` computes
with the backend's ops; a :class:`LagRouter` does so inside an MoE router's forward
(:mod:`.moe`). Which layers qualify and in which dtype they route: :mod:`.layers`.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import backend_unavailable_reason, get_ops, resolve_backend
from .layers import linear_shape as _linear_shape
from .moe import ExpertProjection, LinearRedirect, expert_tokens
from .routing import RoutingConfig, route_and_apply, routed_term_vjp
from .scopes import tag_with_scope
from .tracing import active_traces

__all__ = ["LagLinear", "LagRouter", "LibraryRoute", "in_training_mode_of"]


class LibraryRoute(nn.Module):
    """One library's factors for one module, on the module's device, plus how to route them.

    Holds the backend's name, not its module (modules do not pickle): ``ops`` looks it up. With
    ``requested="auto"`` the backend follows the module across devices: moving the model (``.cuda()``
    after patching on CPU, say) chooses it again for the new device, B* laid out for it. A backend
    named explicitly stays; if it cannot run where the module went, the forward says so.
    """

    def __init__(
        self,
        library_index: int,
        weights,
        config: RoutingConfig,
        backend: str,
        requested: str | None = None,
        fixed_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.library_index = library_index
        self.config = config
        self.backend = backend
        self.requested_backend = requested or backend
        # the dtype the layer computes in whatever the model is cast to (a router whose forward casts
        # its weight to fp32), which the factors keep; None: they follow the model's casts
        self.fixed_dtype = fixed_dtype
        self.unusable: str | None = None  # why ``backend`` cannot run on the factors' device, if it cannot
        self.values_lost = False  # moved off the meta device (to_empty): the factors hold no library
        # Buffers (not parameters, not in state_dict) so that model.to(...) carries them along.
        self.register_buffer("a_star", weights.a_star, persistent=False)
        self.register_buffer("b_star", get_ops(backend).prepare_b_star(weights.b_star), persistent=False)
        self.register_buffer("prototypes", weights.prototypes, persistent=False)
        # int64 whatever the library's ids were: traces give library indices with -1 for no adapter
        self.register_buffer("adapter_ids", weights.adapter_ids.long(), persistent=False)

    @property
    def ops(self):
        return get_ops(self.backend)

    def __setstate__(self, state) -> None:
        state.setdefault("requested_backend", state.get("backend"))  # pickled before routes followed devices
        state.setdefault("values_lost", False)
        state.setdefault("fixed_dtype", None)
        super().__setstate__(state)
        self._follow_device()  # loaded elsewhere (map_location="cpu", another machine's GPUs)

    def _apply(self, fn, recurse=True):
        # model.double() casts every float buffer; the kernels route in fp32 at most, so fp64
        # factors go back to fp32 (exactly: they were fp32 before). A fixed dtype is kept: the factors
        # are taken again from their values before the cast, on the device it moved them to.
        was_meta = self.a_star.is_meta
        factors = ("a_star", "b_star", "prototypes")
        before = {name: getattr(self, name) for name in factors}
        super()._apply(fn, recurse)
        if was_meta and not self.a_star.is_meta:  # model.to("meta") then to_empty(): memory, no values
            self.values_lost = True
        for name in factors:
            t = getattr(self, name)
            if self.fixed_dtype is not None and t.dtype != self.fixed_dtype:
                setattr(self, name, before[name].to(t.device, self.fixed_dtype))
            elif t.dtype == torch.float64:
                setattr(self, name, t.float())
        self._follow_device()
        return self

    def _follow_device(self) -> None:
        """Choose the backend again for the factors' device ("auto"), or note that it cannot run there."""
        device = self.a_star.device
        if self.requested_backend == "auto":
            backend = resolve_backend("auto", device)
            if backend != self.backend:
                self.backend = backend
                self.b_star = get_ops(backend).prepare_b_star(self.b_star)
            self.unusable = None
        else:
            self.unusable = backend_unavailable_reason(self.backend, device)

    def check_usable(self) -> None:
        """Raise unless the factors can be routed: they hold the library, on a device the backend runs on."""
        if self.values_lost:
            raise RuntimeError(
                f"library {self.library_index}'s factors went to the meta device and came back without values "
                "(to_empty()): a base checkpoint does not hold the library (it is not model state). unpatch, "
                "load the model's weights, and patch again"
            )
        if self.unusable is not None:
            raise RuntimeError(
                f"library {self.library_index} was patched with backend={self.backend!r}, which cannot run "
                f"on {self.a_star.device}: {self.unusable}. Move the model back, or patch with "
                "backend='auto' to choose the backend wherever the model goes"
            )

    def add_to(
        self, x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor | None = None, scope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """y [T, d_out] + this library's routed output for x [T, d_in] (in place when y has the
        factors' dtype), each token limited to ``allowed[scope[t]]`` when scoped. Returns (y, sel)."""
        self.check_usable()
        dtype = self.a_star.dtype
        xr = x if x.dtype == dtype else x.to(dtype)
        if y.dtype == dtype:
            sel = route_and_apply(
                xr, y, self.a_star, self.b_star, self.prototypes, self.config, self.ops, allowed, scope
            )
        else:
            # fp64 layers, or autocast's low-precision output of an fp32 layer: the kernels write
            # into a buffer of the factors' dtype, added in y's dtype.
            delta = torch.zeros(y.shape, dtype=dtype, device=y.device)
            sel = route_and_apply(
                xr, delta, self.a_star, self.b_star, self.prototypes, self.config, self.ops, allowed, scope
            )
            y = y + delta.to(y.dtype)
        # torch.export traces once, with inputs that need no gradient: its program may be given some
        if torch.is_grad_enabled() and (xr.requires_grad or _is_exporting()) and not self.ops.differentiable:
            # y's own gradient passes through as is; the routed term's is added in x
            factors = (xr, sel, self.a_star, self.b_star, self.prototypes)
            if torch.compiler.is_compiling():  # torch.compile and torch.export: an op that keeps its backward
                config = self.config
                y = torch.ops.lag_triton.routed_term_gradient(
                    y, *factors, config.router, config.combine, config.temperature
                )
            else:
                y = _RoutedTermGradient.apply(y, *factors, self.config)
        return y, sel

    def extra_repr(self) -> str:
        n, r, d_in = self.a_star.shape
        return f"library={self.library_index}, adapters={n}, r={r}, backend={self.backend}, {self.config}"


class _RoutedTermGradient(torch.autograd.Function):
    """y, into which the kernels have written the routed term outside autograd, passes through;
    the backward adds that term's pullback in x with the forward's picks held fixed
    (``routing.routed_term_vjp``: the gradient the "torch" backend's reference ops give). Eager
    only: traced graphs take :func:`routed_term_gradient`, whose backward torch.export keeps."""

    @staticmethod
    def forward(ctx, y, x, sel, a_star, b_star, prototypes, config: RoutingConfig):
        ctx.save_for_backward(x, sel, a_star, b_star, prototypes)
        ctx.config = config
        # Not a view of y (model code may change the layer's output in place, as may the next
        # library's kernels, and autograd refuses in-place changes of a view made in a Function):
        # y itself, marked modified (the kernels wrote into it).
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, _pullback(ctx.config, grad, *ctx.saved_tensors), None, None, None, None, None


@torch.library.custom_op(
    "lag_triton::routed_term_gradient",
    mutates_args=(),
    schema="(Tensor y, Tensor x, Tensor sel, Tensor a_star, Tensor b_star, Tensor prototypes, str router, "
    "str combine, float temperature) -> Tensor",
)
def routed_term_gradient(y, x, sel, a_star, b_star, prototypes, router, combine, temperature):
    """:class:`_RoutedTermGradient` as an op, for torch.compile and torch.export: a copy of y (an op's
    output may not alias its input) whose backward adds the routed term's pullback in x. An
    autograd.Function's backward is lost from an exported program (its gradient then lacked the
    routed term); an op's registered autograd is kept."""
    return y.clone()


@routed_term_gradient.register_fake
def _(y, x, sel, a_star, b_star, prototypes, router, combine, temperature):
    return torch.empty_like(y)


def _save_factors(ctx, inputs, output):
    y, x, sel, a_star, b_star, prototypes, router, combine, temperature = inputs
    ctx.save_for_backward(x, sel, a_star, b_star, prototypes)
    ctx.config = RoutingConfig(router=router, combine=combine, temperature=temperature)


def _routed_term_gradient_backward(ctx, grad):
    return grad, _pullback(ctx.config, grad, *ctx.saved_tensors), None, None, None, None, None, None, None


routed_term_gradient.register_autograd(_routed_term_gradient_backward, setup_context=_save_factors)


def _pullback(config, grad, x, sel, a_star, b_star, prototypes) -> torch.Tensor:
    """The routed term's gradient in x, in fp32 as the forward routed (the torch backend's too), in x's dtype."""
    with _autocast_off(grad.device.type, always=True):
        return routed_term_vjp(x, sel, a_star, b_star, prototypes, config, grad).to(x.dtype)


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch < 2.5 has none


def _autocast_off(device_type: str, always: bool = False):
    """Routing runs in the factors' dtype: autocast would turn z into bf16 and break the ops. With
    ``always``, off whatever the flag says now (a compiled backward, traced under the caller's
    autocast, reads it as off and still runs under it)."""
    try:
        enabled = always or torch.is_autocast_enabled(device_type)
        return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()
    except TypeError:  # older torch: only the CUDA flag without an argument
        enabled = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
        return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()
    except RuntimeError:  # a device type autocast does not know (meta): it cannot be on there
        return contextlib.nullcontext()


class LagLinear(nn.Module):
    """A linear layer plus the routed LoRA output of every attached library.

    Its state_dict is the base layer's, under this module's own name, so a patched model saves
    and loads exactly like the unpatched one.
    """

    def __init__(self, base_layer: nn.Module, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        # the wrapper's own copy: writing it through to the base (see __setattr__) would fail on a
        # layer whose sizes are read-only properties, halfway through patch's swap
        in_features, out_features = self._base_shape(base_layer)
        nn.Module.__setattr__(self, "in_features", in_features)
        nn.Module.__setattr__(self, "out_features", out_features)
        # The shape the libraries are routed for. Model code may rewrite the public pair
        # (transformers' resize_token_embeddings sets the output layer's out_features).
        self._routed_shape = (self.in_features, self.out_features)
        self.routes = nn.ModuleList()
        self._trace_count = 0  # traces covering this layer, in any thread (see tracing)
        self._scope = None  # the lag_triton.scope in force, if any (see scopes)

    # Model code reads its projections' weights (T5's feed-forward casts to ``wo.weight.dtype``;
    # others tie or inspect them): the base layer's, as PEFT's LoRA layers give. GPTQ-style layers
    # have no ``weight`` but a packed ``qweight``.
    @property
    def weight(self) -> torch.Tensor:
        base = self.base_layer
        if hasattr(base, "weight"):
            return base.weight
        if hasattr(base, "qweight"):
            return base.qweight
        raise AttributeError(f"the base layer of {self.module_name!r} ({type(base).__name__}) has no weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __setattr__(self, name: str, value) -> None:
        # ... and set them: transformers' tie_weights assigns the output layer's weight, and its
        # resize_token_embeddings the out_features that go with it (kept here too; see forward)
        base = self.__dict__.get("_modules", {}).get("base_layer")
        if name in ("weight", "bias") and base is not None:
            setattr(base, name, value)
            return
        if name in ("in_features", "out_features") and base is not None and hasattr(base, name):
            setattr(base, name, value)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d_in, d_out = self._routed_shape
        if x.shape[-1] != d_in:  # what the base layer would refuse, before the flattening below hides it
            raise ValueError(f"{self.module_name}: input has {x.shape[-1]} features, the layer takes {d_in}")
        # The base layer runs on the tokens flattened (as F.linear does inside): viewing its [T, d_out]
        # output back is free of shape guards, so torch.export keeps a dynamic sequence length. Hooks
        # registered on it see the input as its callers give it, as before patch (a steering hook
        # indexes positions, y[:, -1]): with those, its output is flattened instead, and copied first (a
        # full backward hook makes it a view that may not change in place; a forward hook may keep it).
        base = self.base_layer
        x2 = x.reshape(-1, d_in)
        if base._backward_hooks or base._backward_pre_hooks or base._forward_hooks or base._forward_pre_hooks:
            # the routes add in place: not into what a hook kept or gave (an activation patch's tensor)
            y2 = base(x).clone()
        else:
            y2 = base(x2)
        if y2.shape[-1] != d_out:
            raise ValueError(
                f"{self.module_name}: its base layer now gives {y2.shape[-1]} outputs, but it had {d_out} when the "
                "libraries were attached (resized after patch, e.g. by resize_token_embeddings, which re-ties a "
                "routed lm_head): unpatch, resize, and patch with a library built for the new size"
            )
        return self._add_routes(x, x2, y2.reshape(-1, d_out)).view(*x.shape[:-1], d_out)

    @staticmethod
    def _base_shape(base_layer: nn.Module) -> tuple[int, int]:
        return _linear_shape(base_layer)

    def _add_routes(self, x: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """y2 [T, d_out] plus every library's routed output for x2 [T, d_in], the input x [..., d_in]
        flattened (whose shape tells a scope the batch rows)."""
        with _autocast_off(x.device.type):
            for route in self.routes:
                allowed, rows = (None, None) if self._scope is None else self._scope_rows(route, x)
                y2, sel = route.add_to(x2, y2, allowed, rows)
                if self._trace_count:
                    ids = torch.where(sel >= 0, route.adapter_ids[sel.long().clamp(min=0)], -1)  # -1: no adapter
                    for tracer in active_traces(self):
                        tracer.record(self.module_name, route.library_index, ids)
        if self._scope is not None and y2.requires_grad and not torch.compiler.is_compiling():
            y2 = tag_with_scope(y2, self._scope, self.module_name)  # gradient checkpointing's check
        return y2

    def _scope_rows(self, route, x):
        # an MoE expert's projection is fed a gather of the batch's tokens: LagExperts says which
        gathered = expert_tokens(self.module_name) if isinstance(self.base_layer, ExpertProjection) else None
        return self._scope.for_route(route, x, self.module_name, gathered)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._trace_count = 0  # a copy is covered by no open trace
        self._scope = None  # nor by a scope

    # -- state: the base layer's keys, under this module's name -------------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.base_layer.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # The checkpoint has the base layer's keys at this module's name (as the unpatched model
        # saves them): move them under base_layer, where load_state_dict's recursion looks next.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            head = key[len(prefix) :].split(".", 1)[0]
            if head not in self._modules:
                state_dict[prefix + "base_layer." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class LagRouter(LagLinear):
    """An MoE router (a module whose forward computes ``F.linear(x, self.weight[, self.bias])``
    once, then picks experts from it: :mod:`.moe`) plus the routed LoRA output of every attached
    library, added to that product before the router uses it."""

    @staticmethod
    def _base_shape(base_layer: nn.Module) -> tuple[int, int]:
        d_out, d_in = base_layer.weight.shape
        return d_in, d_out

    def forward(self, *args, **kwargs):
        # torch.compile runs it eagerly: dynamo traces the router's F.linear past the mode that
        # redirects it (the routed update was silently missing from a compiled model's router logits)
        return _outside_compile(LagRouter._routed_forward)(self, *args, **kwargs)

    def _routed_forward(self, *args, **kwargs):
        d_in, d_out = self._routed_shape

        def routed_linear(x, weight, bias=None):
            y = F.linear(x, weight, bias)
            return self._add_routes(x, x.reshape(-1, d_in), y.reshape(-1, d_out)).view(y.shape)

        with LinearRedirect(self.base_layer.weight, routed_linear) as mode:
            out = self.base_layer(*args, **kwargs)
        if mode.calls != 1:  # checked at patch on a dummy input; a forward that branches may differ
            raise RuntimeError(
                f"{self.module_name}: the router computed F.linear(x, weight) {mode.calls} times in this forward, "
                "so its libraries were not applied once"
            )
        return out


@functools.cache
def _outside_compile(fn):
    # Decorated on first use, not at import: torch.compiler.disable imports torch._dynamo, and with
    # it Triton, which must not come before the Triton interpreter is chosen (tests/conftest.py).
    return torch.compiler.disable(fn)


def _wrap(module: nn.Module, name: str, router: bool) -> LagLinear:
    return in_training_mode_of(LagRouter(module, name) if router else LagLinear(module, name), module)


def in_training_mode_of(wrapper: nn.Module, base: nn.Module) -> nn.Module:
    """``wrapper`` (and its own modules) in ``base``'s training mode. Not ``wrapper.train(...)``: that
    would recurse into ``base`` and set the flags of its submodules, which may differ on purpose (a
    child dropout kept in eval), and would call an override of ``base.train`` (loralib's merges weights)."""
    wrapper.training = base.training
    for child in wrapper.children():
        if child is not base:
            child.train(base.training)
    return wrapper

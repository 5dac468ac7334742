"""LAG through MoE experts kept as 3-D parameters (transformers' expert modules).

transformers keeps a Mixtral / Qwen3-MoE / gpt-oss layer's experts as one module with 3-D
parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]; transposed, [E, in, out], when
the class says ``is_transposed``), and PEFT adapts them through ``target_parameters``: one LoRA per
expert, which :mod:`.library.peft_reader` reads as modules ``<experts>.<parameter>.<e>``.

To route those, :func:`unfold` wraps the experts module in a :class:`LagExperts` whose children
``<parameter>.<e>`` are :class:`ExpertProjection` s: expert ``e``'s slice of the parameter as a
linear layer, which ``patch`` then wraps like any other (scopes, tracing, every backend). Its
forward runs the experts as transformers' eager loop does, each expert on the tokens the MoE router
sends it, through these projections:

    h = act(x @ W_up[e]ᵀ)  or  gate(x @ W_gate_up[e]ᵀ)      (the class's ``_apply_gate``)
    y += weight · post_norm?(h @ W_down[e]ᵀ)                   (plus biases when ``has_bias``)

so LAG picks an adapter per token per expert among the library's adapters for that expert.

The MoE router (PEFT's ``"all-linear"`` adapts its ``weight`` as ``target_parameters``
``gate.weight``) is a module whose forward computes ``F.linear(x, self.weight[, self.bias])``
once and then picks experts from it: ``patch`` wraps it in a ``LagRouter`` (routed_layers.py) that runs
its forward with that one product redirected through LAG (:class:`LinearRedirect`), so routing
picks experts from W x + the routed update, as PEFT's merged weight does. :func:`check_router`
runs the forward twice on a dummy input at patch time to make sure it computes that product
exactly once each time.

The class flags (``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``) are
those transformers' ``use_experts_implementation`` sets; an expert module without them is
refused, as is expert parallelism. The loop reads which experts are hit on the host (as the eager
loop does), so a patched MoE layer runs eagerly: no CUDA-graph capture or ``fullgraph`` compile.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call runs on
from torch.overrides import TorchFunctionMode

from .layers import linear_shape

__all__ = [
    "ExpertProjection",
    "LagExperts",
    "RouterView",
    "check_router",
    "expert_parent",
    "is_router",
    "LinearRedirect",
    "unfold",
]

_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _projections(experts: nn.Module) -> tuple[str, str]:
    """The names of the first and second projection parameters of a transformers expert module."""
    return ("gate_up_proj" if experts.has_gate else "up_proj", "down_proj")


class ExpertProjection(nn.Module):
    """Expert ``expert``'s slice of the 3-D parameter ``parameter`` of an expert module, as a linear
    layer [..., in_features] -> [..., out_features]. Holds no tensors: it reads the expert module's
    parameter at each call, so moving or loading the model moves and loads what it computes with."""

    def __init__(self, experts: nn.Module, parameter: str, expert: int):
        super().__init__()
        self.__dict__["_experts"] = experts  # not a child: the wrapper owns it once (no second path to its parameters)
        self.parameter, self.expert = parameter, expert
        self.training = experts.training
        shape = getattr(experts, parameter).shape
        self.in_features, self.out_features = (shape[1], shape[2]) if experts.is_transposed else (shape[2], shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The expert's weight as a linear layer's, [out_features, in_features] (a view)."""
        w = getattr(self._experts, self.parameter)[self.expert]
        return w.T if self._experts.is_transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        if not self._experts.has_bias:
            return None
        return getattr(self._experts, f"{self.parameter}_bias")[self.expert]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self._experts, self.parameter)[self.expert]
        # the products transformers' loops take, so an unrouted expert gives their bits
        y = x @ w if self._experts.is_transposed else F.linear(x, w)
        bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"{self.parameter}[{self.expert}], in_features={self.in_features}, out_features={self.out_features}"


class LagExperts(nn.Module):
    """An expert module whose experts' projections are linear layers ``<parameter>.<e>`` (module
    docstring). Its state_dict is the expert module's, under this module's name."""

    def __init__(self, experts: nn.Module, name: str):
        super().__init__()
        self.base_layer = experts
        self.module_name = name
        for parameter in _projections(experts):
            projections = [ExpertProjection(experts, parameter, e) for e in range(experts.num_experts)]
            setattr(self, parameter, nn.ModuleList(projections))
        # This forward runs in place of the expert module's, so it shares that module's hook tables:
        # hooks registered on it (expert-load monitors, say) keep firing while it is wrapped.
        for table in _HOOK_TABLES:
            setattr(self, table, getattr(experts, table))

    def projections(self) -> dict[str, nn.Module]:
        """Every expert projection (or the LagLinear wrapping it) by its name in the model
        (``<experts>.<parameter>.<e>``)."""
        return {
            f"{self.module_name}.{p}.{e}": m
            for p in _projections(self.base_layer)
            for e, m in enumerate(getattr(self, p))
        }

    def forward(self, *args, **kwargs) -> torch.Tensor:
        experts = self.base_layer
        signature = _signature(type(experts))  # the class's own argument names
        bound = signature.bind(experts, *args, **kwargs)
        bound.apply_defaults()
        hidden, index, weights = (bound.arguments[n] for n in list(signature.parameters)[1:4])
        up_proj, down_proj = (getattr(self, p) for p in _projections(experts))
        out = torch.zeros_like(hidden)
        with torch.no_grad():  # the experts some token is sent to (an index >= E is a sentinel: none)
            hit = torch.unique(index[(index >= 0) & (index < experts.num_experts)]).tolist()
        scoped = any(getattr(m, "_scope", None) is not None for m in (*up_proj, *down_proj))
        for e in hit:
            slot, token = torch.where(index.T == e)  # transformers' order: by slot, then token
            with _feeding(scoped, hidden, token):
                h = up_proj[e](hidden[token])
                h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
                y = down_proj[e](h)
            if experts.has_post_expert_norm:
                y = experts.post_expert_norm(y)
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # num_experts, flags, config: as the model code reads them

    # -- state: the expert module's keys, under this module's name ----------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.base_layer.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Every key under this name is the expert module's (the projections hold no state; their
        # names shadow its parameters'): move them under base_layer, where the recursion looks next.
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "base_layer.")]:
            state_dict[prefix + "base_layer." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# (batch tokens, index) while LagExperts runs an expert under a scope: its projections' input is
# batch[index], whose batch rows the scope takes from there (no shape of the gather tells them).
# Per thread and task: a module attribute would let a concurrent forward's gather stand for this one's.
_EXPERT_TOKENS: contextvars.ContextVar = contextvars.ContextVar("lag_triton_expert_tokens", default=None)


@contextlib.contextmanager
def _feeding(scoped: bool, batch: torch.Tensor, index: torch.Tensor):
    if not scoped:  # nothing reads it (and dynamo need not trace a context variable)
        yield
        return
    reset = _EXPERT_TOKENS.set((batch, index))
    try:
        yield
    finally:
        _EXPERT_TOKENS.reset(reset)


def expert_tokens(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch tokens, index) of the expert LagExperts is running, for a scope on its projection ``name``."""
    gathered = _EXPERT_TOKENS.get()
    if gathered is None:
        raise RuntimeError(
            f"{name}: an MoE expert's projection ran under a scope outside its experts module's forward, "
            "so no one told the scope which of the batch's tokens it was given"
        )
    return gathered


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    """The forward signature of an expert class: (self, hidden_states, top_k_index, top_k_weights),
    by whatever names the class gives them (gpt-oss: router_indices, routing_weights)."""
    return inspect.signature(cls.forward)


def expert_parent(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The expert module a library module name ``<experts>.<parameter>.<e>`` refers to, if
    ``modules`` (a model's named modules) has one at ``<experts>`` holding 3-D parameters."""
    head, _, index = name.rpartition(".")
    path, _, parameter = head.rpartition(".")
    module = modules.get(path)
    if not index.isdigit() or module is None or isinstance(module, LagExperts):
        return None
    held = getattr(module, parameter, None)
    return path if isinstance(held, torch.Tensor) and held.dim() == 3 else None


def unfold(path: str, experts: nn.Module, names: list[str]) -> LagExperts:
    """The :class:`LagExperts` for the expert module at ``path`` (not yet in the model), after
    checking that it can route the library modules ``names`` under it; raises ValueError naming
    the module otherwise."""
    missing = [f for f in (*_FLAGS, "num_experts") if not hasattr(experts, f)]
    if missing:
        raise ValueError(
            f"module {path!r} ({type(experts).__name__}) holds experts as 3-D parameters but lacks "
            f"{', '.join(missing)}: LAG routes the expert modules transformers marks with "
            "use_experts_implementation (its flags say how the experts compute)"
        )
    if getattr(experts, "_is_expert_parallel", False):
        raise ValueError(f"module {path!r} is split over ranks (expert parallelism), which LAG does not route")
    wrapper = LagExperts(experts, path)
    for name in names:
        parameter, _, index = name[len(path) + 1 :].rpartition(".")
        if parameter not in _projections(experts) or int(index) >= experts.num_experts:
            raise ValueError(
                f"module {name!r}: {type(experts).__name__} at {path!r} has {experts.num_experts} experts with "
                f"projections {', '.join(_projections(experts))}; LAG routes "
                f"<experts>.<projection>.<expert> for those"
            )
    return wrapper


# -- routers ---------------------------------------------------------------------------------------
def is_router(module: nn.Module) -> bool:
    """Whether ``module`` may be an MoE router (:func:`check_router` tells whether its forward uses
    its weight as one): not linear-like but holding a 2-D floating-point ``weight`` parameter, or an
    ``nn.Linear`` subclass whose forward returns more than its product (Phi-MoE's, Llama-4's)."""
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    if weight is None or nn.parameter.is_lazy(weight) or weight.dim() != 2 or not weight.is_floating_point():
        return False  # a lazy layer's weight has no shape yet (patch says to run it once first)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.Bilinear, nn.modules.conv._ConvNd)):
        return False
    if linear_shape(module) is None:
        return True
    return (
        isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward and not _returns_tensor(module)
    )


def _returns_tensor(layer: nn.Linear) -> bool:
    """Whether a linear layer's forward returns a tensor, told by running it once (:func:`_probing`):
    on meta copies of its parameters and buffers, so its state is left as it was (a forward that
    keeps statistics of its inputs, a QAT observer) even when patch is then refused; where the
    forward cannot run on meta (it reads values: ``.item()``, a NaN guard), on copies of them.
    A forward that fails both ways is left to be a linear layer, as it was before this check."""
    state = (*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False))
    try:  # all of it: a quantised weight (a tensor subclass) may have no meta copy
        meta = {name: torch.empty_like(t, device="meta") for name, t in state}
        x = torch.empty(1, layer.in_features, dtype=layer.weight.dtype, device="meta")
        with _probing(layer), _reparametrize_module(layer, meta):
            return isinstance(type(layer).forward(layer, x), torch.Tensor)
    except Exception:  # noqa: BLE001
        pass
    weight = layer.weight
    try:  # on copies: a forward that reads values may also update them (an observer's running amax)
        copies = {name: t.detach().clone() for name, t in state}
        x = torch.zeros(1, layer.in_features, dtype=weight.dtype, device=weight.device)
        with _probing(layer), _reparametrize_module(layer, copies):
            return isinstance(type(layer).forward(layer, x), torch.Tensor)
    except Exception:  # noqa: BLE001
        return True


@contextlib.contextmanager
def _probing(module: nn.Module):
    """A dry run of ``module``'s forward that patch makes to tell what it is: called as
    ``type(module).forward`` (its hooks do not fire), without gradients, with the random number
    generators' states put back, and every attribute, parameter, buffer and submodule the run set on
    it or its submodules (a cache or a buffer built on first use) put back too. Tensors changed in
    place stay changed: on meta copies of them (:func:`_returns_tensor`) that leaves nothing."""
    tables = ("__dict__", "_parameters", "_buffers", "_modules")
    saved = [(m, [dict(getattr(m, table)) for table in tables]) for m in module.modules()]
    devices = sorted({t.device.index or 0 for t in module.parameters() if t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for m, contents in saved:
            m.__dict__.clear()
            m.__dict__.update(contents[0])  # the tables' own dicts are back: refill them
            for table, content in zip(tables[1:], contents[1:]):
                getattr(m, table).clear()
                getattr(m, table).update(content)


class RouterView(nn.Module):
    """A router's linear map ``x -> F.linear(x, weight, bias)`` as a linear-like layer, for the
    checks patch makes of the layers it wraps. A router whose forward casts its weight for the
    product (``cast_to``, :func:`check_router`) computes in that dtype (``compute_dtype``), whatever
    the model is cast to; another in its weight's. Holds no tensors of its own."""

    def __init__(self, router: nn.Module, cast_to: torch.dtype | None):
        super().__init__()
        self.__dict__["_router"] = router
        self.out_features, self.in_features = router.weight.shape
        if cast_to is not None:
            self.compute_dtype = cast_to

    @property
    def weight(self) -> torch.Tensor:
        return self._router.weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self._router, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# Tensor methods that return the weight cast (or moved): ~two dozen transformers routers take their
# product in fp32, F.linear(x.type(torch.float32), self.weight.type(torch.float32)) (DeepSeek-V2/V3,
# GLM-4-MoE, Ernie-4.5-MoE, Nemotron-H, ...), and a 16-bit model's weight reaches F.linear as such a copy.
_CASTS = frozenset(
    getattr(torch.Tensor, name) for name in ("to", "type", "type_as", "float", "double", "half", "bfloat16")
)
# ... and those that return it transposed, with the products that take it so: Kolibri1's router takes
# torch.mm(x, self.weight.t(), out_dtype=torch.float32) on CUDA (fp32 logits from a 16-bit GEMM)
_TRANSPOSES = frozenset((torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose))
_TRANSPOSED_PROPERTIES = (torch.Tensor.T, torch.Tensor.mT)  # their getters reach the mode as bound __get__
_MATMULS = frozenset((torch.mm, torch.matmul, torch.Tensor.mm, torch.Tensor.matmul))


def _transposes(func, args) -> bool:
    """Whether ``func(*args)`` returns its 2-D first argument transposed."""
    if func in _TRANSPOSES:
        return len(args) < 3 or (args[1] - args[2]) % 2 != 0  # t(w), or transpose(w, d0, d1) with d0 != d1
    return getattr(func, "__self__", None) in _TRANSPOSED_PROPERTIES


class LinearRedirect(TorchFunctionMode):
    """Within its ``with`` block, every ``F.linear(x, w, bias=None)`` whose ``w`` is one weight
    (matched by identity) or a copy of it that the block cast (``weight.float()``,
    ``.type(torch.float32)``, ``.to(...)``, in any chain), and every ``torch.mm(x, wt[, out_dtype=])``
    or ``matmul`` whose ``wt`` is such a weight transposed (``.t()``, ``.T``), calls ``fn(x, w,
    bias)`` instead (an ``out_dtype`` product as ``fn(x.to(out_dtype), w.to(out_dtype), None)``: the
    same fp32 product of 16-bit values, on any device). ``.calls`` counts them; ``.cast_to`` is the
    last such product's dtype if the block cast the weight (or gave an ``out_dtype``) to get there,
    else None."""

    def __init__(self, weight: torch.Tensor, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.weight, self.fn, self.calls, self.cast_to = weight, fn, 0, None
        # (tensor, transposed, cast) for the weight, then every cast or transpose of one of them (w.float()
        # of an fp32 w is w itself, cast): held, so that no other tensor can take one's identity meanwhile
        self._derived = [(weight, False, False)]

    def _derivation(self, t) -> tuple[bool, bool] | None:
        """(transposed, cast): how the block derived ``t`` from the weight, last way first; None: it did not."""
        return next(((transposed, cast) for w, transposed, cast in reversed(self._derived) if t is w), None)

    def _redirect(self, x: torch.Tensor, weight: torch.Tensor, bias, cast: bool) -> torch.Tensor:
        self.calls += 1
        self.cast_to = weight.dtype if cast else None
        return self.fn(x, weight, bias)  # the mode is off inside its own handler: fn's F.linear runs plain

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(*args, **kwargs)
            how = self._derivation(weight)
            if how is not None and not how[0]:
                return self._redirect(x, weight, bias, cast=how[1])
        elif func in _MATMULS and len(args) == 2 and set(kwargs) <= {"out_dtype"}:
            how = self._derivation(args[1])
            if how is not None and how[0]:
                x, weight, dtype = args[0], args[1].T, kwargs.get("out_dtype")
                if dtype is not None:
                    x, weight = x.to(dtype), weight.to(dtype)
                return self._redirect(x, weight, None, cast=how[1] or dtype is not None)
        out = func(*args, **kwargs)
        how = self._derivation(args[0]) if args and isinstance(out, torch.Tensor) else None
        if how is not None and func in _CASTS:
            self._derived.append((out, how[0], True))
        elif how is not None and _transposes(func, args):
            self._derived.append((out, not how[0], how[1]))
        return out


def _linear_arguments(input, weight, bias=None):  # noqa: A002 - F.linear's own names, as callers may pass them
    return input, weight, bias


# what is_router made of the module, for check_router's refusals
_ROUTER = "was taken for an MoE router (a 2-D weight, and no linear layer's forward)"


def check_router(name: str, router: nn.Module) -> torch.dtype | None:
    """The dtype a router's forward casts its weight to for its product (routers that take their
    logits in fp32), or None where it takes the weight as it is. Raises ValueError naming ``name``
    unless that forward, run twice on a dummy input (:func:`_probing`: no hooks, no gradient, its
    attributes put back), computes ``F.linear(x, self.weight[, bias])`` exactly once each time. A
    forward that takes more than the hidden states (MiniMax-M2's takes the expert-score bias too)
    cannot be run here: None, and every forward checks that it computed the product once
    (:class:`.routed_layers.LagRouter`)."""
    weight = router.weight
    x = torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        inspect.signature(router.forward).bind(x)
    except TypeError:
        return None
    except ValueError:  # no signature to read (a builtin): run it
        pass
    # Twice in one dry run: a forward that kept a copy of its weight from its first call (a cached
    # cast) would reach F.linear with that copy from the second on, which no redirect can tell.
    with _probing(router):
        for run in ("", " from its second call on"):
            try:
                with LinearRedirect(weight, F.linear) as mode:
                    type(router).forward(router, x)
            except Exception as e:  # noqa: BLE001 - whatever it raises, it is no router LAG can wrap
                raise ValueError(
                    f"module {name!r} ({type(router).__name__}) {_ROUTER}; its forward failed{run} on a "
                    f"[2, {weight.shape[1]}] input: {type(e).__name__}: {e}"
                ) from None
            if mode.calls != 1:
                raise ValueError(
                    f"module {name!r} ({type(router).__name__}) {_ROUTER}, and its forward computes F.linear(x, "
                    f"weight) {mode.calls} times{run} (LAG routes a module whose forward computes it once, as an MoE "
                    "router does, and adds the routed update to that product). Its weight may be cast on the way "
                    "(self.weight.float()), not otherwise changed, nor kept cast from one call to the next"
                )
    return mode.cast_to

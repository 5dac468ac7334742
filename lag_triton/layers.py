"""Which base layers LAG can wrap, and in which dtype it routes them (issue 15, part 1).

LAG adds ``B*(A*x)`` to whatever the base layer returns, so the base layer may compute its own
output however it likes -- dense, int8, 4-bit, dequantised on the fly -- as long as it maps
``[..., d_in] -> [..., d_out]`` and says what d_in and d_out are. That is what "linear-like" means:

- ``nn.Linear`` and its subclasses (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, and torchao's
  quantised layers, which stay ``nn.Linear`` with a quantised tensor subclass as weight);
- transformers' ``Conv1D`` (GPT-2; weight stored as [d_in, d_out]);
- any other module with integer ``in_features`` / ``out_features`` attributes (GPTQ/AWQ-style
  ``QuantLinear``), which is the convention all of these follow.

The library is held and routed in the layer's *compute* dtype, not its storage dtype (an int8 or
packed 4-bit weight says nothing about the dtype of the activations it multiplies). In order:

1. a ``compute_dtype`` attribute that is a torch dtype (bitsandbytes ``Linear4bit``, many
   ``QuantLinear`` implementations) -- the layer says it;
2. a floating-point ``weight`` of the logical shape ([d_out, d_in]; Conv1D [d_in, d_out]): the
   dtype it multiplies in. This covers ``nn.Linear``/``Conv1D`` and torchao's weight subclasses,
   which report the dtype they dequantise to;
3. otherwise the weight is storage only (int8, packed int4, or bitsandbytes' packed 4-bit bytes
   even when stored as bf16), and such layers compute in the dtype of their input: the model's
   activation dtype, taken as the dtype of the first floating-point parameter outside the
   linear-like layers (the embeddings of a transformers model); failing that, the layer's own
   first floating-point tensor (bias, scales).

Routing needs float32, float16 or bfloat16; a float64 layer routes in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style layers keep weight as [d_in, d_out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep patching usable without it
    Conv1D = ()

__all__ = ["LayerInfo", "ROUTABLE_DTYPES", "activation_dtype", "describe_layer", "linear_shape", "route_dtype"]

# Compute dtypes patch accepts. The kernels route in fp32/fp16/bf16; an fp64 layer routes in fp32.
ROUTABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

SUPPORTED = (
    "nn.Linear (and subclasses: bitsandbytes Linear4bit/Linear8bitLt, torchao-quantised Linear), "
    "transformers' Conv1D, or a module with integer in_features/out_features (GPTQ/AWQ QuantLinear)"
)


def route_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the library is held and routed in for a layer computing in ``dtype``."""
    return torch.float32 if dtype == torch.float64 else dtype


@dataclass(frozen=True)
class LayerInfo:
    """What patch needs to know about a base layer: its sizes, device and compute dtype."""

    d_in: int
    d_out: int
    device: torch.device
    dtype: torch.dtype  # the compute dtype (rule in the module docstring), not the storage dtype
    dtype_from: str  # which rule chose dtype, for messages and tests


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a linear-like module, else None. Sizes are not checked to be positive."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    # nn.Linear and every quantised variant name their sizes this way. The weight's shape is no
    # guide: bitsandbytes packs a 4-bit weight into [d_out * d_in / 2, 1] bytes, GPTQ into int32
    # words.
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if _is_int(d_in) and _is_int(d_out):
        return d_in, d_out
    return None


def _not_linear_hint(module: nn.Module) -> str:
    """Why a module is not linear-like, when it is a kind people try to target."""
    if isinstance(module, nn.Embedding):
        return "; an embedding is a lookup, not a linear map of its input (embedding LoRA is not supported)"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "; a convolution mixes positions, not a per-token linear map (convolution LoRA is not supported)"
    if isinstance(module, nn.Bilinear):
        return "; nn.Bilinear takes two inputs"
    return ""


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    out = list(module.parameters()) + list(module.buffers())
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not any(weight is t for t in out):
        out.append(weight)
    return out


def activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating-point parameter outside the model's linear-like layers.

    Hidden states take the dtype of the modules that make them (embeddings, norms); quantised
    layers whose weight is only storage compute in the dtype of their input, which is this one.
    Parameters of linear-like layers (biases, scales) and of their children are skipped: a GPTQ
    layer keeps float16 scales inside a bfloat16 model.
    """
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if linear_shape(module) is not None:
            skip.append(name)
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                return p.dtype
    return None


def _compute_dtype(
    name: str, module: nn.Module, d_in: int, d_out: int, model_dtype: Callable[[], torch.dtype | None]
) -> tuple[torch.dtype, str]:
    declared = getattr(module, "compute_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared, "compute_dtype"
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        logical = (d_in, d_out) if Conv1D and isinstance(module, Conv1D) else (d_out, d_in)
        if weight.is_floating_point() and tuple(weight.shape) == logical:
            if weight.dtype not in ROUTABLE_DTYPES:
                raise TypeError(
                    f"module {name!r} has a {weight.dtype} weight, so it computes in {weight.dtype}; "
                    "LAG routes layers that compute in float32, float16, bfloat16 or float64"
                )
            return weight.dtype, "weight"
        if type(module) is nn.Linear or (Conv1D and type(module) is Conv1D):
            # A plain layer multiplies by its weight as stored: with an integer weight its forward
            # cannot run at all (a weight replaced by hand, not a quantisation library's layer).
            raise TypeError(
                f"module {name!r} is a plain {type(module).__name__} with a {weight.dtype} weight of "
                f"shape {tuple(weight.shape)}: its forward multiplies by that tensor as it is, so it "
                "cannot run; quantise it with a library whose layers dequantise (bitsandbytes, "
                "torchao, GPTQ/AWQ), or keep it float32, float16, bfloat16 or float64"
            )
    dtype = model_dtype()
    if dtype is not None:
        return dtype, "model activations"
    for t in _tensors(module):
        if t.is_floating_point():
            return t.dtype, "layer's floating-point tensors"
    held = [f"{n} {t.dtype}" for n, t in list(module.named_parameters()) + list(module.named_buffers())]
    raise TypeError(
        f"cannot tell the compute dtype of module {name!r} ({type(module).__name__}, holding "
        f"{', '.join(held[:6])}): it has no compute_dtype attribute and no floating-point tensor, and "
        "the model has no floating-point parameter outside its linear layers"
    )


def describe_layer(name: str, module: nn.Module, model_dtype: Callable[[], torch.dtype | None]) -> LayerInfo:
    """Check that LAG can wrap ``module`` (named ``name``) and say how; raise TypeError/ValueError
    naming the module otherwise. ``model_dtype()`` gives the model's activation dtype (rule 3)."""
    shape = linear_shape(module)
    if shape is None:
        raise TypeError(
            f"module {name!r} of type {type(module).__name__} is not linear-like"
            f"{_not_linear_hint(module)}. LAG wraps modules that map [..., d_in] -> [..., d_out] "
            f"and name their sizes: {SUPPORTED}"
        )
    d_in, d_out = shape
    if d_in < 1 or d_out < 1:
        raise ValueError(
            f"module {name!r} ({type(module).__name__}) has in_features={d_in}, out_features={d_out}; "
            "a lazy layer must run one forward before it is patched"
        )
    tensors = _tensors(module)
    if not tensors:
        raise TypeError(
            f"module {name!r} ({type(module).__name__}) has no parameters or buffers, so LAG cannot "
            "tell which device it runs on"
        )
    devices = {t.device for t in tensors}
    if any(d.type == "meta" for d in devices):
        if getattr(module, "_hf_hook", None) is not None:
            raise ValueError(
                f"module {name!r} is offloaded by accelerate (device_map with offload, cpu_offload, "
                "disk_offload): its weights are on the meta device between forwards. LAG holds each "
                "layer's library on the layer's device and needs that device known and the weights "
                "resident: load the model without offloading (a device_map whose devices hold it)"
            )
        raise ValueError(
            f"module {name!r} is on the meta device (no weights yet): load the model's weights "
            "(e.g. to_empty + load_state_dict) before patching"
        )
    if len(devices) > 1:
        raise ValueError(
            f"module {name!r} has tensors on several devices ({', '.join(sorted(map(str, devices)))}); "
            "LAG needs each wrapped layer on one device"
        )
    dtype, rule = _compute_dtype(name, module, d_in, d_out, model_dtype)
    if dtype not in ROUTABLE_DTYPES:
        raise TypeError(
            f"module {name!r} computes in {dtype} (from its {rule}); LAG routes layers that compute in "
            "float32, float16, bfloat16 or float64"
        )
    return LayerInfo(d_in, d_out, devices.pop(), dtype, rule)

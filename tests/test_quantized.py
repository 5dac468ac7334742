"""LAG on quantised and other linear-like base layers (issue 15, part 1).

What is checked, for every kind of layer that runs on this machine:
- a patched layer returns the quantised base layer's own output plus the LoRA term, computed
  here independently (a per-token loop over the docs/design.md §1 routing rules, in float64, applying the
  PEFT adapter's own s·B·A to the selected adapter);
- a quantised tiny Llama, patched, generates the same tokens as that reference;
- the library is held in the layer's compute dtype, not its storage dtype;
- ``unpatch`` puts the quantised module objects back;
- modules that are not linear-like are refused with their name, and the model is left untouched.

Kinds: a stand-in GPTQ/AWQ-style ``QuantLinear`` (tests/factories.py; int8, and int4 packed in
int32 words) always runs. torchao int8 weight-only and bitsandbytes Linear8bitLt / Linear4bit
(NF4) run when those optional packages are installed (``pip install -e .[test-quant]``) and work on
this CPU; otherwise they skip with the reason.
"""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lag_triton
from lag_triton import Library, ModuleWeights
from lag_triton.layers import activation_dtype, describe_layer
from lag_triton.patching import LagLinear

from factories import VOCAB, QuantLinear, make_adapter, quantize_linears, tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
K = 2  # Arrow keeps 2 of the 4 adapters, SpectR picks 1 of those


@functools.cache
def _unavailable(kind: str) -> str | None:
    """Why ``kind`` cannot run here (None when it can): its package is missing, or quantising and
    running one small layer on this CPU fails."""
    package = {"torchao-int8wo": "torchao", "bnb-int8": "bitsandbytes", "bnb-nf4": "bitsandbytes"}.get(kind)
    if package is None:
        return None
    try:
        __import__(package)
    except Exception as e:  # not installed, or built for another torch
        return f"{package} is not importable ({type(e).__name__}: {e}); optional: pip install -e .[test-quant]"
    try:
        probe = nn.Sequential(nn.Linear(64, 64))
        quantize_linears(probe, kind, ["0"])
        probe(torch.randn(2, 64))
    except Exception as e:
        return f"{package} does not run {kind} on this CPU ({type(e).__name__}: {e})"
    return None


def _kind(kind: str) -> str:
    reason = _unavailable(kind)
    if reason:
        pytest.skip(reason)
    return kind


KINDS = ["standin-int8", "standin-int4", "torchao-int8wo", "bnb-int8", "bnb-nf4"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    # alpha large enough that the adapters change greedy tokens of the random model
    return [make_adapter(model, tmp / f"a{i}", seed=10 + i, r=2 + i % 3, alpha=32.0, targets=TARGETS) for i in range(4)]


@pytest.fixture(scope="module")
def library(adapter_dirs):
    return Library.from_peft(adapter_dirs, progress=False)


@pytest.fixture(scope="module")
def lora(adapter_dirs):
    """{module name: [(A [r, d_in], B [d_out, r], scaling) per adapter, in library order]} in float64,
    read from the PEFT files: the unaligned LoRA the library was built from."""
    out: dict[str, list] = {}
    for d in adapter_dirs:
        tensors = load_file(str(d / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key[len("base_model.model.") : -len(".lora_A.weight")]
                b = tensors[key.replace("lora_A", "lora_B")]
                out.setdefault(name, []).append((a.double(), b.double(), 32.0 / a.shape[0]))
    return out


def _reference(x: torch.Tensor, weights: ModuleWeights, loras: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The LAG LoRA term for x [..., d_in], per token, in float64 (docs/design.md §1, router "lag", top_m=1):
    Arrow keeps the K adapters with the largest |p·x|, SpectR takes the largest ||A* x|| among
    them (ties: lower index), and that adapter's own s·B·(A·x) is added. Also returns each token's
    routing margin: the smaller relative gap of the two decisions (K-th vs next Arrow score, best
    vs second norm), so that low-precision checks can keep tokens no rounding can re-route."""
    p, a_star = weights.prototypes.double(), weights.a_star.double()
    ids = weights.adapter_ids.tolist()
    flat = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros(flat.shape[0], weights.d_out, dtype=torch.float64)
    margin = torch.full((flat.shape[0],), float("inf"), dtype=torch.float64)
    for t, xt in enumerate(flat):
        arrow = (p @ xt).abs().tolist()
        order = sorted(range(len(ids)), key=lambda i: (-arrow[i], i))
        candidates = order[:K]
        norms = {c: torch.linalg.vector_norm(a_star[c] @ xt).item() for c in candidates}
        ranked = sorted(candidates, key=lambda c: (-norms[c], c))
        a, b, s = loras[ids[ranked[0]]]
        out[t] = s * (b @ (a @ xt))
        if len(order) > K:
            margin[t] = (arrow[order[K - 1]] - arrow[order[K]]) / arrow[order[K - 1]]
        if len(ranked) > 1:
            margin[t] = min(margin[t], (norms[ranked[0]] - norms[ranked[1]]) / norms[ranked[0]])
    return out.reshape(*x.shape[:-1], weights.d_out), margin.reshape(x.shape[:-1])


def _reference_term(x: torch.Tensor, weights: ModuleWeights, loras: list) -> torch.Tensor:
    return _reference(x, weights, loras)[0]


def _quantized_llama(kind: str, dtype=torch.float32, compute_dtype=None):
    model = tiny_model("llama", dtype=dtype)
    layers = quantize_linears(model, kind, TARGETS, compute_dtype=compute_dtype)
    assert len(layers) == 8
    return model, layers


# -- a patched quantised layer = its own output + the LoRA term -------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_patched_layer_is_quantised_base_plus_lora_term(kind, library, lora):
    model, layers = _quantized_llama(_kind(kind))
    lag_triton.patch(model, library, k=K)
    gen = torch.Generator().manual_seed(0)
    for name, base in layers.items():
        patched = model.get_submodule(name)
        assert isinstance(patched, LagLinear) and patched.base_layer is base
        assert patched.routes[0].a_star.dtype == torch.float32
        x = torch.randn(2, 5, base.in_features, generator=gen)
        with torch.no_grad():
            got, own = patched(x), base(x)
        want = own.double() + _reference_term(x, library.modules[name], lora[name])
        assert got.dtype == own.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=f"{kind} {name}")
        # the term is not negligible next to the tolerance: a dropped LoRA term would fail
        assert (want - own.double()).abs().max() > 0.05


# -- generation: quantised tiny Llama, patched == quantised base + reference LoRA math ------------------
def _generate(model, **kw):
    with torch.no_grad():
        return model.generate(
            input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=8, do_sample=False, pad_token_id=0, **kw
        )


@pytest.mark.parametrize("kind", KINDS)
def test_patched_quantised_llama_generates_the_reference_tokens(kind, library, lora):
    model, layers = _quantized_llama(_kind(kind))
    base_tokens = _generate(model)

    # Reference: the quantised model with the LoRA term added by forward hooks (float64 math).
    def add_term(name):
        return lambda mod, args, out: out + _reference_term(args[0], library.modules[name], lora[name]).to(out.dtype)

    hooks = [layer.register_forward_hook(add_term(name)) for name, layer in layers.items()]
    try:
        want = _generate(model)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(_generate(model), base_tokens)  # hooks gone
    assert not torch.equal(want, base_tokens), "the adapters must change the greedy tokens for this test to bite"
    lag_triton.patch(model, library, k=K)
    assert torch.equal(_generate(model), want)
    assert torch.equal(_generate(model, use_cache=False), want)
    lag_triton.unpatch(model)
    assert all(model.get_submodule(n) is layer for n, layer in layers.items())
    assert torch.equal(_generate(model), base_tokens)


def test_patched_quantised_llama_traces_and_keeps_its_state_dict(library):
    model, layers = _quantized_llama("standin-int4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lag_triton.patch(model, library, k=K)
    with lag_triton.trace(model) as tr, torch.no_grad():
        model(input_ids=IDS)
    assert set(tr.selections) == set(layers)
    assert all(s.shape == (IDS.numel(), 1) for s in tr.selections.values())
    with pytest.warns(lag_triton.LibraryNotSavedWarning):
        after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert after["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int32
    up = model.get_submodule("model.layers.0.mlp.up_proj")
    assert up.weight is layers["model.layers.0.mlp.up_proj"].qweight  # no weight: the packed one, as PEFT shows it


# -- which dtype the library is held in ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, model_dtype, compute_dtype, want, rule",
    [
        # integer storage, fp16 scales, bf16 model: the activations' dtype, not the scales' or the storage's
        ("standin-int4", torch.bfloat16, None, torch.bfloat16, "model activations"),
        ("standin-int8", torch.float16, None, torch.float16, "model activations"),
        # a declared compute dtype wins over the activations'
        ("standin-int4", torch.float32, torch.bfloat16, torch.bfloat16, "compute_dtype"),
        # float64 model: routed in float32
        ("standin-int8", torch.float64, None, torch.float32, "model activations"),
        # torchao's weight subclass reports the dtype it dequantises to
        ("torchao-int8wo", torch.bfloat16, None, torch.bfloat16, "weight"),
        ("bnb-int8", torch.bfloat16, None, torch.bfloat16, "model activations"),
        ("bnb-nf4", torch.float32, None, torch.float32, "model activations"),
        ("bnb-nf4", torch.float32, torch.bfloat16, torch.bfloat16, "compute_dtype"),
    ],
)
def test_library_is_held_in_the_layers_compute_dtype(kind, model_dtype, compute_dtype, want, rule, library):
    model, layers = _quantized_llama(_kind(kind), dtype=model_dtype, compute_dtype=compute_dtype)
    name, layer = next(iter(layers.items()))
    assert describe_layer(name, layer, lambda: activation_dtype(model)).dtype_from == rule
    lag_triton.patch(model, library, k=K)
    for n in layers:
        route = model.get_submodule(n).routes[0]
        assert {route.a_star.dtype, route.b_star.dtype, route.prototypes.dtype} == {want}, n
    name = "model.layers.0.mlp.up_proj"
    x = torch.randn(16, 48, generator=torch.Generator().manual_seed(1)).to(model_dtype)
    patched = model.get_submodule(name)
    with torch.no_grad():
        got, own = patched(x), patched.base_layer(x)
    assert got.dtype == own.dtype == model_dtype
    term, margin = _reference(x, library.modules[name], _lora_of(library, name))
    if want == torch.float32:
        torch.testing.assert_close(got.double(), own.double() + term, rtol=1e-4, atol=1e-4)
    else:  # routed in 8-bit mantissas: compare the tokens whose routing no rounding can flip
        clear = margin > 0.05
        assert clear.sum() >= 4
        torch.testing.assert_close(got[clear].double(), own[clear].double() + term[clear], rtol=3e-2, atol=3e-2)


def _lora_of(library, name):
    """The reference LoRA of one module, rebuilt from the library itself (B* A* = s B A exactly)."""
    w = library.modules[name]
    return [(w.a_star[i].double(), w.b_star[i].double(), 1.0) for i in range(w.num_adapters)]


def test_fp16_scales_in_an_all_quantised_model_fall_back_to_the_layers_own_tensors():
    """With no floating-point parameter outside linear layers, the layer's own floats decide."""
    model = nn.Sequential(QuantLinear.from_linear(nn.Linear(16, 8), bits=8, scale_dtype=torch.float16))
    assert activation_dtype(model) is None
    info = describe_layer("0", model[0], lambda: activation_dtype(model))
    assert (info.dtype, info.dtype_from) == (torch.float16, "layer's floating-point tensors")


# -- refusals -------------------------------------------------------------------------------------------------
def _random_weights(d_in: int, d_out: int, n: int = 2, r: int = 2) -> ModuleWeights:
    g = torch.Generator().manual_seed(d_in * 1000 + d_out)
    a = torch.linalg.qr(torch.randn(n, d_in, r, generator=g))[0].transpose(1, 2).contiguous()
    return ModuleWeights(
        a_star=a,
        b_star=torch.randn(n, d_out, r, generator=g),
        prototypes=a[:, 0].contiguous(),
        adapter_ids=torch.arange(n),
    )


class _NoTensors(nn.Module):
    in_features, out_features = 16, 8

    def forward(self, x):
        return x[..., :8]


class _Toy(nn.Module):
    """One valid quantised layer (``good``) beside the module under test (``bad``)."""

    def __init__(self, bad: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.good = QuantLinear.from_linear(nn.Linear(16, 8), bits=4)
        self.bad = bad


def _int8_plain_linear():
    layer = nn.Linear(16, 8)
    layer.weight = nn.Parameter(torch.zeros(8, 16, dtype=torch.int8), requires_grad=False)
    return layer


def _fp8_compute():
    return QuantLinear.from_linear(nn.Linear(16, 8), bits=8, compute_dtype=torch.float8_e4m3fn)


def _meta_quant():
    with torch.device("meta"):
        return QuantLinear(16, 8, bits=8)


@pytest.mark.parametrize(
    "make, shape, error, needle",
    [
        (lambda: nn.Embedding(16, 8), (16, 8), TypeError, r"'bad' of type Embedding is not linear-like; an embedding"),
        (lambda: nn.Conv1d(16, 8, 3), (16, 8), TypeError, r"'bad' of type Conv1d is not linear-like; a convolution"),
        (
            lambda: nn.Bilinear(16, 16, 8),
            (16, 8),
            TypeError,
            r"'bad' of type Bilinear is not linear-like; .*two inputs",
        ),
        (lambda: nn.LayerNorm(16), (16, 16), TypeError, r"'bad' of type LayerNorm is not linear-like\. .*QuantLinear"),
        (lambda: nn.LazyLinear(8), (16, 8), ValueError, r"'bad' \(LazyLinear\) has in_features=0.*lazy"),
        (_NoTensors, (16, 8), TypeError, r"'bad' \(_NoTensors\) has no parameters or buffers"),
        (_int8_plain_linear, (16, 8), TypeError, r"'bad' is a plain Linear with a torch.int8 weight"),
        (_fp8_compute, (16, 8), TypeError, r"'bad' computes in torch.float8_e4m3fn \(from its compute_dtype\)"),
        (_meta_quant, (16, 8), ValueError, r"'bad' is on the meta device"),
        (
            lambda: QuantLinear.from_linear(nn.Linear(16, 24), bits=8),
            (16, 8),
            ValueError,
            r"module 'bad': adapters are 16 -> 8 but the model's layer is 16 -> 24",
        ),
    ],
)
def test_modules_that_are_not_routable_linear_layers_are_refused_untouched(make, shape, error, needle):
    model = _Toy(make())
    lib = Library(["x", "y"], {"good": _random_weights(16, 8), "bad": _random_weights(*shape)})
    good, bad = model.good, model.bad
    with pytest.raises(error, match=needle):
        lag_triton.patch(model, lib, k=1)
    assert model.good is good and model.bad is bad  # all-or-nothing: the valid layer is not patched either
    assert not hasattr(model, "_lag_num_libraries")


def test_no_floating_point_tensor_anywhere_is_refused():
    model = nn.Sequential(QuantLinear.from_linear(nn.Linear(16, 8, bias=False), bits=8))
    model[0].scales = model[0].scales.to(torch.int8)  # a layer with no float at all: nothing tells its dtype
    lib = Library(["x", "y"], {"0": _random_weights(16, 8)})
    with pytest.raises(
        TypeError,
        match=r"compute dtype of module '0' \(QuantLinear, holding qweight torch.int8, "
        r"scales torch.int8\)",
    ):
        lag_triton.patch(model, lib, k=1)
    assert isinstance(model[0], QuantLinear)


def test_a_toy_quantised_layer_with_biasless_int4_weights_is_routed_exactly():
    """The stand-in alone (no transformers model): patched output == its own + the term."""
    model = _Toy(nn.Identity())
    model.good = QuantLinear.from_linear(nn.Linear(16, 8, bias=False), bits=4, scale_dtype=torch.bfloat16)
    w = _random_weights(16, 8)
    lib = Library(["x", "y"], {"good": w})
    x = torch.randn(4, 16)
    own = model.good(x)
    lag_triton.patch(model, lib, k=2)
    assert model.good.routes[0].a_star.dtype == torch.float32  # the embedding's dtype, not the bf16 scales'
    term = _reference_term(x, w, [(w.a_star[i].double(), w.b_star[i].double(), 1.0) for i in range(2)])
    torch.testing.assert_close(model.good(x).double(), own.double() + term, rtol=1e-5, atol=1e-5)

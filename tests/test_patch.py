"""patch / unpatch / trace on tiny Hugging Face models: PEFT equivalence, generate(), errors."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

import lag_triton
from lag_triton import Library

from factories import VOCAB, make_adapter, peft_arrow_logits, peft_logits, tiny_model


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# -- PEFT equivalence --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"use_rslora": True},
        {"rank_pattern": {"layers.0.mlp.up_proj": 6, "q_proj": 2}, "alpha_pattern": {"layers.1.mlp.down_proj": 3.0}},
        {"alpha": -8.0, "alpha_pattern": {"q_proj": -3.0, "c_fc": 2.0}},  # a negative alpha subtracts the update
    ],
)
def test_one_adapter_library_reproduces_peft(arch, variant, tmp_path):
    model = tiny_model(arch)
    if arch == "gpt2" and "rank_pattern" in variant:
        variant = {"rank_pattern": {"h.0.mlp.c_fc": 6}, "alpha_pattern": {"h.1.attn.c_attn": 3.0}}
    path = make_adapter(model, tmp_path / "a", seed=5, arch=arch, **variant)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    want = peft_logits(model, path, ids)
    assert (want - _logits(model, ids)).abs().max() > 1e-2  # the adapter really changes the output
    lag_triton.patch(model, Library.from_peft([path], progress=False), k=1)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_arrow_router_reproduces_peft_arrow(tmp_path):
    """router="arrow" with top_m = PEFT's top_k and temperature = its router_temperature is PEFT's
    Arrow (create_arrow_model): |x . p| over every adapter, softmax over the top k, the sum of their
    scaled LoRA outputs. PEFT finds each prototype by 15 power iterations from a random start, ours is
    the exact top right singular vector of s B A (a thin SVD): PEFT's iteration run to convergence
    gives ours (asserted by peft_arrow_logits), and with PEFT given ours the logits agree to fp32
    rounding."""
    model = tiny_model("llama")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=30 + i, r=4) for i in range(6)]
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    library = Library.from_peft(paths, progress=False)
    want = peft_arrow_logits(model, library, paths, ids, top_k=3, temperature=0.5)
    assert (want - _logits(model, ids)).abs().max() > 1e-2

    lag_triton.patch(model, library, router="arrow", k=3, top_m=3, temperature=0.5)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


# -- generate ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patched_llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    lib = Library.from_peft([make_adapter(model, tmp / f"a{i}", seed=i, r=2 + i % 3) for i in range(6)], progress=False)
    lag_triton.patch(model, lib, k=3, top_m=2)
    return model


def test_left_padded_batch_generates_what_each_sequence_generates_alone(patched_llama):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g) for n in (5, 9, 2)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batch = patched_llama.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:]
        for i, p in enumerate(prompts):
            alone = patched_llama.generate(
                input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw
            )[0, len(p) :]
            assert torch.equal(batch[i], alone), i


def test_kv_cache_generation_equals_no_cache(patched_llama):
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        cached = patched_llama.generate(input_ids=ids, use_cache=True, **kw)
        uncached = patched_llama.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_continuous_batching_generates_what_each_request_generates_alone(patched_llama):
    """transformers' continuous batching (generate_batch: requests packed into one row, paged KV
    cache) routes every token as generate() does for that request alone."""
    if not hasattr(patched_llama, "generate_batch"):
        pytest.skip("this transformers has no continuous batching (generate_batch)")
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(3)
    requests = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 9)]
    config = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batched = patched_llama.generate_batch(inputs=requests, generation_config=config, progress_bar=False)
    by_prompt = {tuple(out.prompt_ids): out.generated_tokens for out in batched.values()}
    assert sorted(by_prompt) == sorted(map(tuple, requests))
    for ids in requests:
        alone = patched_llama.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert by_prompt[tuple(ids)] == alone[0, len(ids) :].tolist(), ids


def test_trace_records_every_token_of_every_call(patched_llama):
    ids = torch.randint(1, VOCAB, (2, 7))
    with lag_triton.trace(patched_llama) as tr:
        _logits(patched_llama, ids)
        _logits(patched_llama, ids[:, :3])
    assert len(tr.selections) == 8
    sel = tr.selections["model.layers.1.mlp.up_proj"]
    assert sel.dtype == torch.int64 and sel.shape == (2 * 7 + 2 * 3, 2)
    assert ((sel >= 0) & (sel < 6)).all() and (sel[:, 0] != sel[:, 1]).all()


# -- dtypes, several libraries, unpatch ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_is_as_close_to_fp32_as_peft(dtype, tmp_path):
    """One adapter (no routing flips): our error vs the fp32 PEFT forward is PEFT's own low-precision error."""
    path = make_adapter(tiny_model("llama"), tmp_path / "a", seed=3)
    ids = torch.randint(0, VOCAB, (2, 6))
    truth = peft_logits(tiny_model("llama"), path, ids)
    peft_low = peft_logits(tiny_model("llama", dtype=dtype), path, ids)
    peft_err = (peft_low.float() - truth).abs().max()
    low = tiny_model("llama", dtype=dtype)
    lag_triton.patch(low, Library.from_peft([path], progress=False), k=1)
    assert low.model.layers[0].mlp.up_proj.routes[0].a_star.dtype == dtype
    got = _logits(low, ids)
    assert got.dtype == peft_low.dtype  # the model's dtype (transformers 4.45 upcast logits to fp32)
    assert (got.float() - truth).abs().max() <= 2 * peft_err + 1e-3


def test_two_libraries_add_their_contributions(tmp_path):
    model = tiny_model("llama")
    attn = Library.from_peft(
        [make_adapter(model, tmp_path / "t", seed=1, targets=["q_proj", "v_proj", "up_proj"])], progress=False
    )
    mlp = Library.from_peft(
        [make_adapter(model, tmp_path / "k", seed=2, targets=["up_proj", "down_proj"])], progress=False
    )
    ids = torch.randint(0, VOCAB, (1, 8))
    from peft import PeftModel

    both = PeftModel.from_pretrained(model, str(tmp_path / "t"), adapter_name="t")
    both.load_adapter(str(tmp_path / "k"), adapter_name="k")
    both.base_model.set_adapter(["t", "k"])
    with torch.no_grad():
        want = both(input_ids=ids).logits
    model = both.unload()
    lag_triton.patch(model, [attn, mlp], k=1)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    with lag_triton.trace(model) as tr:
        _logits(model, ids)
    assert "model.layers.0.mlp.up_proj" not in tr.selections  # routed by both libraries
    assert set(tr.library_selections) == {0, 1}
    assert "model.layers.0.mlp.up_proj" in tr.library_selections[1]
    assert "model.layers.0.mlp.down_proj" in tr.selections


def test_unpatch_restores_modules_state_dict_and_outputs(tmp_path):
    model = tiny_model("llama")
    originals = {n: m for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 5))
    before = _logits(model, ids)
    lib_path = tmp_path / "lib.safetensors"
    Library.from_peft([make_adapter(model, tmp_path / "a", seed=0)], progress=False).save(lib_path)
    lag_triton.patch(model, lib_path)  # a path works too
    assert not torch.equal(_logits(model, ids), before)
    lag_triton.unpatch(model)
    assert {n: m for n, m in model.named_modules()} == originals
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patched_layers_show_their_base_weight_and_bias(arch, tmp_path):
    """Model code reads its projections' weight and bias (T5 casts to ``wo.weight.dtype``): a
    patched layer shows its base layer's tensors themselves, and owns no parameter of its own."""
    model = tiny_model(arch)
    layers = dict(model.named_modules())
    params = dict(model.named_parameters())
    lag_triton.patch(model, Library.from_peft([make_adapter(model, tmp_path / "a", seed=0, arch=arch)], progress=False))
    patched = {n: m for n, m in model.named_modules() if isinstance(m, lag_triton.LagLinear)}
    assert patched
    for name, module in patched.items():
        assert module.weight is layers[name].weight and module.bias is layers[name].bias
    assert arch != "gpt2" or all(m.bias is not None for m in patched.values())  # Conv1D has one
    assert {k.replace(".base_layer", ""): v for k, v in model.named_parameters()} == params


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # PEFT's
def test_a_routed_tied_output_layer_stays_tied_and_reproduces_peft(tmp_path):
    """LoRA on a tied lm_head: the patched layer shows the shared weight, and transformers'
    tie_weights (resize_token_embeddings, loading) sets it on the base layer, keeping the tie."""
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.LlamaConfig(**dict(tiny_model("llama").config.to_dict(), tie_word_embeddings=True))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "a"), save_embedding_layers=False)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    want = _logits(peft_model, ids)
    peft_model.unload()
    library = Library.from_peft([tmp_path / "a"], progress=False)
    assert "lm_head" in library.modules
    lag_triton.patch(model, library, k=1)
    assert isinstance(model.lm_head, lag_triton.LagLinear) and model.lm_head.weight is embedding
    model.tie_weights()
    assert model.lm_head.base_layer.weight is embedding and "weight" not in model.lm_head._parameters
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)

    # A resized vocabulary re-ties a wider weight: the library's lm_head no longer fits, said by name;
    # unpatched, the model is the resized one (out_features follows the weight, as transformers sets it)
    # (no mean resizing where transformers has it, >= 4.46: the new rows' values do not matter here)
    resize = model.resize_token_embeddings
    resize(VOCAB + 7, **({"mean_resizing": False} if "mean_resizing" in inspect.signature(resize).parameters else {}))
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head: its base layer now gives 104 outputs, but it had 97 .*unpatch"):
        _logits(model, ids)
    lag_triton.unpatch(model)
    assert model.lm_head.out_features == VOCAB + 7 and _logits(model, ids).shape[-1] == VOCAB + 7


# -- refused input leaves the model untouched ------------------------------------------------------
@pytest.fixture(scope="module")
def small_library(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lib")
    return Library.from_peft(
        [make_adapter(tiny_model("llama"), tmp / f"a{i}", seed=i) for i in range(2)], progress=False
    )


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        ({"k": 0}, ValueError, "k must be an int >= 1"),
        ({"top_m": 4, "k": 2}, ValueError, "top_m=4 > k=2"),
        ({"router": "moe"}, ValueError, "unknown router 'moe'"),
        ({"combine": "max"}, ValueError, "unknown combine"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"backend": "cuda"}, RuntimeError, "backend 'cuda' is unavailable"),
        ({"backend": "nope"}, RuntimeError, "unknown backend"),
    ],
)
def test_bad_settings_raise_and_leave_model_unpatched(small_library, kwargs, error, needle):
    model = tiny_model("llama")
    with pytest.raises(error, match=needle):
        lag_triton.patch(model, small_library, **kwargs)
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())


def test_routing_config_takes_numeric_scalars_as_patch_does():
    """RoutingConfig (public) and patch take the same values: numpy and 0-d tensor ints and reals as
    Python ints and floats (RoutingConfig refused np.int64 k and kept a np.float32 temperature), and
    refuse the same (bools, floats for k, complex, strings: one temperature message)."""
    import numpy as np

    config = lag_triton.RoutingConfig(k=np.int64(3), top_m=torch.tensor(2), temperature=np.float32(0.5))
    assert (config.k, config.top_m, config.temperature) == (3, 2, 0.5)
    assert type(config.k) is int and type(config.top_m) is int and type(config.temperature) is float
    for bad in (dict(k=True), dict(k=2.0), dict(k=torch.tensor(True)), dict(top_m=np.float64(1))):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            lag_triton.RoutingConfig(**bad)
    for bad in ("0.5", torch.tensor(1 + 1j), True, 0.0):
        with pytest.raises(ValueError, match="temperature must be a number >= 1.18e-38"):
            lag_triton.RoutingConfig(temperature=bad)


@pytest.mark.parametrize(
    "version,refused",
    [("3.2.0", True), ("3.3.1", True), ("3.4.0", False), ("3.6.0+git1a2b3c", False), ("3.10.0", False)],
)
def test_triton_version_floor(version, refused):
    from lag_triton.kernels import triton_too_old_reason

    reason = triton_too_old_reason(version)
    assert (reason is not None) == refused
    if refused:
        assert f"triton {version} is installed" in reason and ">= 3.4" in reason


def test_triton_too_old_is_refused_with_its_version(small_library, monkeypatch):
    """An old Triton (torch <= 2.7 pins 3.3) lacks tl.topk: "auto" passes it by, a request for it
    is refused before any change, and importing the kernels says why instead of failing at a launch."""
    import subprocess
    import sys

    import triton

    from lag_triton.kernels import resolve_backend, triton_too_old_reason

    refused = triton_too_old_reason(triton.__version__)
    if refused is not None:
        pytest.skip(f"the installed Triton is refused already: {refused}")
    assert resolve_backend("auto", "cuda") == "triton"
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    assert resolve_backend("auto", "cuda") != "triton"
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match=r"backend 'triton' is unavailable: triton 3\.3\.1 is installed"):
        lag_triton.patch(model, small_library, backend="triton")
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())
    code = "import triton; triton.__version__ = '3.3.1'; import lag_triton.kernels.triton"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "ImportError: triton 3.3.1 is installed" in proc.stderr, proc.stderr[-2000:]


def test_library_for_another_model_is_refused_before_any_change(small_library, tmp_path):
    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(80, 40, bias=False)  # d_out 40 instead of 48
    with pytest.raises(ValueError, match=r"module 'model.layers.1.mlp.down_proj': adapters are 80 -> 48"):
        lag_triton.patch(model, small_library)
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel does not have \(was it built for another base model\?\)"):
        lag_triton.patch(gpt2, small_library)
    with pytest.raises(FileNotFoundError):
        lag_triton.patch(gpt2, tmp_path / "missing.safetensors")
    with pytest.raises(lag_triton.LibraryFormatError):
        (tmp_path / "x.safetensors").write_bytes(json.dumps({}).encode())
        lag_triton.patch(gpt2, tmp_path / "x.safetensors")
    assert not any(isinstance(m, lag_triton.LagLinear) for m in gpt2.modules())


def _renamed(library, rename):
    return Library(library.names, {rename(name): w for name, w in library.modules.items()})


def test_library_under_another_prefix_is_refused_with_the_rename_that_fits(small_library):
    """Adapters trained on LlamaForCausalLM name 'model.layers.0...'; its inner LlamaModel (or a
    multimodal model's language model) names the same layers otherwise: the error says which name
    the model has and the rename that fits, and that rename patches."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError) as refused:
        lag_triton.patch(model.model, small_library)
    message = str(refused.value)
    assert "it has 'layers." in message and "the same layer under another prefix" in message
    rename = message.split("{")[1].split(":")[0]
    assert rename == "name.removeprefix('model.')"
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())

    inner = _renamed(small_library, lambda name: eval(rename, {"name": name}))
    want = tiny_model("llama")
    lag_triton.patch(want, small_library)
    lag_triton.patch(model.model, inner)
    torch.testing.assert_close(_logits(model, ids), _logits(want, ids), rtol=0, atol=0)

    for library, expect in [
        (_renamed(small_library, lambda n: n.replace("model.", "language_model.", 1)),
         "name.replace('language_model.', 'model.', 1)"),
        (inner, "'model.' + name"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(expect)):
            lag_triton.patch(tiny_model("llama"), library)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"PeftModel is a PEFT model .* model = peft_model\.unload\(\)"):
        lag_triton.patch(peft_model, small_library)
    assert not any(isinstance(m, lag_triton.LagLinear) for m in peft_model.modules())
    deeper = _renamed(small_library, lambda n: n.replace("layers.1.", "layers.7."))  # a layer the model lacks
    with pytest.raises(ValueError, match=r"'model.layers.7.[a-z_.]+', which LlamaForCausalLM does not have \(was"):
        lag_triton.patch(tiny_model("llama"), deeper)


def test_trace_on_unpatched_model_raises():
    with pytest.raises(ValueError, match="no LAG-patched modules"):
        with lag_triton.trace(tiny_model("llama")):
            pass

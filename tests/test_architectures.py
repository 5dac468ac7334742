"""patch on the model families users bring: decoder-only (fused and split projections, MoE),
encoder-decoder. Each one-adapter library reproduces PEFT's LoRA forward on every linear layer
PEFT's "all-linear" targets, and a patched model generates the same with and without its cache.

Llama, Qwen2 and GPT-2 (Conv1D) are covered with more variants in test_patch.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lag_triton
from lag_triton import LagLinear, Library

from factories import SEQ2SEQ, VOCAB, make_adapter, peft_logits, tiny_model

FAMILIES = [
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",  # fused qkv_proj and gate_up_proj
    "qwen3",
    "olmo2",
    "mixtral",  # MoE: transformers 5 keeps experts as 3-D parameters, which "all-linear" targets too,
    # with the router's weight (tests/test_experts.py)
    "qwen3_moe",
    "gpt_oss",  # MoE, experts transposed with biases
    "glm4_moe",  # MoE whose router takes its logits in fp32
    "minimax_m2",  # MoE whose router takes the expert-score bias as an argument
    "gpt_neox",  # fused query_key_value
    "falcon",
    "opt",
    "bloom",
    "t5",  # reads its projections' .weight in the forward
    "bart",
]


def _lora_modules(adapter, model) -> set[str]:
    """Names of the modules an adapter folder holds LoRA factors for: its linear layers', and, for a
    3-D expert parameter it targets (target_parameters), ``<experts>.<parameter>.<e>`` per expert."""
    keys = safe_open(str(adapter / "adapter_model.safetensors"), "pt").keys()
    names = {key.removeprefix("base_model.model.").split(".lora_A.")[0] for key in keys if ".lora_A." in key}
    targets = json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters") or []
    experts = {
        (name.rpartition(".")[0], name.rpartition(".")[2], p.shape[0])
        for name, p in model.named_parameters()
        if p.dim() == 3 and any(name == t or name.endswith("." + t) for t in targets)
    }
    names -= {m + ".base_layer" * depth for m, _, _ in experts for depth in range(3)}
    names |= {f"{m}.{p}.{e}" for m, p, n in experts for e in range(n)}
    assert names
    return names


def _inputs(arch, seed=0):
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
    return ids, ({"decoder_input_ids": ids[:, :5]} if arch in SEQ2SEQ else {})


def _logits(model, ids, extra):
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


@pytest.mark.parametrize("arch", FAMILIES)
def test_one_adapter_library_reproduces_peft(arch, tmp_path):
    model = tiny_model(arch)
    path = make_adapter(model, tmp_path / "a", seed=3, arch=arch)
    ids, extra = _inputs(arch)
    want = peft_logits(model, path, ids, **extra)
    assert (want - _logits(model, ids, extra)).abs().max() > 1e-2  # the adapter really changes the output

    trained = _lora_modules(path, model)
    library = Library.from_peft([path], progress=False)
    lag_triton.patch(model, library, k=1)
    patched = {name for name, m in model.named_modules() if isinstance(m, LagLinear)}
    assert patched == trained  # every module the adapter trains, no other
    torch.testing.assert_close(_logits(model, ids, extra), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_patched_model_generates_the_same_with_and_without_cache(arch, tmp_path):
    model = tiny_model(arch)
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=10 + i, arch=arch, r=2 + i) for i in range(3)]
    lag_triton.patch(model, Library.from_peft(paths, progress=False), k=2)
    ids, _ = _inputs(arch, seed=1)
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kw)
        # cache_implementation unset: transformers 4.45 warns that gemma2's has no effect uncached with a
        # malformed log call, which pytest's log capture raises
        uncached = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, cache_implementation=None, **kw
        )
    assert cached.shape[1] >= 6
    assert torch.equal(cached, uncached)

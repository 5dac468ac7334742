"""Tiny random models and PEFT adapters made offline, for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from lag_triton.kernels import backend_unavailable_reason
from lag_triton.library import build as _build_module

VOCAB = 97

#: why the Triton backend cannot run here (None where it can: a GPU, or its interpreter on CPU);
#: e.g. an installed Triton older than the kernels need, which refuses ``lag_triton.kernels.triton``
TRITON_UNAVAILABLE = backend_unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
#: for tests that import the Triton backend's modules themselves
needs_triton = pytest.mark.skipif(
    TRITON_UNAVAILABLE is not None, reason=f"the Triton backend is unavailable here: {TRITON_UNAVAILABLE}"
)

# Llama and Qwen2 take the same sizes (a Llama-style decoder with grouped-query attention).
_DECODER_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# Other families (tests/test_architectures.py): head_dim 16, as some rotary variants need; token
# ids inside the tiny vocabulary. Arguments a config does not know are kept as attributes, unused.
_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)
_WIDER = dict(_DECODER_SIZES, hidden_size=64, intermediate_size=96, head_dim=16, **_IDS)
_GPT2_SIZES = dict(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, decoder_start_token_id=0, **_IDS)

# name: (model class, config class, config arguments), looked up in transformers when a model is
# built, so that a family this transformers lacks skips its tests instead of failing the import.
ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", _DECODER_SIZES),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _DECODER_SIZES),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", _GPT2_SIZES),
    "mistral": ("MistralForCausalLM", "MistralConfig", _WIDER),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", _WIDER),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", _WIDER),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", _WIDER),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", _WIDER),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", _WIDER),
    "qwen3_moe": (
        "Qwen3MoeForCausalLM",
        "Qwen3MoeConfig",
        dict(_WIDER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(_WIDER, num_local_experts=4)),
    "gpt_oss": (  # experts transposed ([E, in, out]), with biases and an interleaved, clamped gate
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(_WIDER, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
    ),
    "glm4_moe": (  # a router taking its logits in fp32 (F.linear(x.float(), weight.float())), shared experts
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        dict(
            _WIDER,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=0,
            n_group=1,
            topk_group=1,
        ),
    ),
    "minimax_m2": (  # a router taking the expert-score bias as a second argument
        "MiniMaxM2ForCausalLM",
        "MiniMaxM2Config",
        dict(_WIDER, num_local_experts=4, num_experts_per_tok=2, rotary_dim=16, layer_types=["full_attention"] * 2),
    ),
    "ernie4_5_vl_text": (  # runs its text and vision experts each on its own tokens (moe_mm_token_type_ids)
        "Ernie4_5_VLMoeTextModel",
        "Ernie4_5_VLMoeTextConfig",
        dict(
            _WIDER,
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=[32, 32],
            moe_num_shared_experts=0,
            mlp_layer_types=["sparse"] * 2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
        ),
    ),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _WIDER),
    "falcon": ("FalconForCausalLM", "FalconConfig", {k: v for k, v in _WIDER.items() if k != "head_dim"}),  # derived
    "opt": ("OPTForCausalLM", "OPTConfig", dict(_WIDER, ffn_dim=96, word_embed_proj_dim=64)),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(_WIDER, n_layer=2, n_head=4)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(_SEQ2SEQ, d_kv=16, d_ff=96, num_layers=2, num_heads=4)),
    "bart": (
        "BartForConditionalGeneration",
        "BartConfig",
        dict(
            _SEQ2SEQ,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=96,
            decoder_ffn_dim=96,
            max_position_embeddings=128,
        ),
    ),
}
SEQ2SEQ = {"t5", "bart"}  # encoder-decoder: a forward takes decoder_input_ids too
# Default LoRA targets; families not named take PEFT's "all-linear".
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer randomly initialised model of family ``arch`` (skips the test where this
    transformers has no such family)."""
    model_class, config_class, sizes = ARCHS[arch]
    missing = [name for name in (model_class, config_class) if not hasattr(transformers, name)]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {', '.join(missing)}")
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**sizes)).to(dtype).eval()


def make_adapter(
    model, path: Path, *, seed: int, arch: str = "llama", r: int = 4, alpha: float = 8.0, targets=None, **lora_kwargs
) -> Path:
    """Save a PEFT LoRA adapter for ``model`` with random (non-zero) A and B."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or TARGETS.get(arch, "all-linear"),
        init_lora_weights=False,
        fan_in_fan_out=(arch == "gpt2"),
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(path))
    peft_model.unload()  # removes the LoRA layers, leaving the base model as it was
    return path


def from_peft(name: str, module: str = "peft"):
    """``module.name`` of the installed PEFT, or skip the test naming what this PEFT lacks (a test
    of an adapter type or router that a PEFT release between the floor and CI's brought)."""
    import importlib

    import peft

    found = getattr(importlib.import_module(module), name, None)
    if found is None:
        pytest.skip(f"PEFT {peft.__version__} has no {module}.{name}")
    return found


def peft_logits(model, adapter: Path, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """Logits of PEFT's own LoRA forward of ``adapter`` on ``model`` (model left unchanged)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        out = peft_model(input_ids=input_ids, **inputs).logits
    peft_model.unload()
    return out


def peft_arrow_logits(
    model, library, task_paths, input_ids: torch.Tensor, *, top_k: int, temperature: float, general_paths=None
) -> torch.Tensor:
    """Logits of PEFT's Arrow (``create_arrow_model``; GKS when ``general_paths`` are given) over
    ``task_paths`` with every prototype set to ``library``'s (model left unchanged). PEFT finds a
    prototype by 15 power iterations from a random start, which stop short where the top two
    singular values are close; asserted here: run to convergence on PEFT's own factors (after its
    GKS), its method finds the library's prototypes."""
    ArrowConfig, create_arrow_model = from_peft("ArrowConfig"), from_peft("create_arrow_model")
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=general_paths is not None)
    extra = {} if general_paths is None else {"general_adapter_paths": [str(p) for p in general_paths]}
    peft_model = create_arrow_model(model, [str(p) for p in task_paths], config, **extra)
    with torch.no_grad():
        peft_model(input_ids=input_ids)  # PEFT subtracts the general mean and builds its prototypes
    routed = 0
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_arrow"):
            arrow = module.lora_arrow["arrow_router"]
            ours = library.modules[name.removeprefix("base_model.model.")]
            exact = ours.prototypes[torch.argsort(ours.adapter_ids)].to(arrow.prototypes.dtype)  # adapter order
            converged = torch.stack(
                [
                    arrow.top_right_singular_vec_from_BA(module.lora_A[n].weight, module.lora_B[n].weight, iters=500)
                    for n in arrow.task_adapter_names
                ]
            )
            assert torch.nn.functional.cosine_similarity(converged, exact.float()).abs().min() > 1 - 1e-5, name
            arrow.prototypes.copy_(exact)
            routed += 1
    assert routed == len(library.modules)
    with torch.no_grad():
        out = peft_model(input_ids=input_ids).logits
    peft_model.unload()
    return out


# -- raw safetensors files, for tests that damage them on purpose ------------------------------------
def read_raw(path: Path) -> tuple[dict, bytes]:
    """(header JSON object, data bytes) of a safetensors file."""
    import json
    import struct

    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header, data: bytes, *, header_bytes: bytes | None = None) -> Path:
    """Write a safetensors-shaped file from a header (any JSON value) and data, unchecked."""
    import json
    import struct

    raw = json.dumps(header).encode() if header_bytes is None else header_bytes
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return Path(path)


def library_info(header: dict) -> dict:
    """The parsed ``library`` metadata JSON of a library file's header."""
    import json

    return json.loads(header["__metadata__"]["library"])


def set_library_info(header: dict, info) -> dict:
    import json

    header["__metadata__"]["library"] = json.dumps(info)
    return header


def replace_tensor(header: dict, data: bytes, name: str, raw: bytes, **entry) -> tuple[dict, bytes]:
    """Give tensor ``name`` new bytes (and entry fields such as dtype/shape), laying the data out
    again so that the tensors still tile it, as the format requires."""
    chunks, position = [], 0
    for key in sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]):
        e = header[key]
        chunk = raw if key == name else data[e["data_offsets"][0] : e["data_offsets"][1]]
        if key == name:
            e.update(entry)
        e["data_offsets"] = [position, position + len(chunk)]
        chunks.append(chunk)
        position += len(chunk)
    return header, b"".join(chunks)


# -- quantised base layers (issue 15): a stand-in that always runs, and the real libraries ----------------
class QuantLinear(torch.nn.Module):
    """Stand-in for a GPTQ/AWQ-style layer: integer weights, float scales, a dequantising forward.

    ``bits=8``: int8 weight [d_out, d_in] (the logical shape, but not a float), one scale per
    output. ``bits=4``: values 0..15 (zero point 8) packed eight to an int32 along d_in, as GPTQ
    stores ``qweight`` [d_in / 8, d_out], one scale per group of ``group_size`` inputs and output.
    The forward dequantises in float32 and multiplies in ``compute_dtype`` when it is set (as
    bitsandbytes' Linear4bit does), else in the input's dtype; it returns the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int = 16,
        scale_dtype: torch.dtype = torch.float16,
        bias: bool = True,
        compute_dtype=None,
    ):
        super().__init__()
        if bits not in (4, 8) or in_features % (8 if bits == 4 else 1) or in_features % group_size:
            raise ValueError(f"QuantLinear: bits={bits}, in_features={in_features}, group_size={group_size}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.compute_dtype = compute_dtype
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype))
        else:
            self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
            self.register_buffer("scales", torch.ones(in_features // group_size, out_features, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=scale_dtype) if bias else None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, **kwargs) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        w = linear.weight.detach().float()  # [d_out, d_in]
        if q.bits == 8:
            scale = (w.abs().amax(1) / 127).clamp_min(1e-8).to(q.scales.dtype)
            q.qweight.copy_(torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
            q.scales.copy_(scale)
        else:
            groups = w.t().reshape(-1, q.group_size, q.out_features)  # [d_in / g, g, d_out]
            scale = (groups.abs().amax(1) / 7).clamp_min(1e-8).to(q.scales.dtype)
            values = (torch.round(groups / scale.float()[:, None]).clamp(-8, 7) + 8).to(torch.int64)
            words = values.reshape(-1, 8, q.out_features) << (4 * torch.arange(8))[None, :, None]
            packed = words.sum(1)  # < 2**32: wrap into int32 as the packed word's bits
            q.qweight.copy_(torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32))
            q.scales.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [d_out, d_in]."""
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        shifts = (4 * torch.arange(8, device=self.qweight.device))[None, :, None]
        values = ((self.qweight[:, None, :] >> shifts) & 15).reshape(self.in_features, self.out_features)
        scales = self.scales.float().repeat_interleave(self.group_size, 0)
        return ((values.float() - 8) * scales).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.dequantize().to(dtype), bias).to(x.dtype)


def quantize_linears(model, kind: str, targets, *, compute_dtype=None):
    """Replace every nn.Linear of ``model`` whose last name part is in ``targets`` by a quantised
    layer of ``kind``, in place; returns {name: new module}. Kinds: ``standin-int8`` /
    ``standin-int4`` (:class:`QuantLinear`), ``torchao-int8wo`` (torchao int8 weight-only),
    ``bnb-int8`` (bitsandbytes Linear8bitLt), ``bnb-nf4`` (bitsandbytes Linear4bit, NF4).
    torchao and bitsandbytes are imported only for their kinds."""
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in targets]
    if kind == "torchao-int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
        return {n: model.get_submodule(n) for n in names}
    out = {}
    for name in names:
        linear = model.get_submodule(name)
        if kind.startswith("standin-"):
            new = QuantLinear.from_linear(linear, bits=int(kind[-1]), compute_dtype=compute_dtype)
        elif kind == "bnb-int8":
            import bitsandbytes as bnb

            new = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False
            )
            new.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        elif kind == "bnb-nf4":
            import bitsandbytes as bnb

            new = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
            )
            new.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4")
        else:
            raise ValueError(f"unknown quantisation kind {kind!r}")
        if kind.startswith("bnb-"):
            if linear.bias is not None:
                new.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            new = new.to(linear.weight.device)  # bitsandbytes quantises when the weight is moved
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        out[name] = new
    return out


def available_backends(device) -> list[str]:
    """The kernel backends (of torch, triton, cuda) that can run on ``device`` here. On a machine
    without a GPU "cuda" is one of them when its kernels can run under the CUDA emulator
    (tests/emulated_cuda.py): a test that takes it calls ``emulated_cuda.install_backend`` first."""
    from emulated_cuda import emulated, unavailable_reason

    from lag_triton.kernels import resolve_backend

    names = []
    for name in ("torch", "triton", "cuda"):
        try:
            resolve_backend(name, device)
            names.append(name)
        except RuntimeError:
            if emulated(name, device) and not torch.cuda.is_available() and unavailable_reason() is None:
                names.append(name)
    return names


def tiny_library(
    folder: Path, n: int, *, prefix: str = "a", seed: int = 0, ranks=(2, 3, 4), arch: str = "llama", **adapter_kwargs
):
    """A Library of ``n`` random PEFT adapters ``<prefix>0``.. (mixed ranks) for ``tiny_model(arch)``."""
    from lag_triton import Library

    model = tiny_model(arch)
    paths = [
        make_adapter(
            model, folder / f"{prefix}{i}", seed=seed + i, arch=arch, r=ranks[i % len(ranks)], **adapter_kwargs
        )
        for i in range(n)
    ]
    return Library.from_peft(paths, progress=False)


_ALIGN_AND_WRITE = _build_module.align_and_write  # the real one: a test may have replaced the attribute


def count_alignments(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Folder names of the adapters that builds, ``add`` and ``remove`` align from now on; with
    ``fail_after``, a KeyboardInterrupt (Ctrl-C) once that many were aligned."""
    aligned = []

    def counted(target, job, *general):
        if fail_after is not None and len(aligned) == fail_after:
            raise KeyboardInterrupt
        _ALIGN_AND_WRITE(target, job, *general)
        aligned.append(job[0].name)

    monkeypatch.setattr(_build_module, "align_and_write", counted)
    return aligned

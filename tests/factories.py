"""Tiny random models and PEFT adapters made offline, for tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97

ARCHS = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, max_position_embeddings=128)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                                                    num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=2, max_position_embeddings=128)),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=128,
                                                 bos_token_id=0, eos_token_id=0)),
}
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_fc", "c_proj"]}


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    cls, config = ARCHS[arch]
    torch.manual_seed(seed)
    return cls(config()).to(dtype).eval()


def make_adapter(model, path: Path, *, seed: int, arch: str = "llama", r: int = 4, alpha: float = 8.0,
                 targets=None, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for ``model`` with random (non-zero) A and B."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS[arch], init_lora_weights=False,
                        fan_in_fan_out=(arch == "gpt2"), **lora_kwargs)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(path))
    peft_model.unload()  # removes the LoRA layers, leaving the base model as it was
    return path


def peft_logits(model, adapter: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of PEFT's own LoRA forward of ``adapter`` on ``model`` (model left unchanged)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter))
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
    return json.loads(raw[8:8 + n]), raw[8 + n:]


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
        chunk = raw if key == name else data[e["data_offsets"][0]:e["data_offsets"][1]]
        if key == name:
            e.update(entry)
        e["data_offsets"] = [position, position + len(chunk)]
        chunks.append(chunk)
        position += len(chunk)
    return header, b"".join(chunks)

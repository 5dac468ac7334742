"""The tiny causal LM (Llama architecture, random init from a config) and its short pre-training."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 192


def build_model(vocab_size: int, size: ModelSize, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama built from a config (no download); fp32, eval mode."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model.eval()


def pad_batch(seqs: list[tuple[int, ...]], pad: int = 0) -> torch.Tensor:
    """Right-pad token sequences into [B, L]. With a causal mask, real tokens never see the pads."""
    length = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad] * (length - len(s)) for s in seqs], dtype=torch.long)


def pretrain(
    model: LlamaForCausalLM,
    corpus: list[tuple[int, ...]],
    steps: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    device: str = "cpu",
    log=None,
) -> list[float]:
    """Full-parameter next-token training on the pre-training corpus (loss on every real token)."""
    model.to(device).train()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # steps = 0 (the ablation's "not pre-trained" base) skips the loop; OneCycleLR refuses 0 steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    losses = []
    for step in range(steps):
        batch = pad_batch(rng.sample(corpus, min(batch_size, len(corpus)))).to(device)
        labels = batch.masked_fill(batch == 0, -100)
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, steps // 4) == 0:
            log(f"  pre-train step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses

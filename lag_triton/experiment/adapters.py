"""Knowledge LoRAs, one per document, trained all at once and written out in PEFT format.

As in the paper: LoRA on the MLP projections (gate_proj, up_proj, down_proj), rank 6, alpha 12,
trained on the document's facts. To train N adapters in the time of one, every target Linear is
wrapped by :class:`GroupedLoRALinear`, which holds all N adapters stacked ([N, r, d_in],
[N, d_out, r]) and applies adapter i to the i-th block of the batch (the batch is document-major
with the same number of sequences per document). The math per sequence is exactly PEFT's LoRA
forward ``W x + (alpha / r) * B (A x)``; initialisation follows PEFT's default (A Kaiming-uniform,
B zero). Each adapter is then saved as ``adapter_config.json`` + ``adapter_model.safetensors``
under PEFT's key names, and :func:`check_peft_folders` loads them back with PEFT.
"""

from __future__ import annotations

import math
import os
import random
import warnings

import torch
from safetensors.torch import save_file
from torch import nn

from .model import pad_batch

TARGETS = ("gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 6, 12


class GroupedLoRALinear(nn.Module):
    def __init__(
        self, base: nn.Linear, n: int, r: int, alpha: float, generator: torch.Generator, a_init_scale: float = 1.0
    ):
        super().__init__()
        self.base, self.n, self.scaling = base, n, alpha / r
        a = torch.empty(n, r, base.in_features)
        for i in range(n):  # PEFT's default: kaiming_uniform_(a=sqrt(5)) on A, zeros on B
            bound = 1.0 / math.sqrt(base.in_features)  # = gain * sqrt(3 / fan_in) with a = sqrt(5)
            a[i].uniform_(-bound, bound, generator=generator)
        a *= a_init_scale
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n, base.out_features, r, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        xg = x.reshape(self.n, (b // self.n) * length, d)
        delta = torch.einsum("ntr,nor->nto", torch.einsum("ntd,nrd->ntr", xg, self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * delta.reshape(b, length, -1)


def _wrap(model, n: int, seed: int, a_init_scale: float = 1.0) -> dict[str, GroupedLoRALinear]:
    gen = torch.Generator().manual_seed(seed)
    wrapped = {}
    for li, layer in enumerate(model.model.layers):
        for t in TARGETS:
            mod = GroupedLoRALinear(getattr(layer.mlp, t), n, RANK, ALPHA, gen, a_init_scale)
            setattr(layer.mlp, t, mod)
            wrapped[f"model.layers.{li}.mlp.{t}"] = mod
    return wrapped


def _unwrap(model, wrapped: dict[str, GroupedLoRALinear]) -> None:
    for li, layer in enumerate(model.model.layers):
        for t in TARGETS:
            setattr(layer.mlp, t, wrapped[f"model.layers.{li}.mlp.{t}"].base)


ADAPTER_TEXTS = ("document", "answers")


def _qa_batch(per_doc: list[list], device: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Document-major batch of each document's text: input ids and labels.

    ``text="document"``: the loss is on every token after <bos> (the adapter learns its
    document's text, entity names included, as a language model would); ``"answers"``: only on
    the value tokens (-100 elsewhere).
    """
    seqs, labels = [], []
    for qs in per_doc:
        for q in qs:
            seqs.append(q.prompt + q.answer)
            if text == "document":
                labels.append((-100,) + q.prompt[1:] + q.answer)
            else:
                labels.append((-100,) * len(q.prompt) + q.answer)
    ids = pad_batch(seqs)
    lab = pad_batch(labels, pad=-100)
    return ids.to(device), lab.to(device)


def _loss(model, ids: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """Sum over adapters of each adapter's own mean token loss (so N adapters train as N runs)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    tgt = labels[:, 1:]
    tok_loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="none"
    ).view(n, -1)
    mask = (tgt != -100).view(n, -1).float()
    return ((tok_loss * mask).sum(1) / mask.sum(1)).sum()


def train_adapters(
    model,
    per_doc_questions: list[list],
    steps: int,
    seed: int,
    lr: float = 1e-2,
    lr_a_ratio: float = 1.0,
    text: str = "answers",
    weight_decay: float = 0.0,
    a_init_scale: float = 1.0,
    batch_per_doc: int = 0,
    device: str = "cpu",
    log=None,
):
    """Train one LoRA per document (all N at once), full batch unless ``batch_per_doc`` > 0.

    ``lr`` is B's learning rate and ``lr * lr_a_ratio`` A's (LoRA+ trains B faster than A; the
    ablation measures what that does to routing). ``text`` says what the loss sees (see
    :func:`_qa_batch`). Returns ({module path: (A [N,r,in], B [N,out,r])}, info). The base model
    is left unchanged.
    """
    if text not in ADAPTER_TEXTS:
        raise ValueError(f"text must be one of {ADAPTER_TEXTS}, got {text!r}")
    n = len(per_doc_questions)
    sizes = {len(q) for q in per_doc_questions}
    assert len(sizes) == 1, "every document must have the same number of questions"
    wrapped = _wrap(model, n, seed, a_init_scale)
    init_a = {name: m.lora_A.detach().clone() for name, m in wrapped.items()}
    groups = [
        {"params": [m.lora_A for m in wrapped.values()], "lr": lr * lr_a_ratio},
        {"params": [m.lora_B for m in wrapped.values()], "lr": lr},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    full = batch_per_doc <= 0 or batch_per_doc >= sizes.pop()
    if full:
        ids, labels = _qa_batch(per_doc_questions, device, text)
    try:
        for step in range(steps):
            if not full:
                ids, labels = _qa_batch([rng.sample(qs, batch_per_doc) for qs in per_doc_questions], device, text)
            loss = _loss(model, ids, labels, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None and (step + 1) % max(1, steps // 4) == 0:
                log(f"  adapters step {step + 1}/{steps}: mean loss {float(loss.detach()) / n:.4f}")
    finally:
        _unwrap(model, wrapped)
    weights = {name: (m.lora_A.detach().cpu().clone(), m.lora_B.detach().cpu().clone()) for name, m in wrapped.items()}
    info = {
        "final_loss_per_adapter": float(loss.detach()) / n if steps else float("nan"),
        # How much of A is still its random init (cosine, mean over adapters): near 1 means the
        # adapter's input subspace -- all that Arrow and SpectR can see -- is mostly noise.
        "a_cos_with_init": {
            name: float(nn.functional.cosine_similarity(weights[name][0].flatten(1), a0.cpu().flatten(1)).mean())
            for name, a0 in init_a.items()
        },
    }
    return weights, info


def peft_config():
    from peft import LoraConfig

    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=list(TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=True,
    )


def save_peft_folders(weights, out_dir: str, names: list[str]) -> list[str]:
    """Write adapter i as a PEFT folder ``out_dir/names[i]``; returns the folder paths."""
    config = peft_config()
    folders = []
    for i, name in enumerate(names):
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        config.save_pretrained(folder)
        state = {}
        for path, (a, b) in weights.items():
            state[f"base_model.model.{path}.lora_A.weight"] = a[i].contiguous()
            state[f"base_model.model.{path}.lora_B.weight"] = b[i].contiguous()
        save_file(state, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def load_peft_all(model, folders: list[str], names: list[str]):
    """One PeftModel holding every adapter (loaded by PEFT from the written folders)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        # PEFT 0.21 reads model.is_gradient_checkpointing, which transformers 5.25 deprecates: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:]):
        peft_model.load_adapter(folder, adapter_name=name)
    return peft_model.eval()


def check_peft_folders(peft_model, weights, names: list[str]) -> float:
    """Max |difference| between the weights PEFT loaded and those trained (must be 0)."""
    worst = 0.0
    for path, (a, b) in weights.items():
        mod = peft_model.base_model.model.get_submodule(path)
        for i, name in enumerate(names):
            worst = max(
                worst,
                float((mod.lora_A[name].weight.detach().cpu() - a[i]).abs().max()),
                float((mod.lora_B[name].weight.detach().cpu() - b[i]).abs().max()),
            )
            assert mod.scaling[name] == ALPHA / RANK
    return worst


def uniform_merge_(model, weights) -> None:
    """Add the uniform average of all N adapters, mean_i (alpha/r) B_i A_i, into the base weights (in place)."""
    with torch.no_grad():
        for path, (a, b) in weights.items():
            lin = model.get_submodule(path)
            delta = (ALPHA / RANK) * torch.einsum("nor,nrd->od", b.double(), a.double()) / a.shape[0]
            lin.weight += delta.to(lin.weight)

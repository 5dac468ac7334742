"""Scoring the experiment: exact match, routing accuracy from ``lag_triton.trace``, and cost.

Greedy decoding with exact match of all answer tokens equals a teacher-forced forward with every
answer token the argmax (if the first token is right, greedy continues on the gold prefix), so one
forward pass over question + answer scores a question and traces its routing; ``generate`` is
run on a sample to confirm it.
"""

from __future__ import annotations

import torch

from .model import pad_batch


class QuestionBatch:
    """Every question as one padded tensor, with the masks the metrics need."""

    def __init__(self, questions):
        self.ids = pad_batch([q.prompt + q.answer for q in questions])
        self.plen = torch.tensor([len(q.prompt) for q in questions])
        self.alen = torch.tensor([len(q.answer) for q in questions])
        self.gold = torch.tensor([q.doc for q in questions])
        self.template = torch.tensor([q.template for q in questions])
        pos = torch.arange(self.ids.shape[1])[None]
        # position t predicts token t+1: answer tokens are predicted at plen-1 .. plen+alen-2
        self.predicts_answer = (pos >= self.plen[:, None] - 1) & (pos < (self.plen + self.alen - 1)[:, None])
        self.question_tokens = (pos >= 1) & (pos < self.plen[:, None])  # every prompt token after <bos>
        self.answer_position = pos == (self.plen[:, None] - 1)  # the token that emits the answer

    def __len__(self) -> int:
        return self.ids.shape[0]


@torch.no_grad()
def exact_match(model, qb: QuestionBatch, batch: int, device: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-question greedy exact match (bool [Q], or [len(rows)]) via teacher-forced forwards."""
    ids, mask = (qb.ids, qb.predicts_answer) if rows is None else (qb.ids[rows], qb.predicts_answer[rows])
    ok = []
    for s in range(0, ids.shape[0], batch):
        x = ids[s : s + batch]
        pred = model(input_ids=x.to(device)).logits.argmax(-1).cpu()
        nxt = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)
        ok.append(((pred == nxt) | ~mask[s : s + batch]).all(1))
    return torch.cat(ok)


@torch.no_grad()
def generate_exact_match(model, questions, device: str) -> torch.Tensor:
    """Greedy ``model.generate`` on each question alone (no padding): bool [Q]."""
    out = []
    for q in questions:
        x = torch.tensor([q.prompt], device=device)
        gen = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=len(q.answer),
            do_sample=False,
            pad_token_id=0,
        )
        out.append(gen[0, len(q.prompt) :].cpu().tolist() == list(q.answer))
    return torch.tensor(out)


def _layer_of(module: str) -> int:
    return int(module.split(".")[2])  # model.layers.<i>.mlp.<proj>


def gold_library_index(lib, names: list[str], qb: QuestionBatch) -> torch.Tensor:
    """[Q]: each question's gold document (index into ``names``) as an index into ``lib.names``."""
    name_to_lib = {name: i for i, name in enumerate(lib.names)}
    return torch.tensor([name_to_lib[names[g]] for g in qb.gold.tolist()])


def gold_hits(selections: dict[str, torch.Tensor], qb: QuestionBatch, gold_lib: torch.Tensor) -> dict:
    """Per module, bool [Q, L]: the token's first choice (from ``lag_triton.trace``) is the gold adapter."""
    q, length = qb.ids.shape
    return {module: sel[:, 0].view(q, length) == gold_lib[:, None] for module, sel in selections.items()}


def routing_accuracy(selections: dict[str, torch.Tensor], qb: QuestionBatch, gold_lib: torch.Tensor) -> dict:
    """Share of tokens routed (top-1) to the gold adapter: per module, per layer, overall.

    ``gold_lib`` [Q]: the gold document's index in the library. "question tokens": every prompt
    token after <bos>; "answer position": the last prompt token (whose output is the first answer token).
    """
    per_module, per_module_ans = {}, {}
    for module, hit in gold_hits(selections, qb, gold_lib).items():
        per_module[module] = float(hit[qb.question_tokens].float().mean())
        per_module_ans[module] = float(hit[qb.answer_position].float().mean())
    layers = sorted({_layer_of(m) for m in per_module})

    def by_layer(d):
        return {
            f"layer{li}": sum(v for m, v in d.items() if _layer_of(m) == li) / sum(1 for m in d if _layer_of(m) == li)
            for li in layers
        }

    return {
        "question_tokens": sum(per_module.values()) / len(per_module),
        "answer_position": sum(per_module_ans.values()) / len(per_module_ans),
        "per_layer": by_layer(per_module),
        "per_layer_answer_position": by_layer(per_module_ans),
        "per_module": per_module,
        "per_module_answer_position": per_module_ans,
    }


def factors_read_per_token(lib, router: str, k: int | None = None) -> int:
    """Adapter-factor scalars one token reads, summed over the library's modules (docs/design.md §1).

    Arrow reads all N prototypes (N·d_in) and its winner's A* and B*; LAG reads the N prototypes,
    the k candidates' A* (k·r·d_in, the SpectR rerank) and the winner's B*; SpectR reads every A*
    (N·r·d_in) and the winner's B*. r is the library's r_max (padding included, as the kernels read it).
    """
    total = 0
    for w in lib.modules.values():
        n, r, d_in, d_out = w.num_adapters, w.rank, w.d_in, w.d_out
        if router == "arrow":
            total += n * d_in + r * d_in + r * d_out
        elif router == "lag":
            total += n * d_in + min(k, n) * r * d_in + r * d_out
        elif router == "spectr":
            total += n * r * d_in + r * d_out
        else:
            raise ValueError(f"unknown router {router!r}")
    return total

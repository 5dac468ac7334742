"""The LAG knowledge-library experiment in miniature (offline, seeded; minutes on CPU).

    python -m lag_triton.experiment.run --adapters 32 --seed 0 --out lag_demo_out

1. Synthetic documents (disjoint entities, facts asked in several phrasings) and a word-level
   tokenizer (data.py); a tiny Llama from a config, briefly pre-trained on other entities (model.py).
2. One knowledge LoRA per document (MLP projections, r=6, alpha=12), trained all at once and
   written as PEFT folders, which PEFT loads back (adapters.py).
3. ``lag_triton.Library.from_peft`` over those folders, then every question answered greedily by:
   no adapter, the uniform merge of all adapters, Arrow top-1, SpectR (k=N), LAG for several k,
   and the oracle (the gold document's adapter alone, through PEFT).
4. Exact match (EM), EM normalised by the oracle (the paper's Eq. 9: score / oracle * 100), and
   routing accuracy from ``lag_triton.trace``: the share of question tokens whose adapter is the
   gold document's, per layer and overall, plus at the answer position alone.

Greedy decoding with exact match of all answer tokens equals a teacher-forced forward with every
answer token the argmax (if the first token is right greedy continues on the gold prefix), so one
forward pass over question + answer scores a question and traces its routing; ``generate`` is
run on a sample to confirm it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from .adapters import (ALPHA, RANK, TARGETS, check_peft_folders, load_peft_all, save_peft_folders, train_adapters,
                       uniform_merge_)
from .data import TEMPLATES, make_data
from .model import ModelSize, build_model, pad_batch, pretrain


@dataclass
class ExperimentConfig:
    adapters: int = 32            # N documents = N knowledge adapters
    seed: int = 0
    device: str = "cpu"
    entities_per_doc: int = 3
    pretrain_entities: int = 96
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    pretrain_steps: int = 600
    adapter_steps: int = 100
    adapter_lr: float = 1e-2
    a_init_scale: float = 0.01    # 1.0 = PEFT's default LoRA init (see README / report for why not)
    ks: tuple[int, ...] = (1, 2, 5, 20)
    backend: str = "auto"
    eval_batch: int = 512
    generate_check: int = 64      # questions re-scored with model.generate (0 = skip)
    extra: dict = field(default_factory=dict)


def set_determinism(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------- evaluation


def _question_tensors(questions):
    ids = pad_batch([q.prompt + q.answer for q in questions])
    plen = torch.tensor([len(q.prompt) for q in questions])
    alen = torch.tensor([len(q.answer) for q in questions])
    gold = torch.tensor([q.doc for q in questions])
    return ids, plen, alen, gold


@torch.no_grad()
def exact_match(model, ids: torch.Tensor, plen: torch.Tensor, alen: torch.Tensor, batch: int, device: str):
    """Per-question greedy exact match (bool [Q]) via one teacher-forced forward per batch."""
    pos = torch.arange(ids.shape[1])
    # position t predicts token t+1: answer tokens are predicted at positions plen-1 .. plen+alen-2
    is_answer = (pos[None] >= plen[:, None] - 1) & (pos[None] < (plen + alen - 1)[:, None])
    ok = []
    for s in range(0, ids.shape[0], batch):
        x = ids[s:s + batch].to(device)
        pred = model(input_ids=x).logits.argmax(-1).cpu()
        nxt = torch.cat([ids[s:s + batch, 1:], torch.zeros_like(ids[s:s + batch, :1])], 1)
        ok.append(((pred == nxt) | ~is_answer[s:s + batch]).all(1))
    return torch.cat(ok)


@torch.no_grad()
def generate_exact_match(model, questions, device: str) -> torch.Tensor:
    """Greedy ``model.generate`` on each question alone (no padding): bool [Q]."""
    out = []
    for q in questions:
        x = torch.tensor([q.prompt], device=device)
        gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=len(q.answer),
                             do_sample=False, pad_token_id=0)
        out.append(gen[0, len(q.prompt):].cpu().tolist() == list(q.answer))
    return torch.tensor(out)


def routing_accuracy(selections: dict[str, torch.Tensor], ids, plen, alen, gold, lib_names, names):
    """Share of tokens routed (top-1) to the gold adapter: per module, per layer, overall.

    "question" tokens: every prompt token after <bos>; "answer position": the last prompt token
    (whose output is the first answer token).
    """
    q, length = ids.shape
    pos = torch.arange(length)
    question = (pos[None] >= 1) & (pos[None] < plen[:, None])
    answer_pos = pos[None] == (plen[:, None] - 1)
    # gold adapter index in library order
    name_to_lib = {n: i for i, n in enumerate(lib_names)}
    gold_lib = torch.tensor([name_to_lib[names[g]] for g in gold.tolist()])[:, None]
    per_module, per_module_ans = {}, {}
    for module, sel in selections.items():
        top1 = sel[:, 0].view(q, length)
        hit = top1 == gold_lib
        per_module[module] = float(hit[question].float().mean())
        per_module_ans[module] = float(hit[answer_pos].float().mean())
    layers = sorted({int(m.split(".")[2]) for m in per_module})

    def by_layer(d):
        return {f"layer{li}": sum(v for m, v in d.items() if int(m.split(".")[2]) == li)
                / sum(1 for m in d if int(m.split(".")[2]) == li) for li in layers}

    return {
        "question_tokens": sum(per_module.values()) / len(per_module),
        "answer_position": sum(per_module_ans.values()) / len(per_module_ans),
        "per_layer": by_layer(per_module),
        "per_layer_answer_position": by_layer(per_module_ans),
        "per_module": per_module,
    }


def run_experiment(cfg: ExperimentConfig, out_dir: str | None = None, adapters_dir: str | None = None,
                   log=print) -> dict:
    import lag_triton

    t_start = time.perf_counter()
    timings = {}
    set_determinism(cfg.seed)
    dev = cfg.device
    n = cfg.adapters

    # 1. data + base model
    data = make_data(n, cfg.entities_per_doc, cfg.pretrain_entities, seed=cfg.seed)
    names = [f"doc{i:04d}" for i in range(n)]
    log(f"[data] {n} documents x {cfg.entities_per_doc} entities x 4 relations x {len(TEMPLATES)} phrasings = "
        f"{len(data.questions)} questions; vocab {len(data.tokenizer)}; pre-training corpus {len(data.pretrain)}")
    size = ModelSize(cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate)
    model = build_model(len(data.tokenizer), size, cfg.seed).to(dev)
    t = time.perf_counter()
    pre_losses = pretrain(model, data.pretrain, cfg.pretrain_steps, cfg.seed, device=dev, log=log)
    timings["pretrain_s"] = time.perf_counter() - t

    # 2. knowledge adapters, written as PEFT folders
    t = time.perf_counter()
    weights, train_info = train_adapters(model, data.by_doc(), cfg.adapter_steps, cfg.seed, lr=cfg.adapter_lr,
                                         a_init_scale=cfg.a_init_scale, device=dev, log=log)
    timings["adapters_train_s"] = time.perf_counter() - t
    tmp = None
    if adapters_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lag_adapters_")
        adapters_dir = tmp.name
    folders = save_peft_folders(weights, adapters_dir, names)

    # 3. the library
    t = time.perf_counter()
    lib = lag_triton.Library.from_peft(folders, names=names, progress=False)
    timings["library_build_s"] = time.perf_counter() - t
    log(f"[library] {len(lib.names)} adapters, {len(lib.modules)} modules")

    ids, plen, alen, gold = _question_tensors(data.questions)
    tmpl = torch.tensor([q.template for q in data.questions])
    rows: dict[str, dict] = {}
    traces: dict[str, dict[str, torch.Tensor]] = {}

    def record(name, em, routing=None):
        rows[name] = {"exact_match": float(em.float().mean()),
                      "per_phrasing": [float(em[tmpl == i].float().mean()) for i in range(len(TEMPLATES))]}
        if routing is not None:
            rows[name]["routing"] = routing
        msg = f"  {name:<12} EM {rows[name]['exact_match']:.3f}"
        if routing is not None:
            msg += f"  routing: question tokens {routing['question_tokens']:.3f}, answer pos {routing['answer_position']:.3f}"
        log(msg)

    t = time.perf_counter()
    log("[eval]")
    record("no adapter", exact_match(model, ids, plen, alen, cfg.eval_batch, dev))

    merged = copy.deepcopy(model)
    uniform_merge_(merged, {k: (a.to(dev), b.to(dev)) for k, (a, b) in weights.items()})
    record("uniform merge", exact_match(merged, ids, plen, alen, cfg.eval_batch, dev))
    del merged

    # oracle: PEFT itself, the gold document's adapter on that document's questions
    peft_model = load_peft_all(copy.deepcopy(model), folders, names)
    peft_weight_diff = check_peft_folders(peft_model, weights, names)
    oracle = torch.zeros(len(data.questions), dtype=torch.bool)
    for i, name in enumerate(names):
        peft_model.set_adapter(name)
        m = gold == i
        oracle[m] = exact_match(peft_model, ids[m], plen[m], alen[m], cfg.eval_batch, dev)
    record("oracle", oracle)

    routers = [("arrow top-1", dict(router="arrow", top_m=1)), ("spectr k=N", dict(router="spectr"))]
    ks = sorted({min(k, n) for k in cfg.ks} | {n})  # k = N always: LAG's SpectR limit, checked below
    routers += [(f"lag k={k}", dict(router="lag", k=k)) for k in ks]
    gen_check = {}
    for name, kw in routers:
        lag_triton.patch(model, lib, backend=cfg.backend, **kw)
        try:
            with lag_triton.trace(model) as tr:
                em = exact_match(model, ids, plen, alen, cfg.eval_batch, dev)
            if name == "lag k=5" and cfg.generate_check:
                sample = random.Random(cfg.seed).sample(range(len(data.questions)), cfg.generate_check)
                g = generate_exact_match(model, [data.questions[i] for i in sample], dev)
                gen_check = {"method": name, "questions": len(sample),
                             "agree_with_teacher_forced": int((g == em[sample]).sum())}
        finally:
            lag_triton.unpatch(model)
        traces[name] = tr.selections
        record(name, em, routing_accuracy(tr.selections, ids, plen, alen, gold, lib.names, names))
    timings["eval_s"] = time.perf_counter() - t

    # construction checks: LAG k=N is SpectR, LAG k=1 is Arrow top-1 (same selections everywhere)
    def same(a, b):
        return all(torch.equal(traces[a][m], traces[b][m]) for m in traces[a])

    checks = {"peft_loaded_weights_max_abs_diff": peft_weight_diff}
    if "lag k=1" in traces:
        checks["lag_k1_selects_as_arrow_top1"] = same("lag k=1", "arrow top-1")
    lag_full = [r for r, kw in routers if kw.get("k", 0) >= n]
    if lag_full:
        checks["lag_kN_selects_as_spectr"] = same(lag_full[0], "spectr k=N")
    if gen_check:
        checks["generate_vs_teacher_forced"] = gen_check

    oracle_em = rows["oracle"]["exact_match"]
    for r in rows.values():
        r["normalised"] = 100.0 * r["exact_match"] / oracle_em if oracle_em > 0 else float("nan")

    diagnostics = {
        "adapter_final_loss": train_info["final_loss_per_adapter"],
        "a_cos_with_init": train_info["a_cos_with_init"],
        "prototype_abs_cos_mean": {m: _mean_offdiag_abs_cos(w.prototypes) for m, w in lib.modules.items()},
        "chance_routing": 1.0 / n,
        "pretrain_final_loss": pre_losses[-1] if pre_losses else None,
    }
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "adapter": {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
        "questions": len(data.questions), "phrasings": list(TEMPLATES),
        "rows": rows, "checks": checks, "diagnostics": diagnostics, "timings": timings,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    if tmp is not None:
        tmp.cleanup()
    if out_dir:
        write_outputs(result, out_dir, log=log)
    return result


def _mean_offdiag_abs_cos(p: torch.Tensor) -> float:
    p = torch.nn.functional.normalize(p.float(), dim=-1)
    c = (p @ p.T).abs()
    n = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / max(1, n * (n - 1)))


# --------------------------------------------------------------------------- reporting


def format_table(result: dict) -> str:
    rows = result["rows"]
    n = result["config"]["adapters"]
    lines = [f"| method (N={n}) | exact match | normalised (oracle=100) | routing acc. (question tokens) "
             "| routing acc. (answer position) |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ro = r.get("routing")
        ra = f"{100 * ro['question_tokens']:.1f}%" if ro else "-"
        rb = f"{100 * ro['answer_position']:.1f}%" if ro else "-"
        lines.append(f"| {name} | {100 * r['exact_match']:.1f}% | {r['normalised']:.1f} | {ra} | {rb} |")
    lines.append(f"\nchance routing = {100 * result['diagnostics']['chance_routing']:.1f}%")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    lag = sorted((int(k.split("=")[1]), r) for k, r in rows.items() if k.startswith("lag k="))
    ks = [k for k, _ in lag]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(ks, [r["normalised"] for _, r in lag], "o-", color="C0", label="LAG (Arrow top-k + SpectR)")
    for name, style in [("arrow top-1", ("C1", "--")), ("spectr k=N", ("C2", "-.")), ("uniform merge", ("C4", ":")),
                        ("no adapter", ("k", ":")), ("oracle", ("C3", "-"))]:
        if name in rows:
            ax1.axhline(rows[name]["normalised"], color=style[0], ls=style[1], label=name)
    ax1.set_xscale("log")
    ax1.set_xticks(ks, [str(k) for k in ks])
    ax1.set_xlabel("k (Arrow candidates)")
    ax1.set_ylabel("exact match, normalised (oracle = 100)")
    ax1.set_title("score vs k (cf. LAG paper Fig. 3)")
    ax1.legend(fontsize=7)
    ax2.plot(ks, [100 * r["routing"]["question_tokens"] for _, r in lag], "o-", color="C0", label="LAG, question tokens")
    ax2.plot(ks, [100 * r["routing"]["answer_position"] for _, r in lag], "s--", color="C0", label="LAG, answer position")
    for name, c in [("arrow top-1", "C1"), ("spectr k=N", "C2")]:
        ax2.axhline(100 * rows[name]["routing"]["question_tokens"], color=c, ls="--", label=f"{name}, question tokens")
    ax2.axhline(100 * result["diagnostics"]["chance_routing"], color="k", ls=":", label="chance")
    ax2.set_xscale("log")
    ax2.set_xticks(ks, [str(k) for k in ks])
    ax2.set_xlabel("k")
    ax2.set_ylabel("routed to the gold adapter (%)")
    ax2.set_title("routing accuracy")
    ax2.legend(fontsize=7)
    c = result["config"]
    fig.suptitle(f"LAG in miniature: N={c['adapters']} knowledge LoRAs, tiny Llama (d={c['hidden']}, "
                 f"{c['layers']} layers), seed {c['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str, stem: str = "lag_demo", log=print) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath, ppath = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".png")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, ppath)
    log(f"[out] {jpath}, {ppath}")
    return jpath, ppath


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ExperimentConfig()
    p.add_argument("--adapters", type=int, default=d.adapters, help="N documents / knowledge adapters")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default="lag_demo_out", help="folder for the JSON and PNG")
    p.add_argument("--ks", default=",".join(map(str, d.ks)), help="LAG k values, comma separated")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--adapter-steps", type=int, default=d.adapter_steps)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--a-init-scale", type=float, default=d.a_init_scale,
                   help="scale of LoRA A's Kaiming init (1.0 = PEFT default)")
    p.add_argument("--backend", default=d.backend)
    p.add_argument("--stem", default="lag_demo", help="file name stem of the JSON and PNG")
    p.add_argument("--keep-adapters", action="store_true", help="write the PEFT folders under OUT/adapters")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")


def config_from_args(args) -> ExperimentConfig:
    return ExperimentConfig(adapters=args.adapters, seed=args.seed, device=args.device,
                            ks=tuple(int(k) for k in str(args.ks).split(",")), pretrain_steps=args.pretrain_steps,
                            adapter_steps=args.adapter_steps, hidden=args.hidden, intermediate=3 * args.hidden,
                            layers=args.layers, a_init_scale=args.a_init_scale, backend=args.backend)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    cfg.extra["command"] = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "lag_triton.experiment.run"]
                                    + list(sys.argv[1:] if argv is None else argv))
    result = run_experiment(cfg, out_dir=None,
                            adapters_dir=os.path.join(args.out, "adapters") if args.keep_adapters else None)
    print(format_table(result))
    write_outputs(result, args.out, stem=args.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())

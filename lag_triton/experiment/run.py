"""The LAG knowledge-library experiment in miniature (offline, seeded; minutes on CPU).

    python -m lag_triton.experiment.run --adapters 32 --seed 0 --out lag_demo_out
    python -m lag_triton.experiment.run --seeds 3             # mean and sd over seeds 0, 1, 2
    python -m lag_triton.experiment.run --ablation            # the regime ablation (ablation.py)

1. Synthetic documents (disjoint entities, facts asked in several phrasings) and a word-level
   tokenizer (data.py); a tiny Llama from a config, briefly pre-trained on other entities (model.py).
2. One knowledge LoRA per document (MLP projections, r=6, alpha=12), trained on its document's
   text, all N at once, and written as PEFT folders, which PEFT loads back (adapters.py).
3. ``lag_triton.Library.from_peft`` over those folders, then every question answered greedily by:
   no adapter, the uniform merge of all adapters, Arrow top-1, SpectR (k=N), LAG for several k,
   and the oracle (the gold document's adapter alone, through PEFT). The routed methods go through
   ``lag_triton.patch``; ``lag_triton.trace`` says which adapter every token used.
4. Exact match (EM), EM normalised by the oracle (the paper's Eq. 9: score / oracle * 100),
   routing accuracy per layer and at the answer position, and the adapter factors each token
   reads (evaluate.py); tables and plot in report.py.
5. With ``--general-adapters G``, last (so the rows above are unchanged): Arrow, LAG k=5 and
   SpectR again over the library built with general knowledge subtraction, the mean of G general
   adapters trained on documents about pre-training entities (rows "... +GKS").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from .adapters import (
    ADAPTER_TEXTS,
    ALPHA,
    RANK,
    TARGETS,
    check_peft_folders,
    load_peft_all,
    save_peft_folders,
    train_adapters,
    uniform_merge_,
)
from .data import QUESTION_FORMS, VALUE_FORMS, general_documents, make_data
from .evaluate import (
    QuestionBatch,
    exact_match,
    factors_read_per_token,
    generate_exact_match,
    gold_library_index,
    routing_accuracy,
)
from .model import ModelSize, build_model, pretrain
from .report import GKS, format_table, summarise_seeds, write_outputs

__all__ = ["ExperimentConfig", "run_experiment", "run_seeds", "format_table", "write_outputs"]


@dataclass
class ExperimentConfig:
    adapters: int = 32  # N documents = N knowledge adapters
    seed: int = 0
    device: str = "cpu"
    entities_per_doc: int = 3
    pretrain_entities: int = 96
    mention_doc_entities: bool = False  # pre-training also asks the documents' entities' "age"
    question_form: str = "subject-last"
    value_form: str = "head-word"
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    pretrain_steps: int = 400
    adapter_steps: int = 80
    adapter_lr: float = 1e-2  # B's learning rate
    lr_a_ratio: float = 0.125  # A's learning rate = adapter_lr * lr_a_ratio
    adapter_text: str = "document"  # what the adapter's loss sees: "document" (every token) or "answers"
    a_init_scale: float = 0.01  # 1.0 = PEFT's default LoRA init (A Kaiming-uniform)
    ks: tuple[int, ...] = (1, 2, 5, 10, 20)
    backend: str = "auto"
    eval_batch: int = 512
    generate_check: int = 64  # questions re-scored with model.generate (0 = skip)
    check_limits: bool = True  # also run LAG k=N (must select exactly as SpectR)
    general_adapters: int = 0  # > 0: also route with general knowledge subtraction (GKS) over this many
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def determinism(seed: int) -> Iterator[None]:
    """Inside: Python's and torch's generators seeded, torch's deterministic algorithms on (warning
    where an op has none). After: the caller's deterministic-algorithms setting again (a library
    function must not leave the process slower and warning; the seeded generators stay as drawn)."""
    random.seed(seed)
    torch.manual_seed(seed)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# --------------------------------------------------------------------------- the pieces


def experiment_data(cfg: ExperimentConfig):
    """The documents and questions of ``cfg`` (no model: cheap)."""
    return make_data(
        cfg.adapters,
        cfg.entities_per_doc,
        cfg.pretrain_entities,
        seed=cfg.seed,
        mention_doc_entities=cfg.mention_doc_entities,
        question_form=cfg.question_form,
        value_form=cfg.value_form,
    )


def build_data_and_base(cfg: ExperimentConfig, log=print):
    """The documents, questions and pre-trained base model (fp32, frozen)."""
    data = experiment_data(cfg)
    log(
        f"[data] {cfg.adapters} documents x {cfg.entities_per_doc} entities x 4 relations x "
        f"{len(data.templates)} phrasings ({cfg.question_form}, {cfg.value_form} values) = {len(data.questions)} "
        f"questions; vocab {len(data.tokenizer)}; pre-training corpus {len(data.pretrain)}"
    )
    size = ModelSize(cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate)
    model = build_model(len(data.tokenizer), size, cfg.seed).to(cfg.device)
    losses = pretrain(model, data.pretrain, cfg.pretrain_steps, cfg.seed, device=cfg.device, log=log)
    return data, model, losses


def build_library(cfg: ExperimentConfig, model, data, adapters_dir: str | None, log=print):
    """Train the knowledge adapters, write them as PEFT folders, build the library from them."""
    import lag_triton

    weights, info = train_adapters(
        model,
        data.by_doc(),
        cfg.adapter_steps,
        cfg.seed,
        lr=cfg.adapter_lr,
        lr_a_ratio=cfg.lr_a_ratio,
        text=cfg.adapter_text,
        a_init_scale=cfg.a_init_scale,
        device=cfg.device,
        log=log,
    )
    names = [f"doc{i:04d}" for i in range(cfg.adapters)]
    folders = save_peft_folders(weights, adapters_dir, names)
    lib = lag_triton.Library.from_peft(folders, names=names, progress=False)
    log(f"[library] {len(lib.names)} adapters, {len(lib.modules)} modules")
    return weights, info, names, folders, lib


def routed_methods(cfg: ExperimentConfig) -> list[tuple[str, dict]]:
    """(row name, lag_triton.patch kwargs): Arrow top-1, SpectR, LAG at every k (k = N always)."""
    n = cfg.adapters
    ks = {min(k, n) for k in cfg.ks}
    ks = sorted(ks | {n} if cfg.check_limits else ks)  # k = N: LAG's SpectR limit, checked below
    return [("arrow top-1", dict(router="arrow", top_m=1)), ("spectr k=N", dict(router="spectr"))] + [
        (f"lag k={k}", dict(router="lag", k=k)) for k in ks
    ]


def lag5_row(adapters: int) -> str:
    """The name of the LAG k=5 row (k is capped at N, as in :func:`routed_methods`: "lag k=3" for N=3)."""
    return f"lag k={min(5, adapters)}"


def gks_methods(cfg: ExperimentConfig) -> list[tuple[str, dict]]:
    """The routed methods also run on the GKS library: Arrow top-1, LAG k=5, SpectR."""
    keep = {"arrow top-1", lag5_row(cfg.adapters), "spectr k=N"}
    return [(name + GKS, kw) for name, kw in routed_methods(cfg) if name in keep]


def build_gks_library(cfg: ExperimentConfig, model, data, folders, names, adapters_dir: str, log=print):
    """General knowledge subtraction, as PEFT's Arrow does it (``use_gks``): ``general_adapters``
    adapters trained like the knowledge adapters (same steps, rates and text) on documents about
    pre-training entities (:func:`.data.general_documents`); the library of the same knowledge
    adapters with their mean factors subtracted (:mod:`lag_triton.library.general`)."""
    import lag_triton

    docs = general_documents(data, cfg.general_adapters, cfg.entities_per_doc)
    weights, info = train_adapters(
        model,
        docs,
        cfg.adapter_steps,
        cfg.seed + 7919,  # not the knowledge adapters' seed: their A inits would be drawn again
        lr=cfg.adapter_lr,
        lr_a_ratio=cfg.lr_a_ratio,
        text=cfg.adapter_text,
        a_init_scale=cfg.a_init_scale,
        device=cfg.device,
    )
    general = save_peft_folders(weights, adapters_dir, [f"general{i:02d}" for i in range(len(docs))])
    lib = lag_triton.Library.from_peft(folders, names=names, progress=False, general_adapters=general)
    log(f"[gks] {len(docs)} general adapters (final loss {info['final_loss_per_adapter']:.4f}); their mean subtracted")
    return lib


def _cost(lib, kw: dict) -> int:
    return factors_read_per_token(lib, kw["router"], kw.get("k"))


# --------------------------------------------------------------------------- the experiment


class _Rows:
    """The result rows: exact match overall and per phrasing, routing and cost for routed methods."""

    def __init__(self, qb: QuestionBatch, phrasings: int, log):
        self.qb, self.phrasings, self.log = qb, phrasings, log
        self.rows: dict[str, dict] = {}

    def record(self, name: str, em: torch.Tensor, routing: dict | None = None, cost: int | None = None) -> None:
        qb = self.qb
        row = self.rows[name] = {
            "exact_match": float(em.float().mean()),
            "per_phrasing": [float(em[qb.template == i].float().mean()) for i in range(self.phrasings)],
        }
        msg = f"  {name:<13} EM {row['exact_match']:.3f}"
        if routing is not None:
            row["routing"], row["factors_per_token"] = routing, cost
            per_layer = ", ".join(f"{k} {v:.2f}" for k, v in routing["per_layer_answer_position"].items())
            msg += f"  routing at the answer position {routing['answer_position']:.3f} ({per_layer})"
        self.log(msg)

    def normalise(self) -> dict[str, dict]:
        """Each row's exact match / the oracle's x 100 (the paper's Eq. 9)."""
        oracle = self.rows["oracle"]["exact_match"]
        for row in self.rows.values():
            row["normalised"] = 100.0 * row["exact_match"] / oracle if oracle > 0 else float("nan")
        return self.rows


def evaluate_baselines(cfg: ExperimentConfig, model, weights, folders, names, qb: QuestionBatch, rows: _Rows) -> float:
    """No adapter, the uniform merge, and the oracle (PEFT itself, each document's own adapter on its
    questions). Returns the largest |weight| difference between PEFT's loaded folders and ``weights``."""
    dev, batch = cfg.device, cfg.eval_batch
    rows.record("no adapter", exact_match(model, qb, batch, dev))
    merged = copy.deepcopy(model)
    uniform_merge_(merged, {k: (a.to(dev), b.to(dev)) for k, (a, b) in weights.items()})
    rows.record("uniform merge", exact_match(merged, qb, batch, dev))
    del merged
    peft_model = load_peft_all(copy.deepcopy(model), folders, names)
    peft_weight_diff = check_peft_folders(peft_model, weights, names)
    oracle = torch.zeros(len(qb), dtype=torch.bool)
    for i, name in enumerate(names):
        peft_model.set_adapter(name)
        oracle[qb.gold == i] = exact_match(peft_model, qb, batch, dev, rows=qb.gold == i)
    rows.record("oracle", oracle)
    return peft_weight_diff


def evaluate_routed(
    cfg: ExperimentConfig, model, lib, data, qb: QuestionBatch, gold_lib: torch.Tensor, rows: _Rows, methods=None
):
    """Every routed method (default :func:`routed_methods`) through ``lag_triton.patch``, traced.
    Returns (per-method selections, and the ``model.generate`` re-check of LAG k=5 on a sample, {}
    when skipped)."""
    import lag_triton

    traces, gen_check = {}, {}
    for name, kw in routed_methods(cfg) if methods is None else methods:
        lag_triton.patch(model, lib, backend=cfg.backend, **kw)
        try:
            with lag_triton.trace(model) as tr:
                em = exact_match(model, qb, cfg.eval_batch, cfg.device)
            if name == "lag k=5" and cfg.generate_check:
                sample = random.Random(cfg.seed).sample(range(len(qb)), min(cfg.generate_check, len(qb)))
                agree = generate_exact_match(model, [data.questions[i] for i in sample], cfg.device) == em[sample]
                gen_check = {"method": name, "questions": len(sample), "agree_with_teacher_forced": int(agree.sum())}
        finally:
            lag_triton.unpatch(model)
        traces[name] = tr.selections
        rows.record(name, em, routing_accuracy(tr.selections, qb, gold_lib), _cost(lib, kw))
    return traces, gen_check


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | None = None,
    adapters_dir: str | None = None,
    log=print,
    stem: str = "lag_demo",
) -> dict:
    """The whole experiment for one seed; returns the result dict (and writes JSON + PNG to ``out_dir``)."""
    with determinism(cfg.seed):
        t_start = time.perf_counter()
        data, model, pre_losses = build_data_and_base(cfg, log)
        t_adapters = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lag_adapters_") as tmp:
            weights, train_info, names, folders, lib = build_library(cfg, model, data, adapters_dir or tmp, log)
            t_eval = time.perf_counter()
            log("[eval]")
            qb = QuestionBatch(data.questions)
            rows = _Rows(qb, len(data.templates), log)
            peft_weight_diff = evaluate_baselines(cfg, model, weights, folders, names, qb, rows)
            gold_lib = gold_library_index(lib, names, qb)
            traces, gen_check = evaluate_routed(cfg, model, lib, data, qb, gold_lib, rows)
            if cfg.general_adapters:  # last: the runs above are those of a run without it
                gks_lib = build_gks_library(cfg, model, data, folders, names, adapters_dir or tmp, log)
                evaluate_routed(
                    replace(cfg, generate_check=0), model, gks_lib, data, qb, gold_lib, rows, gks_methods(cfg)
                )
        t_end = time.perf_counter()
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "adapter": {"rank": RANK, "alpha": ALPHA, "targets": list(TARGETS)},
        "questions": len(data.questions),
        "phrasings": list(data.templates),
        "rows": rows.normalise(),
        "checks": _checks(traces, routed_methods(cfg), cfg.adapters, peft_weight_diff, gen_check),
        "diagnostics": _diagnostics(train_info, lib, cfg.adapters, pre_losses),
        "timings": {
            "pretrain_s": t_adapters - t_start,
            "adapters_s": t_eval - t_adapters,
            "eval_s": t_end - t_eval,
            "total_s": t_end - t_start,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **package_versions("transformers", "peft"),  # their numerics move the figures in the last digits
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    if out_dir:
        write_outputs(result, out_dir, stem=stem, log=log)
    return result


def package_versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _checks(traces, methods, n, peft_weight_diff, gen_check) -> dict:
    """Construction checks: LAG k=N is SpectR, LAG k=1 is Arrow top-1 (same selections everywhere)."""

    def same(a, b):
        return all(torch.equal(traces[a][m], traces[b][m]) for m in traces[a])

    checks = {"peft_loaded_weights_max_abs_diff": peft_weight_diff}
    if "lag k=1" in traces:
        checks["lag_k1_selects_as_arrow_top1"] = same("lag k=1", "arrow top-1")
    lag_full = [r for r, kw in methods if kw.get("k", 0) >= n]
    if lag_full:
        checks["lag_kN_selects_as_spectr"] = same(lag_full[0], "spectr k=N")
    if gen_check:
        checks["generate_vs_teacher_forced"] = gen_check
    return checks


def _diagnostics(train_info, lib, n, pre_losses) -> dict:
    return {
        "adapter_final_loss": train_info["final_loss_per_adapter"],
        "a_cos_with_init": train_info["a_cos_with_init"],
        "prototype_abs_cos_mean": {m: _mean_offdiag_abs_cos(w.prototypes) for m, w in lib.modules.items()},
        "chance_routing": 1.0 / n,
        "pretrain_final_loss": pre_losses[-1] if pre_losses else None,
    }


def _mean_offdiag_abs_cos(p: torch.Tensor) -> float:
    p = torch.nn.functional.normalize(p.float(), dim=-1)
    c = (p @ p.T).abs()
    n = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / max(1, n * (n - 1)))


def run_seeds(cfg: ExperimentConfig, seeds: int, log=print, adapters_dir: str | None = None, **kwargs) -> dict:
    """The experiment for seeds cfg.seed .. cfg.seed + seeds - 1; mean and sd of every number.
    Kept adapters go to one subfolder per seed of ``adapters_dir``."""
    runs = []
    for s in range(cfg.seed, cfg.seed + seeds):
        log(f"=== seed {s}")
        seed_dir = os.path.join(adapters_dir, f"seed{s}") if adapters_dir else None
        runs.append(run_experiment(replace(cfg, seed=s), log=log, adapters_dir=seed_dir, **kwargs))
    return summarise_seeds(runs)


def run_configured(cfg: ExperimentConfig, seeds: int = 1, **kwargs) -> dict:
    """One run's result, or (seeds > 1) the mean and sd over seeds (:func:`run_seeds`)."""
    return run_seeds(cfg, seeds, **kwargs) if seeds > 1 else run_experiment(cfg, **kwargs)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ExperimentConfig()
    p.add_argument("--adapters", type=int, default=d.adapters, help="N documents / knowledge adapters")
    p.add_argument("--seed", type=int, default=d.seed, help="first seed")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (>1: mean and sd over them)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default="lag_demo_out", help="folder for the JSON and PNG")
    p.add_argument("--ks", default=",".join(map(str, d.ks)), help="LAG k values, comma separated (k=N is always run)")
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps)
    p.add_argument("--adapter-steps", type=int, default=d.adapter_steps)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument(
        "--a-init-scale", type=float, default=d.a_init_scale, help="scale of LoRA A's Kaiming init (1.0 = PEFT default)"
    )
    p.add_argument("--lr-a-ratio", type=float, default=d.lr_a_ratio, help="A's learning rate / B's")
    p.add_argument(
        "--adapter-text",
        choices=ADAPTER_TEXTS,
        default=d.adapter_text,
        help="what the adapter's loss sees: every token of its document, or the answers only",
    )
    p.add_argument("--question-form", choices=sorted(QUESTION_FORMS), default=d.question_form)
    p.add_argument("--value-form", choices=VALUE_FORMS, default=d.value_form)
    p.add_argument("--backend", default=d.backend)
    p.add_argument(
        "--general-adapters",
        type=int,
        default=d.general_adapters,
        metavar="G",
        help="also route with general knowledge subtraction (PEFT Arrow's use_gks) over G general adapters "
        "trained on pre-training documents (rows '... +GKS'; 0: none)",
    )
    p.add_argument("--stem", default="lag_demo", help="file name stem of the JSON and PNG")
    p.add_argument(
        "--keep-adapters", action="store_true", help="write the PEFT folders under OUT/adapters (OUT/adapters/seedS)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")


def config_from_args(args) -> ExperimentConfig:
    return ExperimentConfig(
        adapters=args.adapters,
        seed=args.seed,
        device=args.device,
        ks=tuple(int(k) for k in str(args.ks).split(",")),
        pretrain_steps=args.pretrain_steps,
        adapter_steps=args.adapter_steps,
        hidden=args.hidden,
        intermediate=3 * args.hidden,
        layers=args.layers,
        a_init_scale=args.a_init_scale,
        backend=args.backend,
        lr_a_ratio=args.lr_a_ratio,
        adapter_text=args.adapter_text,
        question_form=args.question_form,
        value_form=args.value_form,
        general_adapters=args.general_adapters,
    )


def check_arguments(args: argparse.Namespace, prog: str) -> bool:
    """The demo's option checks (``python -m lag_triton demo``) on ``args`` (every option of
    :func:`add_arguments`), before any work. On a usage error: one line on stderr, False."""
    from lag_triton.__main__ import UsageError, _check_experiment_args

    try:
        _check_experiment_args(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return False
    return True


EXIT_USAGE = 2  # a command line that cannot be carried out (as argparse's own errors)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ablation" in argv:  # anywhere on the command line
        from . import ablation

        argv.remove("--ablation")
        return ablation.main(argv)
    p = argparse.ArgumentParser(
        prog="python -m lag_triton.experiment.run",
        description=__doc__.split("\n")[0],
        epilog="--ablation (anywhere on the line) runs the routing ablation instead (its options: --ablation --help)",
    )
    add_arguments(p)
    args = p.parse_args(argv)
    if not check_arguments(args, p.prog):
        return EXIT_USAGE
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    cfg.extra["command"] = " ".join(shlex.quote(a) for a in ["python", "-m", "lag_triton.experiment.run"] + argv)
    adapters_dir = os.path.join(args.out, "adapters") if args.keep_adapters else None
    result = run_configured(cfg, args.seeds, adapters_dir=adapters_dir)
    print(format_table(result))
    write_outputs(result, args.out, stem=args.stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())

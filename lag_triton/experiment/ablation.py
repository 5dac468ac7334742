"""Which regime makes data-free routing carry document identity: a one-factor-at-a-time ablation.

    python -m lag_triton.experiment.run --ablation [--adapters 32] [--only NAME,...] [--out DIR]
    python -m lag_triton.experiment.run --ablation --merge a.json,b.json   # parts run in parallel

Every variant changes one thing from the demo's default configuration (``ExperimentConfig()``)
and runs the whole experiment (data, base model, adapters, PEFT folders, library, routing through
``lag_triton.patch``) at N=32, seed 0. For each it records exact match of no adapter / oracle /
Arrow top-1 / SpectR / LAG k=5, and routing accuracy at the answer position per layer, so the
table shows how each factor moves identity in the routing and the score. The variants cover what
the issue asks to vary: what text the adapter sees, its steps, the learning rate of A vs B, its
initialisation, the base model (pre-trained or not, size) and the question form.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch

from .run import (
    EXIT_USAGE,
    ExperimentConfig,
    add_arguments,
    check_arguments,
    lag5_row,
    package_versions,
    run_experiment,
)

# name -> (what changes, overrides of ExperimentConfig). The first is the default itself.
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("the demo's default", {}),
    "question: subject-then-mark": (
        "questions end with a marker after the entity (or start with it)",
        dict(question_form="subject-then-mark"),
    ),
    "values: one word of 60": (
        "values drawn from 60 one-token words per relation, not 10",
        dict(value_form="one-word"),
    ),
    "values: two words": ("two-token values (the answer is 'pale cobalt')", dict(value_form="two-words")),
    "text: answers only": (
        "loss on the answer tokens only, not on the document's whole text",
        dict(adapter_text="answers"),
    ),
    "lr A = lr B": ("A learns as fast as B (lr_a_ratio 1)", dict(lr_a_ratio=1.0)),
    "lr A = lr B / 4": ("lr_a_ratio 1/4", dict(lr_a_ratio=0.25)),
    "lr A = lr B / 64": ("lr_a_ratio 1/64", dict(lr_a_ratio=1 / 64)),
    "init: PEFT default": (
        "A Kaiming-uniform at full scale (PEFT's default), not 0.01 of it",
        dict(a_init_scale=1.0),
    ),
    "steps: 40": ("half the adapter training steps", dict(adapter_steps=40)),
    "steps: 160": ("twice the adapter training steps", dict(adapter_steps=160)),
    "base: not pre-trained": ("random-init base model (no pre-training)", dict(pretrain_steps=0)),
    "base: d=64": ("smaller base (hidden 64)", dict(hidden=64, intermediate=192)),
    "base: d=256": ("larger base (hidden 256)", dict(hidden=256, intermediate=768)),
    "base: 1 layer": ("one transformer layer", dict(layers=1)),
    "earlier demo": (
        "the earlier demo's regime: marker questions, two-word values, answers-only loss, lr A = lr B, "
        "base knows the documents' names",
        dict(
            question_form="subject-then-mark",
            value_form="two-words",
            adapter_text="answers",
            lr_a_ratio=1.0,
            mention_doc_entities=True,
            pretrain_steps=600,
            adapter_steps=100,
        ),
    ),
}

METHODS = ("no adapter", "oracle", "arrow top-1", "spectr k=N", "lag k=5")  # at N >= 5


def methods(adapters: int) -> tuple[str, ...]:
    """The rows the ablation keeps at N = ``adapters``: LAG k=5 is "lag k=N" below N=5 (k is capped at N)."""
    return METHODS[:-1] + (lag5_row(adapters),)


def _lag_row(summary: dict) -> str:
    """The LAG k=5 row of a variant's summary (its name as the run named it: "lag k=3" at N=3)."""
    return next(m for m in summary["exact_match"] if m.startswith("lag k="))


def summarise(result: dict) -> dict:
    """The numbers the ablation table shows, from one experiment result."""
    rows = result["rows"]
    kept = methods(result["config"]["adapters"])
    out = {
        "exact_match": {m: rows[m]["exact_match"] for m in kept},
        "normalised": {m: rows[m]["normalised"] for m in kept},
        "routing_answer_position": {
            m: rows[m]["routing"]["per_layer_answer_position"] for m in kept if rows[m].get("routing")
        },
        "routing_question_tokens": {m: rows[m]["routing"]["question_tokens"] for m in kept if rows[m].get("routing")},
        "chance_routing": result["diagnostics"]["chance_routing"],
        "total_s": result["timings"]["total_s"],
    }
    return out


def run_ablation(base: ExperimentConfig, names: list[str], log=print, on_result=None) -> dict:
    results = {}
    for name in names:
        what, overrides = VARIANTS[name]
        cfg = replace(base, **overrides)
        log(f"=== {name}: {what}")
        t = time.perf_counter()
        result = run_experiment(cfg, log=lambda *a: None)
        results[name] = {"what": what, "overrides": overrides, **summarise(result)}
        r = results[name]
        log(
            f"    EM arrow {r['exact_match']['arrow top-1']:.3f}  lag5 {r['exact_match'][_lag_row(r)]:.3f}  "
            f"spectr {r['exact_match']['spectr k=N']:.3f}  oracle {r['exact_match']['oracle']:.3f}  "
            f"({time.perf_counter() - t:.0f} s)"
        )
        if on_result is not None:
            on_result(results)
    return results


def format_ablation(ablation: dict) -> str:
    lines = [
        "| variant | no adapter EM | oracle EM | Arrow top-1 (norm.) | LAG k=5 (norm.) | SpectR (norm.) "
        "| routing @answer, Arrow / LAG k=5 / SpectR, per layer |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    capped = False
    for name, r in ablation["variants"].items():
        em, norm, ra = r["exact_match"], r["normalised"], r["routing_answer_position"]
        lag = _lag_row(r)
        capped |= lag != "lag k=5"
        layers = list(ra["arrow top-1"])
        routing = "; ".join(
            f"{layer.replace('layer', 'L')}: "
            + " / ".join(f"{100 * ra[m][layer]:.0f}" for m in ("arrow top-1", lag, "spectr k=N"))
            for layer in layers
        )
        lines.append(
            f"| {name} | {100 * em['no adapter']:.1f}% | {100 * em['oracle']:.1f}% "
            f"| {norm['arrow top-1']:.1f} | {norm[lag]:.1f} | {norm['spectr k=N']:.1f} | {routing} |"
        )
    chance = 100 * next(iter(ablation["variants"].values()))["chance_routing"]
    lines.append(
        f"\nrouting: % of answer-position tokens routed to the gold adapter (chance {chance:.1f}%); "
        "norm. = exact match / oracle's x 100" + ("; LAG k=5 is LAG k=N where N < 5" if capped else "")
    )
    return "\n".join(lines)


def config_record(base: ExperimentConfig) -> dict:
    """``base`` as the JSON's "base_config" records it (as read back: tuples are lists)."""
    return json.loads(json.dumps({k: v for k, v in vars(base).items() if k != "extra"}, default=list))


def config_difference(stored: dict | None, new: dict) -> str | None:
    """None if a file's stored base_config is ``new``; else the first field that differs, in words."""
    if not isinstance(stored, dict):
        return "it records no base_config"
    for key in [*new, *(k for k in stored if k not in new)]:
        if key not in stored or key not in new or stored[key] != new[key]:
            return f"base_config {key}: {stored.get(key, '(missing)')!r} there, {new.get(key, '(missing)')!r} here"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lag_triton.experiment.run --ablation", description=__doc__.split("\n")[0]
    )
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--out", default="bench/results", help="folder for the JSON")
    p.add_argument("--stem", default="demo-ablation", help="file name stem of the JSON")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated ablation JSONs (e.g. parts run in parallel) to combine into OUT/STEM.json; runs nothing",
    )
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    # the demo's checks, on the demo's defaults for the options the ablation does not take
    demo_parser = argparse.ArgumentParser()
    add_arguments(demo_parser)
    checked = demo_parser.parse_args([])
    checked.adapters, checked.seed, checked.threads = args.adapters, args.seed, args.threads
    checked.out, checked.stem = args.out, args.stem
    if not check_arguments(checked, p.prog):
        return EXIT_USAGE
    # k=5 is the only LAG row the table needs; no generate re-check (the demo does that)
    base = ExperimentConfig(adapters=args.adapters, seed=args.seed, ks=(5,), generate_check=0, check_limits=False)
    base_config = config_record(base)
    path = os.path.join(args.out, args.stem + ".json")
    sources = [f for f in args.merge.split(",") if f] or ([path] if os.path.exists(path) else [])
    parts = []
    for source in sources:  # before any work: only rows of this configuration are combined
        try:
            with open(source) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{p.prog}: error: cannot read {source}: {e}", file=sys.stderr)
            return EXIT_USAGE
        differs = config_difference(part.get("base_config") if isinstance(part, dict) else None, base_config)
        if differs is not None:
            print(
                f"{p.prog}: error: {source} holds rows of another configuration ({differs}); "
                "run with the options it was run with, or another --out/--stem",
                file=sys.stderr,
            )
            return EXIT_USAGE
        parts.append(part)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ablation = {
        "base_config": base_config,
        "environment": {
            "torch": torch.__version__,
            **package_versions("transformers", "peft"),
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "variants": {},
    }
    for part in parts:  # resume (or merge): variants already measured are kept unless re-run
        ablation["variants"].update(part.get("variants", {}))
        if args.merge:  # the merged runs ran where their parts did; a resumed file's new runs run here
            ablation["environment"] = part.get("environment", ablation["environment"])

    def save(results):
        ablation["variants"].update(results)
        with open(path, "w") as f:
            json.dump(ablation, f, indent=1, default=list)

    run_ablation(base, [] if args.merge else names, on_result=save)
    ablation["variants"] = {n: ablation["variants"][n] for n in VARIANTS if n in ablation["variants"]}
    save({})
    print(format_ablation(ablation))
    print(f"[out] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

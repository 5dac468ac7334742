"""Why one demo seed scores low: joint routing at the answer position, and the score given it.

For each router (Arrow top-1, LAG k=5, SpectR) and seed: the share of questions whose answer
position is routed to the gold adapter at layer 0's gate_proj and up_proj at once (the two modules
that carry document identity in the demo's model), exact match among those questions and among
the rest, and the per-module routing accuracy. With top_m = 1 every weight is 1, so among questions
where two routers agree on those two modules, their answers differ only through the other modules.

    python bench/demo_joint_routing.py --seeds 0,1,2 [--out bench/results/demo-joint-routing-<date>.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

import lag_triton
from lag_triton.experiment.evaluate import QuestionBatch, exact_match, gold_hits, gold_library_index
from lag_triton.experiment.run import ExperimentConfig, build_data_and_base, build_library, determinism

ROUTERS = {
    "arrow top-1": dict(router="arrow", top_m=1),
    "lag k=5": dict(router="lag", k=5),
    "spectr": dict(router="spectr"),
}
IDENTITY_MODULES = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


def joint_routing(seed: int, **sizes) -> dict:
    """The figures of one seed at the demo's default configuration (``sizes`` override it)."""
    cfg = ExperimentConfig(seed=seed, **sizes)
    with determinism(seed):
        quiet = lambda *a: None  # noqa: E731
        data, model, _ = build_data_and_base(cfg, quiet)
        with tempfile.TemporaryDirectory() as tmp:
            _, _, names, _, lib = build_library(cfg, model, data, tmp, quiet)
        qb = QuestionBatch(data.questions)
        gold_lib = gold_library_index(lib, names, qb)
        out = {}
        for name, kw in ROUTERS.items():
            lag_triton.patch(model, lib, backend="torch", **kw)
            try:
                with lag_triton.trace(model) as tr:
                    em = exact_match(model, qb, cfg.eval_batch, cfg.device)
            finally:
                lag_triton.unpatch(model)
            hit = {m: h[qb.answer_position] for m, h in gold_hits(tr.selections, qb, gold_lib).items()}
            both = torch.stack([hit[m] for m in IDENTITY_MODULES]).all(0)
            out[name] = {
                "exact_match": float(em.float().mean()),
                "identity_modules_both_gold": float(both.float().mean()),
                "exact_match_given_both_gold": float(em[both].float().mean()),
                "exact_match_otherwise": float(em[~both].float().mean()),
                "routing_per_module": {m: float(h.float().mean()) for m, h in sorted(hit.items())},
            }
            print(
                f"seed {seed} {name:<12} EM {out[name]['exact_match']:.3f}  L0 gate+up gold {both.float().mean():.3f}  "
                f"EM | both gold {out[name]['exact_match_given_both_gold']:.3f}  "
                f"EM | not {out[name]['exact_match_otherwise']:.3f}",
                flush=True,
            )
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=None, help="JSON file for the figures")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration (CI)")
    args = p.parse_args(argv)
    sizes = dict(adapters=6, hidden=32, intermediate=96, pretrain_steps=5, adapter_steps=3) if args.tiny else {}
    result = {"identity_modules": list(IDENTITY_MODULES), "config": sizes or "demo default", "seeds": {}}
    for seed in (int(s) for s in args.seeds.split(",")):
        result["seeds"][seed] = joint_routing(seed, **sizes)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

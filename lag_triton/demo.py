"""``python -m lag_triton demo``: the LAG knowledge-library experiment at its default size (CPU, offline).

Runs :mod:`lag_triton.experiment` (synthetic documents, a tiny Llama, one knowledge LoRA per
document; no adapter / uniform merge / Arrow / SpectR / LAG(k) / oracle), prints the table,
writes JSON + PNG to ``--out``, and checks that a one-adapter library with k=1 gives the same
logits as PEFT's own LoRA forward of that adapter (fp32, rtol 1e-5). ``--seeds S`` repeats the
experiment for S seeds and reports mean ± sd; ``--general-adapters G`` adds rows routed with
general knowledge subtraction (GKS) over G general adapters.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from .experiment import report
from .experiment import run as exp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    exp.add_arguments(parser)


def peft_equivalence_check(
    adapters: int = 4, seed: int = 0, hidden: int = 64, layers: int = 2, device: str = "cpu", backend: str = "auto"
) -> dict:
    """A one-adapter library with k=1 vs PEFT's LoRA forward of the same adapter: max |diff| of logits."""
    import lag_triton

    from .experiment.adapters import load_peft_all, save_peft_folders, train_adapters
    from .experiment.data import make_data
    from .experiment.model import ModelSize, build_model, pad_batch

    with exp.determinism(seed):
        data = make_data(adapters, seed=seed)
        model = build_model(len(data.tokenizer), ModelSize(hidden, layers, 4, 3 * hidden), seed).to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        # PEFT's default init scale and equal learning rates: an adapter whose effect is large and generic
        weights, _ = train_adapters(model, data.by_doc(), steps=10, seed=seed, device=device)
        ids = pad_batch([q.prompt + q.answer for q in data.questions[:64]]).to(device)
        with tempfile.TemporaryDirectory(prefix="lag_peft_check_") as tmp:
            names = [f"doc{i:04d}" for i in range(adapters)]
            folders = save_peft_folders(weights, tmp, names)
            peft_model = load_peft_all(copy.deepcopy(model), folders[:1], names[:1])
            with torch.no_grad():
                ref = peft_model(input_ids=ids).logits.float()
                base = model(input_ids=ids).logits.float()
                lib = lag_triton.Library.from_peft(folders[:1], names=names[:1], progress=False)
                lag_triton.patch(model, lib, k=1, top_m=1, router="lag", backend=backend)
                try:
                    got = model(input_ids=ids).logits.float()
                finally:
                    lag_triton.unpatch(model)
    ok = torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    return {
        "adapter": names[0],
        "tokens": int(ids.numel()),
        "max_abs_diff": float((got - ref).abs().max()),
        "adapter_effect_max_abs": float((ref - base).abs().max()),
        "rtol": 1e-5,
        "atol": 1e-5,
        "ok": bool(ok),
    }


def _command_line() -> str:
    """How this run was started: the command line (``python -m lag_triton ...`` or the ``lag-triton``
    script), or the demo's plain command when it was called from Python."""
    program = _PROGRAMS.get(Path(sys.argv[0]).name) if sys.argv else None
    if program is None or len(sys.argv) < 2:
        return "python -m lag_triton demo"
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


#: argv[0]'s name -> the command a user types for it
_PROGRAMS = {"__main__.py": "python -m lag_triton", "lag_triton": "python -m lag_triton", "lag-triton": "lag-triton"}


def _print_checks(result: dict) -> bool:
    c = result["checks"]

    def told(key: str) -> str:  # a check whose routers --ks did not run
        return "not run (--ks lacks its k)" if c.get(key) is None else str(c[key])

    print(
        "[checks] PEFT loaded the written folders exactly "
        f"(max |weight diff| {c['peft_loaded_weights_max_abs_diff']:.1e}); "
        f"LAG k=1 selects as Arrow top-1: {told('lag_k1_selects_as_arrow_top1')}; "
        f"LAG k=N selects as SpectR: {told('lag_kN_selects_as_spectr')}"
    )
    if "generate_vs_teacher_forced" in c:
        g = c["generate_vs_teacher_forced"]
        print(
            f"[checks] model.generate agrees with the teacher-forced greedy score on "
            f"{g['agree_with_teacher_forced']}/{g['questions']} questions ({g['method']})"
        )
    else:
        print("[checks] model.generate not run: it re-checks the LAG k=5 row, which --ks (or N < 5) left out")
    return c.get("lag_k1_selects_as_arrow_top1", True) and c.get("lag_kN_selects_as_spectr", True)


def run(args) -> int:
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = exp.config_from_args(args)
    cfg.extra["command"] = _command_line()
    seeds = args.seeds
    print(
        f"LAG demo: {cfg.adapters} knowledge adapters, seed{'s' if seeds > 1 else ''} "
        f"{cfg.seed}{f'..{cfg.seed + seeds - 1}' if seeds > 1 else ''}, device {cfg.device}"
    )
    print("[check] one-adapter library, k=1, vs PEFT's LoRA forward (fp32, rtol 1e-5)")
    check = peft_equivalence_check(seed=cfg.seed, device=cfg.device, backend=cfg.backend)
    print(
        f"  max |logits diff| = {check['max_abs_diff']:.2e} over {check['tokens']} tokens "
        f"(adapter changes logits by up to {check['adapter_effect_max_abs']:.2e}): "
        f"{'OK' if check['ok'] else 'FAILED'}"
    )
    adapters_dir = os.path.join(args.out, "adapters") if args.keep_adapters else None
    result = exp.run_configured(cfg, seeds, adapters_dir=adapters_dir)
    result["checks"]["one_adapter_library_vs_peft"] = check
    result["timings"]["demo_total_s"] = time.perf_counter() - t0
    print()
    print(report.format_table(result))
    print()
    print(report.format_routing_by_module(result))
    print()
    constructions_ok = _print_checks(result)
    report.write_outputs(result, args.out, stem=getattr(args, "stem", "lag_demo"))
    print(f"[time] {result['timings']['demo_total_s']:.1f} s total")
    return 0 if check["ok"] and constructions_ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lag_triton demo", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

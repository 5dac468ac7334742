"""Measure the Triton launch configurations on this GPU and write a tuning table (a few minutes).

    PYTHONPATH=. python3 bench/tune_kernels.py [--out tuned.json] [--time-budget 180] [--quick]

For each op and shape bucket (the Arrow select at k = 20 over T x N, the apply over T x d_out)
it times the default configuration and a grid of candidates, each as the device time of
CUDA-graph replays (bench/timing.time_cell), and writes an entry wherever a candidate beats
the default by more than --min-gain. The table (format: lag_triton/kernels/triton/tuning.py)
is what the launchers read from lag_triton/kernels/triton/tuned/<card>.json or $LAG_TRITON_TUNING;
the AOT compile check compiles every configuration in the shipped tables. Each entry keeps the
measured times ("measured"), so a table is its own evidence. On CPU (Triton interpreter) it runs a
tiny sweep to check the plumbing: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import env_info, log  # noqa: E402  (chooses the interpreter without a GPU)
from bench.timing import time_cell  # noqa: E402
from lag_triton.kernels.triton import tuning  # noqa: E402

# the modules (the package exports the op functions under the same names)
arrow = importlib.import_module("lag_triton.kernels.triton.arrow_topk")
apply = importlib.import_module("lag_triton.kernels.triton.lora_apply")

BIG = 1 << 30  # open upper end of a bucket
# Buckets: the swept size, and the range of sizes its best configuration is used for.
T_BUCKETS = {1: [1, 1], 32: [2, 63], 2048: [64, BIG]}
N_BUCKETS = {1000: [1, 3162], 10000: [3163, 31622], 100000: [31623, BIG]}


def _select_candidates(quick: bool) -> list[dict]:
    blocks = (64, 128) if quick else (256, 512, 1024, 2048)
    warps = (4,) if quick else (2, 4, 8)
    return [{"BLOCK": b, "CAP": b * c, "num_warps": w} for b, c, w in itertools.product(blocks, (1, 2), warps)]


def _apply_candidates(t: int, quick: bool) -> list[dict]:
    out = []
    for bt, bo, w in itertools.product((1, 2, 4, 8, 16), (32, 64, 128, 256, 512), (1, 2, 4, 8)):
        per_thread = bt * bo / (32 * w)
        if bt <= max(1, 2 ** math.ceil(math.log2(t))) and 1 <= per_thread <= 32 and (not quick or w == 1):
            out.append({"BLOCK_T": bt, "BLOCK_O": bo, "num_warps": w})
    return out[:4] if quick else out


def _time(fn, device, args) -> float:
    return time_cell([fn], device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)["ms"]


def _best(op: str, candidates: list[dict], run, device, args, budget_end: float) -> tuple[dict | None, float]:
    """The fastest candidate config of ``op`` for ``run`` (None, inf if the budget allowed none)."""
    best, best_ms = None, math.inf
    for cfg in candidates:
        if time.monotonic() > budget_end:
            break
        with tuning.forced(op, cfg):
            ms = _time(run, device, args)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def tune_select(args, device, table: list, budget_end: float) -> None:
    k, k_pad = 20, 32
    ts, ns = list(T_BUCKETS), list(N_BUCKETS)
    if args.quick or device.type != "cuda":
        ts, ns = [1, 3], [100]
    for t, n in itertools.product(ts, ns):
        scores = torch.randn(t, n, device=device, dtype=torch.float32)
        idx, out = torch.empty(t, k, dtype=torch.int32, device=device), torch.empty(t, k, device=device)
        run = functools.partial(arrow._select, scores, k, idx, out, None, None)
        default = _time(run, device, args)
        best, best_ms = _best("arrow_select", _select_candidates(args.quick), run, device, args, budget_end)
        log(f"arrow_select T={t} N={n}: default {default:.4f} ms, best {best} {best_ms:.4f} ms")
        if best is not None and best_ms < default * (1 - args.min_gain):
            table.append(
                {
                    "op": "arrow_select",
                    "k_pad": k_pad,
                    "t": T_BUCKETS.get(t, [t, t]),
                    "n": N_BUCKETS.get(n, [n, n]),
                    "config": best,
                    "measured": {"default_ms": default, "ms": best_ms, "T": t, "N": n},
                }
            )


def tune_apply(args, device, dtype, table: list, budget_end: float) -> None:
    n, r = 1000, 6
    ts, d_outs = (list(T_BUCKETS), [3072, 8192])
    if args.quick or device.type != "cuda":
        ts, d_outs, n = [1, 3], [48], 20
    for t, d_out in itertools.product(ts, d_outs):
        b = apply.prepare_b_star(torch.randn(n, d_out, r, device=device).to(dtype) * 0.02)
        sel = torch.randint(0, n, (t, 1), device=device, dtype=torch.int32)
        w, z = torch.ones(t, 1, device=device), torch.randn(t, 1, r, device=device)
        y = torch.zeros(t, d_out, device=device, dtype=dtype)
        run = functools.partial(apply.lora_apply, y, b, sel, w, z)
        default = _time(run, device, args)
        best, best_ms = _best("lora_apply", _apply_candidates(t, args.quick), run, device, args, budget_end)
        log(f"lora_apply T={t} d_out={d_out}: default {default:.4f} ms, best {best} {best_ms:.4f} ms")
        if best is not None and best_ms < default * (1 - args.min_gain):
            table.append(
                {
                    "op": "lora_apply",
                    "t": T_BUCKETS.get(t, [t, t]),
                    "d_out": [d_out, d_out],
                    "config": best,
                    "measured": {"default_ms": default, "ms": best_ms, "T": t, "N": n, "r": r},
                }
            )


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="table path (default bench/results/tuned-<card>.json)")
    p.add_argument("--time-budget", type=float, default=180.0, help="seconds; candidates after it are skipped")
    p.add_argument("--min-gain", type=float, default=0.03, help="write an entry only if it beats the default by this")
    p.add_argument("--warmup-ms", type=float, default=2)
    p.add_argument("--rep-ms", type=float, default=10)
    p.add_argument("--quick", action="store_true", help="a few candidates on small shapes (plumbing check)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"tuned-{tuning.card_slug(card)}.json")
    end = time.monotonic() + args.time_budget
    entries: list = []
    tune_select(args, device, entries, end)
    tune_apply(args, device, torch.bfloat16, entries, end)
    env = env_info(device)
    table = {
        "card": card,
        "triton": env.get("triton"),
        "torch": env.get("torch"),
        "date": env.get("date"),
        "entries": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    tuning.load_table(out)  # the table must be one the launchers accept
    log(f"wrote {out} ({len(entries)} entries)")
    return out


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What one running top-k step costs inside a Triton program, by tile shape.

The Arrow top-k kernel merges every [ROWS, C] block of packed int64 (score, index) words into a
running [ROWS, K_PAD] list (``_common.merge_topk``: ``tl.topk`` bitonic networks), once per
score tile and once per chunk of the split-N merge. The kernel tables of the first H100 run
suggest these steps, not the GEMM or the bytes, set the Arrow time (it hardly changed from T=1
to T=2048 and grew with the tiles per program). This probe times the step alone: one program
(latency, the decode merge) or one program per SM (throughput) runs ITERS dependent merges of a
register-resident block and reports device microseconds per merge, for int64 words and, as a
baseline, for fp32 values of the same shape.

    PYTHONPATH=. python3 bench/probe_topk.py [--iters 64] [--out results.json]
    PYTHONPATH=. TRITON_INTERPRET=1 python3 bench/probe_topk.py --device cpu --iters 2 --shapes 1x64x32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench.harness import Results, default_results_path, log  # noqa: E402
from bench.timing import bench  # noqa: E402
from lag_triton.kernels.triton._common import merge_topk  # noqa: E402

# (ROWS, C, K_PAD): decode tiles (1 row), the 16-row dot tile, the 64-row prefill tile, merge chunks
DEFAULT_SHAPES = "1x64x32,1x2048x32,16x64x32,16x256x32,64x64x32"


@triton.jit
def _merge_loop_kernel(
    words_ptr,  # [ROWS, C] values (int64 packed words or fp32), contiguous
    out_ptr,  # out: [num_programs, ROWS, K_PAD] final running lists
    ITERS,  # dependent merges per program
    ROWS: tl.constexpr,
    C: tl.constexpr,
    K_PAD: tl.constexpr,
):
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, C)
    words = tl.load(words_ptr + rows[:, None] * C + cols[None, :])
    best = tl.load(words_ptr + rows[:, None] * C + tl.arange(0, K_PAD)[None, :])
    for i in range(ITERS):
        # a different block each iteration, so the compiler cannot hoist the merge out of the loop
        cand = words + (tl.zeros_like(words) + i)
        best = merge_topk(best, cand, K_PAD)
    pid = tl.program_id(0)
    tl.store(out_ptr + pid * ROWS * K_PAD + rows[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :], best)


def probe(rows: int, c: int, k_pad: int, dtype: torch.dtype, programs: int, iters: int, device) -> float:
    """Device microseconds per merge step (median of whole launches / iters)."""
    if dtype == torch.int64:
        words = torch.randint(0, 1 << 62, (rows, c), device=device, dtype=torch.int64)
    else:
        words = torch.randn(rows, c, device=device, dtype=dtype)
    out = torch.empty((programs, rows, k_pad), device=device, dtype=dtype)

    def launch():
        _merge_loop_kernel[(programs,)](words, out, iters, ROWS=rows, C=c, K_PAD=k_pad, num_warps=4)

    ms = bench(launch, device, warmup_ms=5, rep_ms=25)
    return ms * 1e3 / iters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of ROWSxCxK_PAD")
    ap.add_argument("--iters", type=int, default=64, help="dependent merges per program and launch")
    ap.add_argument("--out", default=None, help="results JSON to append to")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = Results(args.out or default_results_path(device), device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    for spec in args.shapes.split(","):
        rows, c, k_pad = (int(v) for v in spec.lower().split("x"))
        for name, dtype in (("int64 words", torch.int64), ("fp32 values", torch.float32)):
            for mode, programs in (("1 program", 1), (f"{sms} programs", sms)):
                try:
                    us = probe(rows, c, k_pad, dtype, programs, args.iters, device)
                    status = "ok"
                except Exception as exc:  # noqa: BLE001 - record and go on
                    us, status = None, f"error: {type(exc).__name__}: {str(exc)[:200]}"
                results.add(
                    {
                        "section": "probe_topk",
                        "rows": rows,
                        "C": c,
                        "K_PAD": k_pad,
                        "dtype": name,
                        "programs": programs,
                        "iters": args.iters,
                        "us_per_merge": us,
                        "status": status,
                    }
                )
                shown = f"{us:8.2f} us/merge" if us is not None else status
                log(f"  merge [{rows:3d} x {c:5d}] -> top-{k_pad:<4d} {name:11s} {mode:13s} {shown}")
    log(f"wrote {results.path}")
    return results.path


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Kernel benchmark: one full LAG layer (arrow top-k + SpectR rerank + apply) via lag_triton.routing.route_and_apply.

Backends: triton, cuda, plain PyTorch (the obvious user code, bench/baselines.py), plain-compile (the same
under torch.compile; CUDA only), torch (our reference). Timing: bench/timing.py docstring (CUDA-graph
device time + eager time per cell).
Defaults on GPU: bf16, rank 6, k=20, top_m=1, shapes 3072->8192 and 8192->3072, N in {1000, 10000,
100000}, T in {1, 32, 2048}. On CPU: tiny sizes (Triton under its interpreter).

    PYTHONPATH=. python3 bench/bench_layer.py [--quick] \
        [--device cpu] [--n 1000,10000] [--t 1,2048] [--out results.json]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import run_kernel_tables  # noqa: E402


def main(argv=None):
    return run_kernel_tables(["layer"], argv, __doc__)


if __name__ == "__main__":
    main()

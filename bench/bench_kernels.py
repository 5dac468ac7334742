#!/usr/bin/env python3
"""All kernel tables in one process (shares the random library per shape and N; what gpu_check.sh runs).

    PYTHONPATH=. python3 bench/bench_kernels.py [--ops layer,arrow_topk,spectr_rerank,lora_apply] [kernel flags]

Kernel flags are those of bench/bench_layer.py (see --help).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import KERNEL_OPS, run_kernel_tables  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ops = list(KERNEL_OPS)
    if "--ops" in argv:
        i = argv.index("--ops")
        ops = [o.strip() for o in argv[i + 1].split(",") if o.strip()]
        del argv[i : i + 2]
    return run_kernel_tables(ops, argv, __doc__)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Host cost of a patched layer on CPU: lag_triton's own Python per forward, no kernel run.

Eager decoding (``model.generate`` without CUDA graphs, the transformers default) is bound by
host time, not device time: at batch 1 every patched projection issues its launches and returns
long before the GPU is busy. That host time has two parts: lag_triton's Python (argument checks,
launch plans, output allocation, the patched module's forward) and Triton's launcher
(``JITFunction.run``: binding and specialising the arguments, then the driver call). This script
measures the first part on any machine: it runs the Triton backend's real host code under
``TRITON_INTERPRET=1`` with every Triton launch and the cuBLAS scoring GEMM replaced by a no-op
that counts launches, its launch plans made as on a GPU with ``--sms`` SMs (the compiled kernels'
block sizes), so what is timed is the Python a GPU run executes before each launch; ``--fold``
times it with the split reductions folded (``LAG_TRITON_FOLD_SPLITS=1``). Times are this thread's
CPU time, the least of 30 interleaved repeats. Triton's launcher and the CUDA driver are not in it
(``bench/profile_layer.py`` times the whole host path on a GPU, and the end-to-end table's eager
columns the model).

Rows: each op alone, ``route_and_apply`` (the three ops), and a patched module's forward
(``LagLinear``: reshapes, autocast and scope checks, the three ops), its base layer replaced by a
stub returning a preallocated output, so the base's own cost is not counted.

    PYTHONPATH=. python3 bench/bench_host.py [--t 1,32,2048] [--fold] [--json bench/results/host-cpu-<date>/<c>.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton defines any kernel: the launches go through the interpreter

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lag_triton  # noqa: E402
from bench.harness import DTYPES, _random_library  # noqa: E402
from lag_triton.library.weights import ModuleWeights  # noqa: E402
from lag_triton.routing import RoutingConfig, route_and_apply  # noqa: E402


class LaunchStub:
    """Inside a ``with`` block: every Triton launch and the scoring GEMM replaced by a call counter,
    and the launch plans made as on a GPU with ``sms`` SMs (the interpreter's plans use small blocks
    and 4 SMs, so they would launch other kernels: a GPU's merge-free select at N = 1,000, say)."""

    def __init__(self, sms: int) -> None:
        self.sms = sms
        self.launches: Counter[str] = Counter()

    def __enter__(self) -> LaunchStub:
        import triton.runtime.interpreter as interpreter

        import lag_triton.kernels.triton  # noqa: F401  (defines the kernels)

        arrow_module = sys.modules["lag_triton.kernels.triton.arrow_topk"]  # the package exports the function
        if not hasattr(interpreter.InterpretedFunction, "run") or not hasattr(arrow_module, "prototype_scores"):
            raise RuntimeError("this Triton's interpreter or lag_triton's scoring changed: update LaunchStub")
        launches = self.launches

        def launch(fn, *args, grid, warmup, **kwargs):
            launches[fn.fn.__name__] += 1

        def scores(x, prototypes):  # cuBLAS on a GPU: one launch into a new [T, N] fp32 tensor
            launches["prototype_scores (GEMM)"] += 1
            return torch.empty((x.shape[0], prototypes.shape[0]), dtype=torch.float32, device=x.device)

        replace = [(interpreter.InterpretedFunction, "run", launch), (arrow_module, "prototype_scores", scores)]
        for name, module in list(sys.modules.items()):
            if name.startswith("lag_triton.kernels.triton.") and not name.endswith(("._common", "._interpreter")):
                for attr, value in (("interpreting", lambda: False), ("num_sms", lambda device: self.sms)):
                    if hasattr(module, attr):
                        replace.append((module, attr, value))
        self._undo = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in replace]
        for owner, attr, value in replace:
            setattr(owner, attr, value)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in self._undo:
            setattr(owner, name, value)


class StubBase(nn.Linear):
    """A base layer whose forward returns a preallocated output: the patched forward's own cost only."""

    def __init__(self, d_in: int, d_out: int, t: int, dtype: torch.dtype) -> None:
        super().__init__(d_in, d_out, bias=False, dtype=dtype)
        self.out = torch.zeros(t, d_out, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.view(*x.shape[:-1], self.out.shape[-1])  # the patched layer passes [T, d_in]


def per_call_us(cases: dict, iters: int, repeats: int = 30) -> dict:
    """Per case, the least of ``repeats`` means over ``iters`` calls, in microseconds of this thread's
    CPU time (time spent descheduled is not the code's cost). The cases take turns within each
    repeat, so a slow spell of a shared machine slows every case in a few repeats, not one case in all."""
    for fn in cases.values():
        for _ in range(max(3, iters // 20)):
            fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.thread_time()
            for _ in range(iters):
                fn()
            best[name] = min(best[name], (time.thread_time() - t0) / iters)
    return {name: v * 1e6 for name, v in best.items()}


def measure(args, t: int) -> list[dict]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    protos, a_star, b_star = _random_library(args.n, args.rank, args.d_in, args.d_out, dtype, torch.device("cpu"), gen)
    ops = lag_triton.kernels.get_ops("triton")
    b_star = ops.prepare_b_star(b_star)
    x = torch.randn(t, args.d_in, generator=gen).to(dtype)
    y = torch.zeros(t, args.d_out, dtype=dtype)
    config = RoutingConfig(k=args.k, top_m=args.top_m)
    k, m = config.sizes(args.n)
    candidates = torch.randint(0, args.n, (t, k), dtype=torch.int32, generator=gen)
    sel = torch.randint(0, args.n, (t, m), dtype=torch.int32, generator=gen)
    w = torch.full((t, m), 1.0 / m)
    z = torch.randn(t, m, args.rank, generator=gen)

    model = nn.Sequential(StubBase(args.d_in, args.d_out, t, dtype))
    weights = ModuleWeights(a_star, b_star, protos, torch.arange(args.n))
    library = lag_triton.Library([f"a{i}" for i in range(args.n)], {"0": weights})
    lag_triton.patch(model, library, k=args.k, top_m=args.top_m, backend="triton")
    x3 = x.unsqueeze(0)

    cases = {
        "arrow_topk": lambda: ops.arrow_topk(x, protos, k),
        "spectr_rerank": lambda: ops.spectr_rerank(x, a_star, candidates, m),
        "lora_apply": lambda: ops.lora_apply(y, b_star, sel, w, z),
        "route_and_apply": lambda: route_and_apply(x, y, a_star, b_star, protos, config, ops),
        "patched forward": lambda: model(x3),
    }
    rows = []
    with LaunchStub(args.sms) as stub:
        for name, fn in cases.items():  # launches per call, counted once
            stub.launches.clear()
            fn()
            rows.append(dict(case=name, t=t, launches=sum(stub.launches.values()), kernels=dict(stub.launches)))
        times = per_call_us(cases, args.iters)
    for row in rows:
        row["host_us"] = round(times[row["case"]], 1)
        print(f"T={t:<5} {row['case']:<16} {row['host_us']:8.1f} us  {row['launches']} launches {row['kernels']}")
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_record(path: Path, what: str, shape: dict, rows: list[dict]) -> None:
    """The rows as a results JSON at ``path``, with the date, commit, machine and versions."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = dict(
        what=what,
        date=date.today().isoformat(),
        commit=commit or None,
        machine=dict(cpu=_cpu_name(), cores=os.cpu_count(), python=platform.python_version()),
        versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
        shape=shape,
        rows=rows,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", default="1,32,2048", help="tokens per call (comma-separated)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--d-out", type=int, default=8192)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--top-m", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--fold", action="store_true", help="with the split reductions folded (LAG_TRITON_FOLD_SPLITS=1)")
    p.add_argument("--sms", type=int, default=132, help="plan launches as on a GPU with this many SMs (H100/H200: 132)")
    p.add_argument("--iters", type=int, default=100, help="calls per timed repeat (the least of 30 repeats)")
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        print("note: a GPU is present; this script still measures the CPU-side Python only", file=sys.stderr)
    torch.set_num_threads(1)  # host code is single-threaded; keep the stubs' allocations comparable
    from lag_triton.kernels.triton._common import fold_splits

    with fold_splits.forced(args.fold):
        rows = [row for t in (int(v) for v in args.t.split(",")) for row in measure(args, t)]
    if args.json:
        keys = ("n", "d_in", "d_out", "rank", "k", "top_m", "dtype", "sms", "fold")
        what = "host-side Python per call, Triton launches and the scoring GEMM stubbed (bench/bench_host.py)"
        write_record(args.json, what, {key: getattr(args, key) for key in keys}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

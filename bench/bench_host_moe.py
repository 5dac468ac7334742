#!/usr/bin/env python3
"""Host cost of a patched MoE layer on CPU: lag_triton's Python per expert-module forward, no kernel run.

A patched MoE layer (lag_triton/moe.py) runs transformers' eager expert loop with each expert's two
projections routed: one routed call (three ops) per hit expert and projection. Eager decoding is
bound by that host time, so this script measures it the way ``bench_host.py`` measures one layer:
the Triton backend's real host code with every Triton launch and the scoring GEMM stubbed
(``bench_host.LaunchStub``, plans as on a GPU with ``--sms`` SMs). Rows, per token count T (each
token sent to ``--top-k`` of ``--experts`` experts, a Qwen3-MoE expert module of small width so that
its own GEMMs cost little):

- ``experts (unpatched)``: transformers' eager loop alone;
- ``experts (patched)``: the same module with a library on every expert's projections.

The difference is what LAG adds per MoE layer and forward; times are this thread's CPU time, the
least of 30 interleaved repeats (``bench_host.per_call_us``).

    PYTHONPATH=. python3 bench/bench_host_moe.py [--t 1,32] [--json bench/results/host-cpu-<date>/moe.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton defines any kernel: the launches go through the interpreter

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lag_triton  # noqa: E402
from bench.bench_host import LaunchStub, per_call_us, write_record  # noqa: E402
from bench.harness import DTYPES, _random_library  # noqa: E402
from lag_triton.library.weights import ModuleWeights  # noqa: E402


def expert_module(args) -> nn.Module:
    """A Qwen3-MoE expert module (3-D parameters, transformers' expert flags) of ``--experts`` experts."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    config = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.intermediate, num_experts=args.experts)
    config._experts_implementation = "eager"  # what a model built from the config would set: transformers' loop
    torch.manual_seed(0)
    return modeling_qwen3_moe.Qwen3MoeExperts(config).to(DTYPES[args.dtype]).eval()


def library(experts: nn.Module, args) -> lag_triton.Library:
    """``--n`` random adapters on both projections of every expert (modules ``experts.<projection>.<e>``)."""
    gen = torch.Generator().manual_seed(1)
    dtype, modules = DTYPES[args.dtype], {}
    for projection in ("gate_up_proj", "down_proj"):
        d_out, d_in = getattr(experts, projection).shape[1:]
        for e in range(args.experts):
            protos, a_star, b_star = _random_library(args.n, args.rank, d_in, d_out, dtype, torch.device("cpu"), gen)
            modules[f"experts.{projection}.{e}"] = ModuleWeights(a_star, b_star, protos, torch.arange(args.n))
    return lag_triton.Library([f"a{i}" for i in range(args.n)], modules)


def measure(args, t: int, plain: nn.Module, patched: nn.Module) -> list[dict]:
    gen = torch.Generator().manual_seed(t)
    hidden = torch.randn(t, args.hidden, generator=gen).to(DTYPES[args.dtype])
    index = torch.stack([torch.randperm(args.experts, generator=gen)[: args.top_k] for _ in range(t)])
    weights = torch.full((t, args.top_k), 1.0 / args.top_k, dtype=hidden.dtype)
    hit = index.unique().numel()
    cases = {
        "experts (unpatched)": lambda: plain.experts(hidden, index, weights),
        "experts (patched)": lambda: patched.experts(hidden, index, weights),
    }
    rows = []
    with torch.no_grad(), LaunchStub(args.sms) as stub:
        for name, fn in cases.items():
            stub.launches.clear()
            fn()
            rows.append(dict(case=name, t=t, experts_hit=hit, launches=sum(stub.launches.values())))
        times = per_call_us(cases, args.iters)
    for row in rows:
        row["host_us"] = round(times[row["case"]], 1)
        print(f"T={t:<4} {row['case']:<20} {row['host_us']:9.1f} us  {hit} experts hit, {row['launches']} launches")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--t", default="1,32", help="tokens per call (comma-separated)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8, help="experts per token")
    p.add_argument("--hidden", type=int, default=64, help="small: the experts' own GEMMs are not what is measured")
    p.add_argument("--intermediate", type=int, default=32)
    p.add_argument("--n", type=int, default=200, help="adapters per expert projection")
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sms", type=int, default=132, help="plan launches as on a GPU with this many SMs (H100/H200: 132)")
    p.add_argument("--iters", type=int, default=5, help="calls per timed repeat (the least of 30 repeats)")
    p.add_argument("--json", type=Path, help="write the rows and the machine here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    plain = nn.ModuleDict({"experts": expert_module(args)})
    patched = copy.deepcopy(plain)
    lag_triton.patch(patched, library(patched.experts, args), k=20, top_m=1, backend="triton")
    rows = [row for t in (int(v) for v in args.t.split(",")) for row in measure(args, t, plain, patched)]
    if args.json:
        keys = ("experts", "top_k", "hidden", "intermediate", "n", "rank", "dtype", "sms")
        what = "host-side Python per MoE expert-module forward, Triton launches and the scoring GEMM stubbed"
        write_record(args.json, what + " (bench/bench_host_moe.py)", {key: getattr(args, key) for key in keys}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

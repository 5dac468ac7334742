#!/usr/bin/env python3
"""Where one LAG layer's time goes: device time per kernel (torch.profiler) next to host time per call.

The kernel tables time whole calls with CUDA events, which cannot tell a slow kernel from a
host-bound launch sequence. This script can: for each backend it runs route_and_apply a few
times under torch.profiler and prints, per GPU kernel, its launches per call and device
microseconds per call, plus the host (wall) time per call with the GPU synchronised at the end.

    PYTHONPATH=. python3 bench/profile_layer.py --n 1000,10000 --t 1,2048 [--backends triton,cuda]
    PYTHONPATH=. TRITON_INTERPRET=1 python3 bench/profile_layer.py --device cpu --n 50 --t 3 --d-in 64 --d-out 48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import _random_library, backend_context, backend_ops, env_info  # noqa: E402
from lag_triton.routing import RoutingConfig, route_and_apply  # noqa: E402


def profile_case(ops, device, n, t, d_in, d_out, rank, k, top_m, dtype, iters):
    gen = torch.Generator(device=device).manual_seed(0)
    protos, a_star, b_star = _random_library(n, rank, d_in, d_out, dtype, device, gen)
    x = torch.randn(t, d_in, device=device, generator=gen).to(dtype)
    y = torch.zeros(t, d_out, device=device, dtype=dtype)
    cfg = RoutingConfig(k=k, top_m=top_m)

    def call():
        route_and_apply(x, y, a_star, b_star, protos, cfg, ops)

    for _ in range(3):  # compile and warm up outside the measurement
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    host_us = (time.perf_counter() - t0) / iters * 1e6

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = []
    for ev in prof.key_averages():
        # self time: a kernel's own; an operator's (aten::mm) is its kernels', listed once as they are
        device_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if device.type == "cuda" and device_us <= 0:
            continue
        if device.type != "cuda" and ev.self_cpu_time_total <= 0:
            continue
        kernels.append(
            {
                "name": ev.key[:90],
                "calls_per_iter": ev.count / iters,
                "device_us_per_iter": device_us / iters,
                "self_cpu_us_per_iter": ev.self_cpu_time_total / iters,
            }
        )
    kernels.sort(key=lambda r: -(r["device_us_per_iter"] or r["self_cpu_us_per_iter"]))
    return {"host_us_per_call": host_us, "kernels": kernels[:15]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default="triton,cuda", help="comma list; also triton-fold (folded split reductions)")
    p.add_argument("--n", default="1000,10000")
    p.add_argument("--t", default="1,32,2048")
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--d-out", type=int, default=8192)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--top-m", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    rows = []
    for backend in a.backends.split(","):
        ops, why = backend_ops(backend, device)
        if ops is None:
            print(f"{backend}: {why}")
            continue
        for n in map(int, a.n.split(",")):
            for t in map(int, a.t.split(",")):
                with backend_context(backend):
                    r = profile_case(ops, device, n, t, a.d_in, a.d_out, a.rank, min(a.k, n), a.top_m, dtype, a.iters)
                r.update(backend=backend, N=n, T=t, d_in=a.d_in, d_out=a.d_out)
                rows.append(r)
                print(f"\n{backend}  N={n} T={t} {a.d_in}->{a.d_out}: host {r['host_us_per_call']:.1f} us/call")
                for kr in r["kernels"]:
                    print(
                        f"  {kr['device_us_per_iter']:9.1f} us dev  {kr['self_cpu_us_per_iter']:9.1f} us cpu"
                        f"  x{kr['calls_per_iter']:.0f}  {kr['name']}"
                    )
    if a.out:
        a.out.write_text(json.dumps({"env": env_info(device), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()

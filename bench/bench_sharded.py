"""Sharded routing overhead per layer: P ranks holding N adapters each vs one process holding N.

    python bench/bench_sharded.py --world 2 --n-per-rank 256 --tokens 16

On CPU over gloo (ranks are forked processes on this machine; on GPUs use NCCL and one process
per device). Each rank routes its own T tokens through one d_in -> d_out layer with the same
settings three ways: one process with N adapters (the same adapters per rank: the cost a shard
would have alone), one process with all P*N, and sharded over the P ranks (P*N in all). Times are
the median wall time of one layer call; beside them, the bytes the sharded call sent between ranks
(measured, per phase, all ranks together) and the formula of ``lag_triton.sharding.traffic``.
Writes bench/results/sharded-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lag_triton
from lag_triton import Library
from lag_triton.library import ModuleWeights
from lag_triton.sharding import ShardedRoute, shard_bounds, traffic


def random_library(n: int, d_in: int, d_out: int, rank: int, seed: int = 0) -> Library:
    """n adapters with orthonormal A* rows (as alignment gives), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(n, d_in, rank, generator=g)).Q.transpose(1, 2).contiguous()
    b = torch.randn(n, d_out, rank, generator=g) * torch.linspace(1.0, 0.1, rank)
    weights = ModuleWeights(
        a_star=a,
        b_star=b,
        prototypes=a[:, 0].clone(),
        adapter_ids=torch.arange(n),
        ranks=torch.full((n,), rank, dtype=torch.int32),
    )
    return Library([f"d{i}" for i in range(n)], {"0": weights})


def _time(fn, reps: int, group=None) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group)  # start together: a rank's wait for the others counts, not its head start
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _rank_main(rank: int, world: int, args, store: str, out: str) -> None:
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    full = random_library(world * args.n_per_rank, args.d_in, args.d_out, args.rank)
    own = Library(
        full.names[: args.n_per_rank],
        {
            "0": ModuleWeights(
                **{
                    f: getattr(full.modules["0"], f)[: args.n_per_rank]
                    for f in ("a_star", "b_star", "prototypes", "adapter_ids", "ranks")
                }
            )
        },
    )
    x = torch.randn(args.tokens, args.d_in, generator=torch.Generator().manual_seed(rank))
    settings = dict(k=args.k, top_m=args.top_m, router=args.router)
    row = {}
    with torch.no_grad():
        for label, lib, group in (
            ("one_process_n", own, None),
            ("one_process_pn", full, None),
            ("sharded_pn", full, dist.group.WORLD),
        ):
            torch.manual_seed(0)
            layer = nn.Sequential(nn.Linear(args.d_in, args.d_out))
            lag_triton.patch(layer, lib, process_group=group, **settings)
            row[f"{label}_ms"] = _time(functools.partial(layer, x), args.reps, group)
            if group is not None:
                route = layer[0].routes[0]
                assert isinstance(route, ShardedRoute)
                with lag_triton.trace(layer) as tr:
                    layer(x)
                rows = tr.selections["0"]  # ids are rows here (adapter_ids = arange)
                owner = torch.bucketize(rows, torch.tensor(shard_bounds(route.n_total, world)), right=True) - 1
                sent = torch.tensor(
                    [route.last_traffic[p] for p in sorted(route.last_traffic)] + [int((owner != rank).sum())]
                )
                dist.all_reduce(sent)
                row["bytes_measured"] = dict(zip(sorted(route.last_traffic), sent[:-1].tolist()))
                n_rank = [
                    shard_bounds(route.n_total, world)[p + 1] - shard_bounds(route.n_total, world)[p]
                    for p in range(world)
                ]
                cands = [min(route.config.sizes(route.n_total)[0 if args.router == "lag" else 1], n) for n in n_rank]
                row["bytes_formula"] = traffic(
                    tokens=[args.tokens] * world,
                    d_in=args.d_in,
                    d_out=args.d_out,
                    itemsize=4,
                    cands=cands,
                    router=args.router,
                    remote_picks=int(sent[-1]),
                )
    times = [torch.tensor([row[k] for k in sorted(row) if k.endswith("_ms")]) for _ in range(world)]
    dist.all_gather(times, torch.tensor([row[k] for k in sorted(row) if k.endswith("_ms")]))
    if rank == 0:
        keys = sorted(k for k in row if k.endswith("_ms"))
        row.update({k: round(max(float(t[i]) for t in times), 3) for i, k in enumerate(keys)})  # slowest rank
        Path(out).write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--n-per-rank", type=int, default=256)
    p.add_argument("--tokens", type=int, default=16, help="tokens per rank")
    p.add_argument("--d-in", type=int, default=3072)
    p.add_argument("--d-out", type=int, default=8192)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--router", default="lag", choices=("lag", "arrow", "spectr"))
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--top-m", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / f".sharded-{os.getpid()}"
    try:
        mp.start_processes(
            _rank_main,
            args=(args.world, args, f"{tmp}.store", f"{tmp}.json"),
            nprocs=args.world,
            join=True,
            start_method="fork",
        )
        result = json.loads(Path(f"{tmp}.json").read_text())
    finally:
        for suffix in (".store", ".json"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": "cpu",
        "comm": "gloo",
        "world": args.world,
        "n_per_rank": args.n_per_rank,
        "tokens_per_rank": args.tokens,
        "d_in": args.d_in,
        "d_out": args.d_out,
        "rank": args.rank,
        "router": args.router,
        "k": args.k,
        "top_m": args.top_m,
        "dtype": "float32",
        "threads_per_rank": args.threads,
        "reps": args.reps,
        **result,
        "note": "median ms of one layer call, the slowest rank's; bytes over all ranks for one call",
    }
    print(json.dumps(row, indent=2))
    stem = args.stem or f"sharded-cpu-{row['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()

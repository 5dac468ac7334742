"""Library build: throughput (adapters/s) and peak memory, streaming into the output file.

    python bench/bench_build.py --adapters 10000 --layers 4 --workdir /tmp/lag_build --cold

Writes synthetic PEFT folders (adapter_config.json + adapter_model.safetensors, the layout
``save_pretrained`` produces; Llama-3.2-3B MLP shapes, rank 6, bf16 by default) once, then
builds the library with ``lag_triton.library.build_library`` (or, with ``--in-memory``, with
``Library.from_peft`` + ``save``) and records in bench/results/build-<mode>-<date>-n<N>.json:
wall time, adapters/s, the peak RSS of the build process and of its worker processes (sampled
from /proc every 50 ms, summed over the process tree: the workers are children of the
multiprocessing fork server, a child of the build process), the bytes in and out, the disk space
and the load average. ``--cold`` evicts the adapter files from the page cache first
(posix_fadvise DONTNEED), so the build reads them from disk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SHAPES = {"gate_proj": "hd", "up_proj": "hd", "down_proj": "dh"}  # (d_in, d_out) as hidden/intermediate


def write_adapters(
    root: Path, n: int, layers: int, hidden: int, intermediate: int, rank: int, dtype: torch.dtype
) -> list[Path]:
    """N PEFT folders with random factors (seeded per adapter); existing complete folders are kept."""
    size = {"h": hidden, "d": intermediate}
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(_SHAPES),
        "bias": "none",
        "base_model_name_or_path": "synthetic/llama-3.2-3b-shape",
    }
    paths = []
    for i in range(n):
        path = root / f"adapter{i:05d}"
        paths.append(path)
        if (path / "adapter_config.json").exists():  # written last: the folder is complete
            continue
        path.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for proj, (i_in, i_out) in _SHAPES.items():
                d_in, d_out = size[i_in], size[i_out]
                key = f"base_model.model.model.layers.{layer}.mlp.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).to(dtype)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config))
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the adapter files from the page cache (only these files), so the build reads the disk."""
    for p in paths:
        fd = os.open(p / "adapter_model.safetensors", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class TreeRss:
    """Peak resident memory of this process plus its descendants, sampled from /proc."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak_total, self.peak_self, self.peak_child = period, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    @staticmethod
    def _children(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            try:
                with open(f"/proc/{p}/task/{p}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
        return out

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            mine = self._rss(me)
            kids = [self._rss(c) for c in self._children(me)]
            self.peak_self = max(self.peak_self, mine)
            self.peak_child = max([self.peak_child] + kids)
            self.peak_total = max(self.peak_total, mine + sum(kids))
            self._stop.wait(self.period)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def run(args) -> dict:
    from lag_triton.library import Library, build_library

    t0 = time.perf_counter()
    paths = write_adapters(
        args.workdir / "adapters",
        args.adapters,
        args.layers,
        args.hidden,
        args.intermediate,
        args.rank,
        _DTYPES[args.adapter_dtype],
    )
    t_write = time.perf_counter() - t0
    bytes_in = sum((p / "adapter_model.safetensors").stat().st_size for p in paths)
    if args.cold:
        evict(paths)
    output = args.workdir / "library.safetensors"
    disk_free = shutil.disk_usage(args.workdir).free
    rss_before = TreeRss._rss(os.getpid())
    load_before = os.getloadavg()[0]  # other work on the machine slows the build: recorded beside it
    with TreeRss() as rss:
        t0 = time.perf_counter()
        if args.in_memory:
            lib = Library.from_peft(
                paths, dtype=_DTYPES[args.library_dtype], workers=args.workers, progress=not args.quiet
            )
            lib.save(output)
            del lib
        else:
            build_library(
                paths, output, dtype=_DTYPES[args.library_dtype], workers=args.workers, progress=not args.quiet
            )
        t_build = time.perf_counter() - t0
    bytes_out = output.stat().st_size
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mode": "in-memory" if args.in_memory else "streaming",
        "workers": args.workers,
        "adapters": args.adapters,
        "layers": args.layers,
        "modules": 3 * args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "rank": args.rank,
        "adapter_dtype": args.adapter_dtype,
        "library_dtype": args.library_dtype,
        "cold_cache": args.cold,
        "adapter_bytes": bytes_in,
        "library_bytes": bytes_out,
        "disk_free_before_build": disk_free,
        "write_adapters_s": round(t_write, 2),
        "build_s": round(t_build, 2),
        "adapters_per_s": round(args.adapters / t_build, 2),
        "rss_before_build_mib": _mib(rss_before),
        "peak_rss_build_process_mib": _mib(rss.peak_self),
        "peak_rss_largest_worker_mib": _mib(rss.peak_child),
        "peak_rss_process_tree_mib": _mib(rss.peak_total),
        "ru_maxrss_self_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if not args.keep:
        output.unlink()
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--layers", type=int, default=4, help="MLP layers per adapter (3 modules each)")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--adapter-dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--library-dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument(
        "--workers", type=int, default=None, help="alignment processes (default: one per core; in memory: none)"
    )
    p.add_argument("--in-memory", action="store_true", help="Library.from_peft + save (the old way), to compare")
    p.add_argument("--cold", action="store_true", help="evict the adapter files from the page cache first")
    p.add_argument("--keep", action="store_true", help="keep the library file (default: delete it)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lag_build"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--stem", default=None, help="results file name (default build-<mode>-<date>-n<N>)")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    row = run(args)
    print(json.dumps(row, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"build-{row['mode']}-{row['date']}-n{args.adapters}"
    (args.out / f"{stem}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()

"""Shared benchmark harness: backends, cost model, results JSON, kernel tables.

Timing (CUDA-graph replay with an L2 flush by a read, eager beside it): ``bench/timing.py``.

Cost model (docs/design.md §2): each op is charged the bytes it must move at least once
(``kernel_bytes``) and the FLOPs it must do (``kernel_flops``). ``floor_ms`` = max(bytes / copy
bandwidth, FLOPs / bf16 GEMM rate), both measured at the start of the results file (a
device-to-device copy kernel, bytes read + written / time; an 8192^3 bf16 matmul on CUDA, a small
fp32 one on CPU), timed like the cells, the faster of graph and eager taken; ``bound`` says which
term is larger, ``pct_floor`` = floor / ms.

Baselines measured in the same run: ``plain`` and ``plain-compile`` (``bench/baselines.py``).
Random libraries are built like real ones: unit-norm A* rows, prototypes = A*[:, 0] (docs/design.md §1).

Kernel table rows are long-format dicts (one per op x shape x N x T x backend), appended to a
results JSON that is rewritten after every row, so a stage killed by ``timeout`` keeps what it
measured. ``bench/report.py`` turns the JSON into markdown and a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` works without PYTHONPATH=.
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from lag_triton.kernels import use_triton_interpreter_without_gpu  # noqa: E402

use_triton_interpreter_without_gpu()  # before lag_triton.kernels.triton loads

from bench.baselines import PLAIN, plain_arrow_topk, plain_spectr_rerank, probe_fp32_out  # noqa: E402
from bench.timing import (  # noqa: E402
    cuda_context_broken,
    free_memory,
    measure_copy_bandwidth,
    measure_gemm_rate,
    short_error,
    sync,
    time_cell,
)

# "plain" = the obvious user code (written below), "plain-compile" = the same under torch.compile.
# The compiled baseline comes last in each cell: its compile time must not delay the others under a budget.
BACKENDS = ("plain", "torch", "triton", "cuda", "plain-compile")
#: backend variants a run can ask for by name (not in the default list), opt-in paths until measured:
#: "triton-fold" is the Triton backend with its split reductions folded into one launch
#: (LAG_TRITON_FOLD_SPLITS), "triton-filter" with large libraries scored by the filtering GEMM
#: (LAG_TRITON_FILTER_GEMM: the [T, N] scores never written)
VARIANTS = {"triton-fold": "triton", "triton-filter": "triton"}
PLAIN_BACKENDS = ("plain", "plain-compile")
KERNEL_OPS = ("layer", "arrow_topk", "spectr_rerank", "lora_apply")
# Llama-3.2-3B MLP shapes: gate/up 3072 -> 8192, down 8192 -> 3072.
GPU_SHAPES = ((3072, 8192), (8192, 3072))
TINY_SHAPES = ((64, 128), (128, 64))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------
def log(*args) -> None:
    print(*args, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


#: what a first plain-compile cell is assumed to take until one has (a cold torch.compile of the layer)
COLD_COMPILE_S = 30.0


class Budget:
    """Soft wall-clock budget: work is skipped (and the skip recorded) once it is spent."""

    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left; without a budget (None) inf, a budget of 0 or less is spent from the start."""
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0


# ----------------------------------------------------------------------------------------------
# environment / results file
# ----------------------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001
        return None


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:  # noqa: BLE001
        return None


def env_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "driver": _nvidia_smi("driver_version") if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "host_cpus": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
    return info


def default_results_path(device: torch.device) -> Path:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return REPO_ROOT / "bench" / "results" / f"{slug(card)}-{_dt.date.today().isoformat()}.json"


class Results:
    """The results JSON: env + copy bandwidth + GEMM rate + rows; rewritten (atomically) after every change."""

    def __init__(self, path: str | Path, device: torch.device):
        self.path = Path(path)
        self.device = device
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {"env": env_info(device), "copy_bandwidth": None, "rows": [], "notes": []}
        self.save()

    @property
    def copy_gbps(self) -> float:
        return self.data["copy_bandwidth"]["gbps"]

    def ensure_copy_bandwidth(self) -> float:
        if not self.data.get("copy_bandwidth"):
            self.data["copy_bandwidth"] = measure_copy_bandwidth(self.device)
            log(f"copy bandwidth ({self.device}): {self.copy_gbps:.1f} GB/s (read+write)")
            self.save()
        return self.copy_gbps

    def ensure_gemm_rate(self) -> float:
        """The matmul rate of the compute floor, measured once per results file (``gemm_tflops``)."""
        if not self.data.get("gemm_tflops"):
            self.data["gemm"] = measure_gemm_rate(self.device)
            self.data["gemm_tflops"] = self.data["gemm"]["tflops"]
            log(
                f"GEMM rate ({self.device}, {self.data['gemm']['dtype']} {self.data['gemm']['m']}^3): "
                f"{self.data['gemm_tflops']:.2f} TFLOP/s"
            )
            self.save()
        return self.data["gemm_tflops"]

    def add(self, row: dict) -> dict:
        self.data["rows"].append(row)
        self.save()
        return row

    def note(self, text: str) -> None:
        log("note:", text)
        self.data.setdefault("notes", []).append(text)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
def backend_context(name: str):
    """The context a backend (variant) ``name`` runs its calls in, capture and warm-up included."""
    if name in ("triton-fold", "triton-filter"):
        from lag_triton.kernels.triton._common import filter_gemm, fold_splits

        return (fold_splits if name == "triton-fold" else filter_gemm).forced(True)
    return contextlib.nullcontext()


def backend_ops(name: str, device: torch.device):
    """(lag_triton.kernels.Ops, None) or (None, "unavailable: <reason>") for one of our backends or VARIANTS."""
    from lag_triton.kernels import get_ops, resolve_backend

    try:
        resolved = resolve_backend(VARIANTS.get(name, name), device)
        ops = get_ops(resolved)
        _ = ops.module  # import it now: a backend that fails to import shows up as unavailable
        return ops, None
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable: {short_error(exc)}"


@functools.cache
def _routing_config(k: int, top_m: int):
    from lag_triton.routing import RoutingConfig

    return RoutingConfig(k=k, top_m=top_m)


def ours_impl(ops) -> dict:
    """Our backend's ops with the plain functions' signatures (op name -> callable)."""
    from lag_triton.routing import route_and_apply

    def spectr_rerank(x, a_star, cand, top_m):
        return ops.spectr_rerank(x, a_star, cand, top_m, "softmax", 1.0, None)

    def layer(x, y, a_star, b_star, prototypes, k, top_m, allowed=None, scope=None):
        return route_and_apply(x, y, a_star, b_star, prototypes, _routing_config(k, top_m), ops, allowed, scope)

    return {
        "arrow_topk": ops.arrow_topk,
        "spectr_rerank": spectr_rerank,
        "lora_apply": ops.lora_apply,
        "layer": layer,
        "prepare_b_star": ops.prepare_b_star,
    }


def resolve_backends(names: list[str], device: torch.device) -> dict:
    """name -> (op name -> callable, None) or (None, "unavailable: <reason>")."""
    out = {}
    for name in names:
        if name == "plain":
            out[name] = (PLAIN, None)
        elif name == "plain-compile":  # compiled per cell (KernelRun.op_callable); slow to compile on CPU
            out[name] = (PLAIN, None) if device.type == "cuda" else (None, "unavailable: cpu")
        else:
            ops, why = backend_ops(name, device)
            out[name] = (ours_impl(ops) if ops else None, why)
        if out[name][1]:
            log(f"backend {name}: {out[name][1]}")
    return out


# ----------------------------------------------------------------------------------------------
# kernel tables: flags, sweep, data, cost model
# ----------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small sweep (smoke test)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument(
        "--out", default=None, help="results JSON (appended to if it exists); default bench/results/<card>-<date>.json"
    )
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma list out of {','.join(BACKENDS + tuple(VARIANTS))}"
    )
    p.add_argument(
        "--time-budget", type=float, default=None, help="seconds; remaining rows are skipped (and noted) once spent"
    )
    p.add_argument("--seed", type=int, default=0)


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--n", default=None, help="comma list of adapter counts N (default 1000,10000,100000)")
    p.add_argument("--t", default=None, help="comma list of token counts T (default 1,32,2048)")
    p.add_argument("--shapes", default=None, help="comma list of d_in:d_out (default 3072:8192,8192:3072)")
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--top-m", type=int, default=1)
    p.add_argument("--rotate", type=int, default=4, help="input sets cycled per measurement (one CUDA graph each)")
    p.add_argument(
        "--prompt-topics",
        type=int,
        default=0,
        help="0: i.i.d. random token rows (routing spread over the library); K > 0: each row leans "
        "towards one of K adapters, in contiguous runs (a prompt about K documents), so "
        "routing concentrates on K adapters",
    )
    p.add_argument(
        "--scope-fraction",
        type=float,
        default=0.0,
        help="0: no scope; F in (0, 1]: arrow_topk and the layer run under a lag_triton scope of "
        "min(T, 8) batch rows, each allowing a random fraction F of the adapters (the cost of "
        "a scope: compare with F = 0 on the same shapes)",
    )
    p.add_argument("--warmup-ms", type=float, default=5)
    p.add_argument("--rep-ms", type=float, default=20)
    p.add_argument(
        "--ref-max-tn",
        type=float,
        default=2048 * 10000,
        help="run the torch reference backend only where T*N <= this (it is slow by design)",
    )
    p.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="seconds of torch.compile time (plain-compile recompiles per cell) after which "
        "plain-compile cells are skipped; default a third of --time-budget, else unlimited",
    )


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def kernel_sweep(args) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(shapes, Ns, Ts) from the flags; CPU runs default to tiny sizes (the Triton interpreter is slow)."""
    cpu = torch.device(args.device).type != "cuda"
    if cpu:
        shapes, ns, ts = list(TINY_SHAPES), [64, 512], [1, 8]
        if args.quick:
            shapes, ns, ts = shapes[:1], [64], [1, 8]
    elif args.quick:
        shapes, ns, ts = list(GPU_SHAPES[:1]), [1000, 100000], [1, 2048]
    else:
        shapes, ns, ts = list(GPU_SHAPES), [1000, 10000, 100000], [1, 32, 2048]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    if args.n:
        ns = _ints(args.n)
    if args.t:
        ts = _ints(args.t)
    return shapes, ns, ts


def _random_rows(shape, dtype, device, gen, unit=False, scale=1.0) -> torch.Tensor:
    """Gaussian tensor (unit-norm along the last dim if ``unit``, else x scale), built in chunks (low peak)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    chunk = max(1, (1 << 26) // max(1, math.prod(shape[1:])))
    for s in range(0, shape[0], chunk):
        part = out[s : s + chunk]
        v = torch.randn(part.shape, generator=gen, device=device, dtype=torch.float32)
        part.copy_(v / v.norm(dim=-1, keepdim=True) if unit else v * scale)
    return out


def _random_library(n, r, d_in, d_out, dtype, device, gen, need_a=True, need_b=True):
    """(prototypes, A*, B*) built like a real library (docs/design.md §1): A* rows unit-norm (random rows in
    d_in >> r dimensions are near-orthogonal, like the orthonormal V^T), prototypes = A*[:, 0] (a
    contiguous copy, as Library stores them), small B*. Without A* (need_a False) the prototypes are
    drawn directly as unit rows: the same distribution."""
    a_star = _random_rows((n, r, d_in), dtype, device, gen, unit=True) if need_a else None
    protos = a_star[:, 0].contiguous() if need_a else _random_rows((n, d_in), dtype, device, gen, unit=True)
    b_star = _random_rows((n, d_out, r), dtype, device, gen, scale=0.02) if need_b else None
    return protos, a_star, b_star


def _topic_directions(protos, t, topics, strength=8.0):
    """[t, d_in] fp32 offsets that make row i lean towards adapter c(i): `topics` adapters spread over the
    library, in contiguous runs of rows. Adds `strength` x the unit prototype of c(i): Arrow ranks it first
    (random rows score ~N(0, 1) against unit prototypes) and, the prototype being A*_c(i)[0], SpectR's
    norm prefers it too."""
    n = protos.shape[0]
    which = (torch.arange(t, device=protos.device) * topics // t) * max(1, n // topics) % n
    p = protos[which].float()
    return strength * p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def kernel_bytes(op: str, *, n, r, d_in, d_out, t, k, m, elt, uniq_cand, uniq_sel) -> int:
    """Bytes an op must move at least once (activations elt bytes/elem; idx int32, w/z/scores fp32)."""
    x_in = t * d_in * elt
    y_io = 2 * t * d_out * elt  # y += ... reads and writes y
    sel_wz = t * m * (4 + 4 + 4 * r)
    if op == "arrow_topk":
        return n * d_in * elt + x_in + t * k * 8
    if op == "spectr_rerank":
        return uniq_cand * r * d_in * elt + x_in + t * k * 4 + sel_wz
    if op == "lora_apply":
        return uniq_sel * d_out * r * elt + y_io + sel_wz
    if op == "layer":
        return n * d_in * elt + uniq_cand * r * d_in * elt + uniq_sel * d_out * r * elt + x_in + y_io
    raise ValueError(op)


def kernel_flops(op: str, *, n, r, d_in, d_out, t, k, m) -> int:
    """FLOPs an op must do (2 per multiply-add): Arrow scores T x N prototypes, SpectR projects T x k
    candidates onto their r A* rows, the apply multiplies T x m chosen B* by z; the layer does all three."""
    flops = {"arrow_topk": 2 * t * n * d_in, "spectr_rerank": 2 * t * k * r * d_in, "lora_apply": 2 * t * m * r * d_out}
    if op == "layer":
        return sum(flops.values())
    if op not in flops:
        raise ValueError(op)
    return flops[op]


def roofline(nbytes: int, flops: int, copy_gbps: float, gemm_tflops: float | None) -> dict:
    """floor_ms = max(bytes / copy bandwidth, FLOPs / GEMM rate), and which term it is (``bound``)."""
    mem = nbytes / (copy_gbps * 1e9) * 1e3
    comp = flops / (gemm_tflops * 1e12) * 1e3 if gemm_tflops else 0.0
    return {
        "floor_mem_ms": mem,
        "floor_compute_ms": comp,
        "floor_ms": max(mem, comp),
        "bound": "memory" if mem >= comp else "compute",
    }


@dataclass
class Cell:
    """One (shape, N, T) point of the sweep: the library, the rotated input sets, what they route to."""

    d_in: int
    d_out: int
    n: int
    t: int
    k: int
    m: int
    protos: torch.Tensor | None = None
    a_star: torch.Tensor | None = None
    b_star: torch.Tensor | None = None
    sets: list = field(default_factory=list)  # dicts: x, y, cand (+ sel, w, z when A* exists)
    uniq_cand: int = 0
    uniq_sel: int = 0
    ref_sel: torch.Tensor | None = None  # the torch reference's layer selections, once measured
    allowed: torch.Tensor | None = None  # --scope-fraction: [S, N] bool, the adapters each scope row may use
    scope: torch.Tensor | None = None  # [T] int32: the scope row of each token (contiguous runs, like batch rows)


def bind(op: str, fn: Callable, cell: Cell) -> Callable[[dict], object]:
    """The timed call of ``fn`` (one backend's implementation of ``op``) on one input set of ``cell``."""
    if op == "arrow_topk":
        return lambda s: fn(s["x"], cell.protos, cell.k, cell.allowed, cell.scope)
    if op == "spectr_rerank":
        return lambda s: fn(s["x"], cell.a_star, s["cand"], cell.m)
    if op == "lora_apply":
        return lambda s: fn(s["y"], cell.b_star, s["sel"], s["w"], s["z"])
    if op == "layer":
        return lambda s: fn(
            s["x"], s["y"], cell.a_star, cell.b_star, cell.protos, cell.k, cell.m, cell.allowed, cell.scope
        )
    raise ValueError(op)


# ----------------------------------------------------------------------------------------------
# kernel tables: the run
# ----------------------------------------------------------------------------------------------
def run_kernel_tables(ops_to_run: Iterable[str], argv=None, description: str = "") -> Path:
    """Benchmark ``ops_to_run`` (subset of KERNEL_OPS) over the sweep; returns the results path."""
    p = argparse.ArgumentParser(description=description)
    add_kernel_args(p)
    args = p.parse_args(argv)
    return KernelRun(args).run([o for o in KERNEL_OPS if o in set(ops_to_run)])


class KernelRun:
    """One invocation of the kernel tables: flags, device, results file, backends, the sweep loop."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.budget = Budget(args.time_budget)
        self.compile_budget = args.compile_budget
        if self.compile_budget is None and args.time_budget is not None:
            self.compile_budget = args.time_budget / 3
        self.compile_estimate = COLD_COMPILE_S  # seconds one plain-compile cell takes: the last one's
        self.compile_spent = 0.0
        self.skipped = 0
        self.results = Results(args.out or default_results_path(self.device), self.device)
        self.copy_gbps = self.results.ensure_copy_bandwidth()
        self.gemm_tflops = self.results.ensure_gemm_rate()
        self.wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        self.impls = resolve_backends(self.wanted, self.device)
        probe_fp32_out(self.device, self.dtype)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(args.seed)

    def run(self, ops: list[str]) -> Path:
        shapes, ns, ts = kernel_sweep(self.args)
        log(
            f"kernel tables {ops} on {self.device} {self.args.dtype}: shapes={shapes} N={ns} T={ts} "
            f"backends={self.wanted}"
        )
        # The per-layer table first (over the whole sweep), then the per-kernel tables: a time budget
        # that runs out cuts the least important rows.
        passes = [["layer"], [o for o in ops if o != "layer"]] if "layer" in ops else [ops]
        for pass_ops in [p for p in passes if p]:
            for shape in shapes:
                for n in ns:
                    self.run_library(pass_ops, shape, n, ts)
        if self.skipped:
            self.results.note(
                f"kernel tables {ops}: {self.skipped} (op, N, T) cells skipped, "
                f"time budget {self.args.time_budget}s spent"
            )
        log(f"wrote {self.results.path} ({self.budget.elapsed():.1f}s)")
        return self.results.path

    def run_library(self, ops: list[str], shape: tuple[int, int], n: int, ts: list[int]) -> None:
        """One random library (shape, N), then every T over it."""
        d_in, d_out = shape
        k, m = min(self.args.k, n), min(self.args.top_m, self.args.k, n)
        if self.budget.expired():
            self.skipped += len(ts) * len(ops)
            return
        need_a = any(o in ("layer", "spectr_rerank", "lora_apply") for o in ops)  # apply needs real sel/z
        need_b = any(o in ("layer", "lora_apply") for o in ops)
        try:
            lib = _random_library(n, self.args.rank, d_in, d_out, self.dtype, self.device, self.gen, need_a, need_b)
        except Exception as exc:  # noqa: BLE001 (OOM at the largest N)
            for t in ts:
                for op in ops:
                    for b in self.wanted:
                        self.record(op, Cell(d_in, d_out, n, t, k, m), b, f"error: building data: {short_error(exc)}")
            free_memory(self.device)
            return
        for t in ts:
            if self.budget.expired():
                self.skipped += len(ops)
                continue
            cell = self.make_cell(Cell(d_in, d_out, n, t, k, m, *lib))
            for op in ops:
                self.run_op(op, cell)
            del cell
            free_memory(self.device)
        del lib
        free_memory(self.device)

    def make_cell(self, cell: Cell) -> Cell:
        """Rotated input sets: x, y and the routing results (by the plain code) the later ops consume."""
        for _ in range(max(1, self.args.rotate)):
            x = torch.randn(cell.t, cell.d_in, generator=self.gen, device=self.device, dtype=torch.float32)
            if self.args.prompt_topics > 0:
                x += _topic_directions(cell.protos, cell.t, self.args.prompt_topics)
            x = x.to(self.dtype)
            y = torch.randn(cell.t, cell.d_out, generator=self.gen, device=self.device, dtype=torch.float32)
            s = {"x": x, "y": y.to(self.dtype), "cand": plain_arrow_topk(x, cell.protos, cell.k)[0]}
            if cell.a_star is not None:
                s["sel"], s["w"], s["z"] = plain_spectr_rerank(x, cell.a_star, s["cand"], cell.m)
            cell.sets.append(s)
        if self.args.scope_fraction > 0:
            rows = min(cell.t, 8)
            cell.allowed = torch.rand(rows, cell.n, generator=self.gen, device=self.device) < self.args.scope_fraction
            cell.scope = (torch.arange(cell.t, device=self.device) * rows // cell.t).to(torch.int32)
        cell.uniq_cand = int(torch.unique(cell.sets[0]["cand"]).numel())
        cell.uniq_sel = int(torch.unique(cell.sets[0]["sel"]).numel()) if "sel" in cell.sets[0] else 0
        return cell

    def cost(self, op: str, cell: Cell) -> dict:
        """Bytes, FLOPs and the floor they set for ``op`` on ``cell``."""
        dims = dict(n=cell.n, r=self.args.rank, d_in=cell.d_in, d_out=cell.d_out, t=cell.t, k=cell.k, m=cell.m)
        nbytes = kernel_bytes(
            op, **dims, elt=torch.finfo(self.dtype).bits // 8, uniq_cand=cell.uniq_cand, uniq_sel=cell.uniq_sel
        )
        flops = kernel_flops(op, **dims)
        return {
            "bytes": nbytes,
            "flops": flops,
            **roofline(nbytes, flops, self.copy_gbps, self.gemm_tflops),
            "unique_candidates": cell.uniq_cand,
            "unique_selected": cell.uniq_sel,
        }

    def run_op(self, op: str, cell: Cell) -> None:
        cost = self.cost(op, cell)
        for b in sorted(self.wanted, key=lambda b: b != "torch"):  # the reference first: the others' picks match it
            why = self.skip_reason(b, cell)
            if why:
                self.record(op, cell, b, why, cost)
            else:
                self.run_backend(op, b, cell, cost)

    def skip_reason(self, b: str, cell: Cell) -> str | None:
        why = self.impls[b][1]
        if not why and b == "torch" and cell.t * cell.n > self.args.ref_max_tn:
            why = f"skipped: reference not run above T*N={self.args.ref_max_tn:.3g} (slow by design)"
        if not why and b == "plain-compile" and self.compile_budget is not None:
            if self.compile_spent >= self.compile_budget:
                why = f"skipped: compile budget {self.compile_budget:.0f}s spent"
            elif self.budget.left() < self.compile_estimate:  # a compile the stage's timeout would kill midway
                why = f"skipped: {self.budget.left():.0f}s left, a compile takes ~{self.compile_estimate:.0f}s"
        return why

    def op_callable(self, op: str, b: str) -> Callable:
        fn = self.impls[b][0][op]
        if b == "plain-compile":
            torch._dynamo.reset()  # compile afresh per cell: dynamic=False specialises, no recompile limit
            fn = torch.compile(fn, dynamic=False)
        return fn

    def run_backend(self, op: str, b: str, cell: Cell, cost: dict) -> None:
        with backend_context(b):
            self._run_backend(op, b, cell, cost)

    def _run_backend(self, op: str, b: str, cell: Cell, cost: dict) -> None:
        extra, shared = {}, cell  # the reference's picks go on the cell every backend sees
        try:
            prepare = self.impls[b][0].get("prepare_b_star")
            if prepare is not None and cell.b_star is not None:  # B* in the layout patch() gives this backend
                cell = dataclasses.replace(cell, b_star=prepare(cell.b_star))
            call = bind(op, self.op_callable(op, b), cell)
            extra.update(self.first_call(op, b, call, cell, shared))
            timing = time_cell(
                [functools.partial(call, s) for s in cell.sets], self.device, self.args.warmup_ms, self.args.rep_ms
            )
            self.record(op, cell, b, "ok", cost, {**timing, **extra})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self.record(op, cell, b, f"error: {short_error(exc)}", cost, extra)
            if cuda_context_broken(self.device):
                self.results.note(f"CUDA context broken after {b} {op} N={cell.n} T={cell.t}; stopping this stage")
                sys.exit(3)
            free_memory(self.device)

    def first_call(self, op: str, b: str, call: Callable, cell: Cell, shared: Cell) -> dict:
        """One untimed call on a copy of input set 0 (compiles plain-compile: ``compile_s``); for the layer,
        the share of tokens whose selections match the torch reference's (``sel_match_ref``), whose picks
        are kept on ``shared``, the cell before any backend's copy of it."""
        t0 = time.perf_counter()
        out = call(dict(cell.sets[0], y=cell.sets[0]["y"].clone()))
        sync(self.device)
        extra = {}
        if b == "plain-compile":
            extra["compile_s"] = time.perf_counter() - t0
            self.compile_spent += extra["compile_s"]
            self.compile_estimate = extra["compile_s"]
        if op == "layer":
            sel = out.to(torch.int32)
            if b == "torch":
                shared.ref_sel = sel
            elif shared.ref_sel is not None and shared.ref_sel.shape == sel.shape:
                extra["sel_match_ref"] = float((shared.ref_sel == sel).all(dim=1).float().mean())
        return extra

    def record(
        self, op: str, cell: Cell, backend: str, status: str, cost: dict | None = None, extra: dict | None = None
    ) -> dict:
        a = self.args
        row = {
            "section": "kernel",
            "op": op,
            "shape": f"{cell.d_in}->{cell.d_out}",
            "d_in": cell.d_in,
            "d_out": cell.d_out,
            "N": cell.n,
            "T": cell.t,
            "k": cell.k,
            "top_m": cell.m,
            "rank": a.rank,
            "dtype": a.dtype,
            "backend": backend,
            "status": status,
            "ms": None,
            "eager_ms": None,
            "timing": None,
        }
        if a.prompt_topics:
            row["prompt_topics"] = a.prompt_topics
        if a.scope_fraction > 0:
            row["scope_fraction"] = a.scope_fraction
        row.update(cost or {})
        row.update(extra or {})
        if row["ms"] and row.get("bytes") is not None:
            row["gbps"] = row["bytes"] / (row["ms"] * 1e-3) / 1e9
            row["pct_bw"] = 100.0 * row["floor_mem_ms"] / row["ms"]
            row["pct_floor"] = 100.0 * row["floor_ms"] / row["ms"]
        self.results.add(row)
        self._log_row(row)
        return row

    @staticmethod
    def _log_row(row: dict) -> None:
        if row["ms"] is None:
            shown = row["status"]
        else:
            shown = f"{row['ms']:9.4f} ms ({row['timing']}) eager {row['eager_ms']:9.4f} ms"
            if row.get("pct_floor"):
                shown += f"  {row['pct_floor']:5.1f}% of {row['bound']} floor"
        log(f"  {row['op']:14s} {row['shape']} N={row['N']:<7d} T={row['T']:<5d} {row['backend']:13s} {shown}")

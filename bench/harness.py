"""Shared benchmark harness: timing, input rotation, bytes model, results JSON, kernel tables.

Timing: on CUDA, ``triton.testing.do_bench`` (median of CUDA-event timings after warm-up, L2
flushed before every call); on CPU, a wall-clock median. Every timed function cycles through
several input buffers (``Rotator``) so repeated calls do not hit in cache on small sizes.

Bytes model: each op is charged the bytes it must move at least once (DESIGN §2, "memory traffic
is the cost model"); ``floor_ms`` is those bytes at the copy bandwidth measured at the start of
the same run (device-to-device copy, bytes read + written / time), and ``pct_bw`` = floor / time.

Kernel table rows are long-format dicts (one per op x shape x N x T x backend), appended to a
results JSON that is rewritten after every row, so a stage killed by ``timeout`` keeps what it
measured. ``bench/report.py`` turns the JSON into markdown and a PNG.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` works without PYTHONPATH=.
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# The Triton interpreter is chosen when a kernel is defined: set it before lag_triton.kernels.triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("plain", "torch", "triton", "cuda")  # "plain" = the obvious user code, written below
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


def short_error(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_context_broken(device: torch.device) -> bool:
    """After an exception: is the CUDA context poisoned (illegal address etc.)? Then the process must stop."""
    if device.type != "cuda":
        return False
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001
        return True


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Budget:
    """Soft wall-clock budget: work is skipped (and the skip recorded) once it is spent."""

    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return math.inf if not self.seconds else self.seconds - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def bench(fn: Callable[[], object], device: torch.device, warmup_ms: float = 5, rep_ms: float = 20,
          max_reps: int = 50) -> float:
    """Median milliseconds of ``fn()`` on ``device``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (also JIT / first-call costs)
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_events(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median ms of ``fn()`` over ``reps`` calls (CUDA events on GPU, perf_counter on CPU), no L2 flush.

    Used for whole-model timings, where do_bench's 5-call estimate phase would cost too much.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Device-to-device copy bandwidth, bytes read + written per second (the roofline for every op)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, warmup_ms=10, rep_ms=50)
    del src, dst
    free_memory(device)
    return {"bytes": 2 * nbytes, "ms": ms, "gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


class Rotator:
    """Cycles through several pre-built input sets so consecutive calls touch different memory."""

    def __init__(self, items: list):
        self.items = items
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


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
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
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
    """The results JSON: env + copy bandwidth + rows; rewritten (atomically) after every change."""

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
def backend_ops(name: str, device: torch.device):
    """(ops module, None) or (None, "unavailable: <reason>") for one of our backends."""
    from lag_triton.kernels import get_ops, resolve_backend

    try:
        resolved = resolve_backend(name, device)
        ops = get_ops(resolved)
        for fn in ("arrow_topk", "spectr_rerank", "lora_apply"):
            if not callable(getattr(ops, fn, None)):
                raise RuntimeError(f"backend module {ops.__name__} has no {fn}()")
        return ops, None
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable: {short_error(exc)}"


# --- plain PyTorch: what a user would write without our kernels (deliberately not our reference) ---
def plain_arrow_topk(x, prototypes, k):
    scores = (x @ prototypes.T).abs()
    top = scores.topk(k, dim=1)
    return top.indices.to(torch.int32), top.values.float()


def plain_spectr_rerank(x, a_star, cand, top_m):
    z = torch.einsum("td,tkrd->tkr", x, a_star[cand.long()]).float()  # gathers [T, k, r, d_in]
    best = z.norm(dim=-1).topk(top_m, dim=1).indices
    sel = cand.long().gather(1, best)
    z_sel = z.gather(1, best[..., None].expand(-1, -1, z.shape[-1]))
    w = torch.ones(sel.shape, dtype=torch.float32, device=x.device) / top_m
    return sel.to(torch.int32), w, z_sel


def plain_lora_apply(y, b_star, sel, w, z):
    y += torch.einsum("tmor,tmr->to", b_star[sel.long()], (z * w[..., None]).to(y.dtype))
    return y


def plain_layer(x, y, a_star, b_star, prototypes, k, top_m):
    cand = (x @ prototypes.T).abs().topk(k, dim=1).indices  # [T, k]
    z = torch.einsum("td,tkrd->tkr", x, a_star[cand])  # [T, k, r]
    best = z.float().norm(dim=-1).topk(top_m, dim=1).indices  # [T, m]
    sel = cand.gather(1, best)
    z_sel = z.gather(1, best[..., None].expand(-1, -1, z.shape[-1]))
    y += torch.einsum("tmor,tmr->to", b_star[sel], z_sel)
    return sel


# ----------------------------------------------------------------------------------------------
# kernel tables
# ----------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a small sweep (smoke test)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--out", default=None, help="results JSON (appended to if it exists); "
                   "default bench/results/<card>-<date>.json")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma list out of {','.join(BACKENDS)}")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; remaining rows are skipped (and noted) once spent")
    p.add_argument("--seed", type=int, default=0)


def add_kernel_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--n", default=None, help="comma list of adapter counts N (default 1000,10000,100000)")
    p.add_argument("--t", default=None, help="comma list of token counts T (default 1,32,2048)")
    p.add_argument("--shapes", default=None, help="comma list of d_in:d_out (default 3072:8192,8192:3072)")
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--top-m", type=int, default=1)
    p.add_argument("--rotate", type=int, default=4, help="input buffers cycled per measurement")
    p.add_argument("--prompt-topics", type=int, default=0,
                   help="0: i.i.d. random token rows (routing spread over the library); K > 0: each row leans "
                        "towards one of K adapters, in contiguous runs (a prompt about K documents), so "
                        "routing concentrates on K adapters")
    p.add_argument("--warmup-ms", type=float, default=5)
    p.add_argument("--rep-ms", type=float, default=20)
    p.add_argument("--ref-max-tn", type=float, default=2048 * 10000,
                   help="run the torch reference backend only where T*N <= this (it is slow by design)")


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


def _random_library(n, r, d_in, d_out, dtype, device, gen, need_a=True, need_b=True):
    """Random factors at LoRA-like scale: unit-norm prototypes/A* rows, small B*. Built in chunks (low peak)."""
    def randn(*shape, scale=1.0):
        out = torch.empty(shape, dtype=dtype, device=device)
        chunk = max(1, (1 << 26) // max(1, math.prod(shape[1:])))
        for s in range(0, shape[0], chunk):
            part = out[s:s + chunk]
            part.copy_(torch.randn(part.shape, generator=gen, device=device, dtype=torch.float32) * scale)
        return out

    prototypes = randn(n, d_in, scale=d_in ** -0.5)
    a_star = randn(n, r, d_in, scale=d_in ** -0.5) if need_a else None
    b_star = randn(n, d_out, r, scale=0.02) if need_b else None
    return prototypes, a_star, b_star


def _topic_directions(protos, a_star, t, topics, strength=8.0):
    """[t, d_in] fp32 offsets that make row i lean towards adapter c(i): `topics` adapters spread over the
    library, in contiguous runs of rows. Adds `strength` x the unit prototype of c(i) (Arrow ranks it
    first: random rows score ~N(0, 1) against unit prototypes) and, when A* is given, `strength` x the
    unit first row of A*_c(i) (SpectR's norm then prefers it too, as in a real library where the
    prototype is that row)."""
    n = protos.shape[0]
    which = (torch.arange(t, device=protos.device) * topics // t) * max(1, n // topics) % n
    unit = lambda v: v.float() / v.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    out = strength * unit(protos[which])
    if a_star is not None and a_star.shape[1] > 0:
        out += strength * unit(a_star[which, 0])
    return out


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


def run_kernel_tables(ops_to_run: Iterable[str], argv=None, description: str = "") -> Path:
    """Benchmark ``ops_to_run`` (subset of KERNEL_OPS) over the sweep; returns the results path."""
    from lag_triton.routing import RoutingConfig, route_and_apply

    p = argparse.ArgumentParser(description=description)
    add_kernel_args(p)
    args = p.parse_args(argv)
    ops_to_run = [o for o in KERNEL_OPS if o in set(ops_to_run)]
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    budget = Budget(args.time_budget)
    results = Results(args.out or default_results_path(device), device)
    copy_gbps = results.ensure_copy_bandwidth()
    shapes, ns, ts = kernel_sweep(args)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = {}
    for b in wanted:
        if b == "plain":
            backends[b] = (None, None)
        else:
            backends[b] = backend_ops(b, device)
            if backends[b][1]:
                log(f"backend {b}: {backends[b][1]}")
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    r, k_req, m_req = args.rank, args.k, args.top_m
    log(f"kernel tables {ops_to_run} on {device} {args.dtype}: shapes={shapes} N={ns} T={ts} backends={wanted}")

    def record(op, shape, n, t, k, m, backend, status, ms=None, nbytes=None, extra=None):
        d_in, d_out = shape
        row = {"section": "kernel", "op": op, "shape": f"{d_in}->{d_out}", "d_in": d_in, "d_out": d_out,
               "N": n, "T": t, "k": k, "top_m": m, "rank": r, "dtype": args.dtype, "backend": backend,
               "status": status, "ms": ms, "bytes": nbytes}
        if args.prompt_topics:
            row["prompt_topics"] = args.prompt_topics
        if nbytes is not None:
            floor = nbytes / (copy_gbps * 1e9) * 1e3
            row["floor_ms"] = floor
            if ms:
                row["gbps"] = nbytes / (ms * 1e-3) / 1e9
                row["pct_bw"] = 100.0 * floor / ms
        if extra:
            row.update(extra)
        results.add(row)
        shown = f"{ms:9.4f} ms" if ms is not None else status
        pct = f"  {row['pct_bw']:5.1f}% BW" if row.get("pct_bw") else ""
        log(f"  {op:14s} {d_in}->{d_out} N={n:<7d} T={t:<5d} {backend:7s} {shown}{pct}")

    skipped_budget = 0
    # The per-layer table first (over the whole sweep), then the per-kernel tables: a time budget
    # that runs out cuts the least important rows.
    all_ops = ops_to_run
    passes = [["layer"], [o for o in all_ops if o != "layer"]] if "layer" in all_ops else [all_ops]
    for ops_to_run in [p for p in passes if p]:
        for shape in shapes:
            d_in, d_out = shape
            for n in ns:
                k, m = min(k_req, n), min(m_req, min(k_req, n))
                if budget.expired():
                    skipped_budget += len(ts) * len(ops_to_run)
                    continue
                need_a = any(o in ("layer", "spectr_rerank", "lora_apply") for o in ops_to_run)  # apply needs real sel/z
                need_b = any(o in ("layer", "lora_apply") for o in ops_to_run)
                try:
                    protos, a_star, b_star = _random_library(n, r, d_in, d_out, dtype, device, gen, need_a, need_b)
                except Exception as exc:  # noqa: BLE001 (OOM at the largest N)
                    for t in ts:
                        for op in ops_to_run:
                            for b in wanted:
                                record(op, shape, n, t, k, m, b, f"error: building data: {short_error(exc)}")
                    free_memory(device)
                    continue
                for t in ts:
                    if budget.expired():
                        skipped_budget += len(ops_to_run)
                        continue
                    # Inputs, rotated: x, y and the per-buffer routing results the later ops consume.
                    sets = []
                    for _ in range(max(1, args.rotate)):
                        x = torch.randn(t, d_in, generator=gen, device=device, dtype=torch.float32)
                        if args.prompt_topics > 0:
                            x += _topic_directions(protos, a_star, t, args.prompt_topics)
                        x = x.to(dtype)
                        y = torch.randn(t, d_out, generator=gen, device=device, dtype=torch.float32).to(dtype)
                        cand, _ = plain_arrow_topk(x, protos, k)
                        s = {"x": x, "y": y, "cand": cand}
                        if a_star is not None:
                            s["sel"], s["w"], s["z"] = plain_spectr_rerank(x, a_star, cand, m)
                        sets.append(s)
                    uniq_cand = int(torch.unique(sets[0]["cand"]).numel())
                    uniq_sel = int(torch.unique(sets[0]["sel"]).numel()) if "sel" in sets[0] else 0
                    ref_ok = t * n <= args.ref_max_tn
                    ref_sel = None
                    for op in ops_to_run:
                        nbytes = kernel_bytes(op, n=n, r=r, d_in=d_in, d_out=d_out, t=t, k=k, m=m, elt=elt,
                                              uniq_cand=uniq_cand, uniq_sel=uniq_sel)
                        extra = {"unique_candidates": uniq_cand, "unique_selected": uniq_sel}
                        for b in wanted:
                            ops, why = backends[b]
                            if why:
                                record(op, shape, n, t, k, m, b, why, nbytes=nbytes, extra=extra)
                                continue
                            if b == "torch" and not ref_ok:
                                record(op, shape, n, t, k, m, b,
                                       f"skipped: reference not run above T*N={args.ref_max_tn:.3g} (slow by design)",
                                       nbytes=nbytes, extra=extra)
                                continue
                            rot = Rotator(sets)
                            cfg = RoutingConfig(k=k, top_m=m)
                            fn = _make_fn(op, b, ops, rot, a_star, b_star, protos, k, m, cfg, route_and_apply)
                            row_extra = dict(extra)
                            try:
                                if op == "layer":
                                    # Correctness signal: does this backend pick what the reference picks?
                                    s0 = sets[0]
                                    y0 = s0["y"].clone()
                                    if b == "plain":
                                        sel = plain_layer(s0["x"], y0, a_star, b_star, protos, k, m).to(torch.int32)
                                    else:
                                        sel = route_and_apply(s0["x"], y0, a_star, b_star, protos, cfg, ops)
                                    if b == "torch":
                                        ref_sel = sel.clone()
                                    elif ref_sel is not None and ref_sel.shape == sel.shape:
                                        row_extra["sel_match_ref"] = float((ref_sel == sel).all(dim=1).float().mean())
                                ms = bench(fn, device, args.warmup_ms, args.rep_ms)
                                record(op, shape, n, t, k, m, b, "ok", ms, nbytes, row_extra)
                            except Exception as exc:  # noqa: BLE001
                                traceback.print_exc()
                                record(op, shape, n, t, k, m, b, f"error: {short_error(exc)}", nbytes=nbytes,
                                       extra=row_extra)
                                if cuda_context_broken(device):
                                    results.note(f"CUDA context broken after {b} {op} N={n} T={t}; stopping this stage")
                                    sys.exit(3)
                                free_memory(device)
                    del sets
                    free_memory(device)
                del protos, a_star, b_star
                free_memory(device)
    if skipped_budget:
        results.note(f"kernel tables {all_ops}: {skipped_budget} (op, N, T) cells skipped, "
                     f"time budget {args.time_budget}s spent")
    log(f"wrote {results.path} ({budget.elapsed():.1f}s)")
    return results.path


def _make_fn(op, b, ops, rot, a_star, b_star, protos, k, m, cfg, route_and_apply):
    if op == "arrow_topk":
        if b == "plain":
            return lambda: plain_arrow_topk(rot.next()["x"], protos, k)
        return lambda: ops.arrow_topk(rot.next()["x"], protos, k)
    if op == "spectr_rerank":
        def spectr():
            s = rot.next()
            if b == "plain":
                return plain_spectr_rerank(s["x"], a_star, s["cand"], m)
            return ops.spectr_rerank(s["x"], a_star, s["cand"], m, "softmax", 1.0, None)
        return spectr
    if op == "lora_apply":
        def apply():
            s = rot.next()
            if b == "plain":
                return plain_lora_apply(s["y"], b_star, s["sel"], s["w"], s["z"])
            return ops.lora_apply(s["y"], b_star, s["sel"], s["w"], s["z"])
        return apply
    if op == "layer":
        def layer():
            s = rot.next()
            if b == "plain":
                return plain_layer(s["x"], s["y"], a_star, b_star, protos, k, m)
            return route_and_apply(s["x"], s["y"], a_star, b_star, protos, cfg, ops)
        return layer
    raise ValueError(op)

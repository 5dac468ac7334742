"""How the benchmarks time things (``bench/harness.py`` runs the tables on top of it).

Timing of a kernel-table cell (``time_cell``). On CUDA, two numbers per cell:

- ``ms``: device time of a CUDA-graph replay. One graph is captured per rotated input set
  (``--rotate``, so repeated calls do not hit in cache on small sizes), the graphs are replayed
  cyclically, each replay timed alone by CUDA events, median of >= 10 samples. Before every timed
  replay the L2 is flushed by a *read* of a buffer larger than L2 (a sum, outside the events: a
  memset would leave dirty lines for the timed replay to write back). Host launch overhead is
  not in this number. Where capture fails (a backend that syncs, say) ``ms`` falls back to the
  eager time and the row says ``timing: "eager"`` (with ``graph_error``), else ``"cuda-graph"``.
- ``eager_ms``: ``triton.testing.do_bench`` (median of CUDA-event timings of eager calls after
  warm-up, L2 zeroed before each call): host launch overhead included.

On CPU both are one wall-clock median of eager calls (``timing: "wall"``).

The rooflines: ``measure_copy_bandwidth`` (a device-to-device copy kernel, bytes read + written /
time) and ``measure_gemm_rate`` (an 8192^3 bf16 matmul on CUDA, a small fp32 one on CPU), timed
like the cells, the faster of graph and eager taken (``best_ms``).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch


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


#: the fewest samples a CUDA median is taken over (graph replays and eager calls alike)
MIN_SAMPLES = 10


def bench(
    fn: Callable[[], object], device: torch.device, warmup_ms: float = 5, rep_ms: float = 20, max_reps: int = 50
) -> float:
    """Median milliseconds of eager ``fn()`` calls on ``device`` (host launch overhead included); on CUDA
    over at least MIN_SAMPLES calls (do_bench times rep_ms / its estimate of one call: one call of a
    cell slower than rep_ms)."""
    if device.type == "cuda":
        import triton.testing

        times = list(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
        while len(times) < MIN_SAMPLES:
            rep = 1.1 * statistics.median(times) * (MIN_SAMPLES - len(times))
            times += triton.testing.do_bench(fn, warmup=0, rep=rep, return_mode="all")
        return float(statistics.median(times))
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


_FLUSH_BUFFERS: dict = {}


def flush_l2(device: torch.device) -> None:
    """Evict the L2 by *reading* a buffer of max(256 MiB, 2 x L2) (a sum). A read leaves no dirty
    lines behind, unlike a memset, whose write-backs the next timed kernel would pay for."""
    buf = _FLUSH_BUFFERS.get(device)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        nbytes = max(256 << 20, 2 * l2)
        buf = _FLUSH_BUFFERS[device] = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()


def capture_graphs(fns: list[Callable[[], object]], device: torch.device) -> list:
    """One CUDA graph per callable (after a warm-up call of each on a side stream). The graphs share
    one memory pool: safe because they are replayed in capture order, one at a time."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        graphs.append(graph)
    return graphs


def graph_replay_ms(
    fns: list[Callable[[], object]],
    device: torch.device,
    rep_ms: float = 20,
    est_ms: float = 0.1,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = 100,
) -> float:
    """Median device ms of one CUDA-graph replay: a graph per callable (per input set), replayed
    cyclically, each replay timed alone by CUDA events after an L2 flush outside the events."""
    graphs = capture_graphs(fns, device)
    for graph in graphs:  # the first replay uploads the graph
        graph.replay()
    n = max(min_samples, min(max_samples, int(rep_ms / max(est_ms, 1e-3))))
    n = -(-n // len(graphs)) * len(graphs)  # every graph replayed equally often
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for i, (start, end) in enumerate(events):
        flush_l2(device)
        start.record()
        graphs[i % len(graphs)].replay()
        end.record()
    torch.cuda.synchronize(device)
    times = [start.elapsed_time(end) for start, end in events]
    del graphs
    return statistics.median(times)


def time_cell(fns: list[Callable[[], object]], device: torch.device, warmup_ms: float = 5, rep_ms: float = 20) -> dict:
    """Time one benchmark cell; ``fns`` holds one zero-argument call per rotated input set.

    Returns {"ms", "eager_ms", "timing"} (+ "graph_error" when capture failed): see the module
    docstring. A broken CUDA context is re-raised; any other capture failure falls back to eager.
    """
    rot = Rotator(fns)
    eager = bench(lambda: rot.next()(), device, warmup_ms, rep_ms)
    if device.type != "cuda":
        return {"ms": eager, "eager_ms": eager, "timing": "wall"}
    try:
        ms = graph_replay_ms(fns, device, rep_ms, est_ms=eager)
        return {"ms": ms, "eager_ms": eager, "timing": "cuda-graph"}
    except Exception as exc:  # noqa: BLE001 (a backend that syncs or allocates on the host cannot be captured)
        if cuda_context_broken(device):
            raise
        free_memory(device)
        return {"ms": eager, "eager_ms": eager, "timing": "eager", "graph_error": short_error(exc, 200)}


def best_ms(t: dict) -> float:
    """The faster of the graph and eager timings of a roofline measurement: a floor must not exceed what
    was achieved (sustained GEMMs drop the clocks, so which of the two is faster varies)."""
    return min(t["ms"], t["eager_ms"])


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Device-to-device copy bandwidth, bytes read + written per second (the memory roofline).

    The copy is an elementwise kernel (x * 1): inside a CUDA graph a plain ``copy_`` becomes a memcpy
    node that the copy engines serve at ~2/3 of the bandwidth (an early H200 probe, output not kept)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_cell([functools.partial(torch.mul, src, 1.0, out=dst)], device, warmup_ms=10, rep_ms=50)
    del src, dst
    free_memory(device)
    ms = best_ms(t)
    return {
        "bytes": 2 * nbytes,
        "ms": ms,
        "graph_ms": t["ms"],
        "eager_ms": t["eager_ms"],
        "timing": t["timing"],
        "gbps": 2 * nbytes / (ms * 1e-3) / 1e9,
    }


def measure_gemm_rate(device: torch.device, size: int | None = None) -> dict:
    """Dense matmul rate (the compute roofline): size^3 bf16 on CUDA (8192 by default), fp32 on CPU (256)."""
    cuda = device.type == "cuda"
    size = size or (8192 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    t = time_cell([functools.partial(torch.mm, a, b, out=out)], device, warmup_ms=10, rep_ms=50)
    del a, b, out
    free_memory(device)
    flops, ms = 2 * size**3, best_ms(t)
    return {
        "m": size,
        "n": size,
        "k": size,
        "dtype": str(dtype).replace("torch.", ""),
        "flops": flops,
        "ms": ms,
        "graph_ms": t["ms"],
        "eager_ms": t["eager_ms"],
        "timing": t["timing"],
        "tflops": flops / (ms * 1e-3) / 1e12,
    }


class Rotator:
    """Cycles through several pre-built items (input sets, or calls bound to them) so consecutive
    calls touch different memory."""

    def __init__(self, items: list):
        self.items = items
        self.i = 0

    def next(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item

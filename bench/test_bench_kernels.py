"""pytest-benchmark timings of the three ops and the whole layer, every backend and the plain baseline.

On a GPU the cells are the kernel tables' (bf16, r=6, k=20, top_m=1, 3072 -> 8192; N in {1k, 10k,
100k}, T in {1, 32, 2048}); every timed call ends with a device synchronisation, so a round is
the op's wall time, launches included (the CUDA-graph device times are bench/timing.py's job):

    python -m pytest bench/test_bench_kernels.py --benchmark-only --benchmark-save=h200
    pytest-benchmark compare 0001 0002 --group-by=param:cell

On CPU (CI) one tiny cell runs, so that the file stays runnable; its figures mean nothing (the
Triton backend runs under its interpreter there).
"""

import functools

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from bench import harness  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
R, K, TOP_M = 6, 20, 1
if DEVICE.type == "cuda":
    DTYPE, D_IN, D_OUT = torch.bfloat16, 3072, 8192
    CELLS = [(n, t) for n in (1_000, 10_000, 100_000) for t in (1, 32, 2048)]
else:
    DTYPE, D_IN, D_OUT = torch.float32, 48, 40
    CELLS = [(64, 3)]
BACKENDS = ["plain", "torch", "triton", "cuda"]
OPS = ["arrow_topk", "spectr_rerank", "lora_apply", "layer"]


@functools.lru_cache(maxsize=1)
def _implementations() -> dict:
    return harness.resolve_backends(BACKENDS, DEVICE)


@functools.lru_cache(maxsize=2)
def _cell(n: int, t: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(n + t)
    protos, a_star, b_star = harness._random_library(n, R, D_IN, D_OUT, DTYPE, DEVICE, gen)
    x = torch.randn(t, D_IN, generator=gen, device=DEVICE).to(DTYPE)
    cand = torch.stack([torch.randperm(n, generator=gen, device=DEVICE)[:K] for _ in range(t)]).int()
    return {
        "x": x,
        "y": torch.zeros(t, D_OUT, device=DEVICE, dtype=DTYPE),
        "protos": protos,
        "a_star": a_star,
        "b_star": b_star,
        "cand": cand,
    }


def _call(op: str, impl: dict, c: dict):
    """The op bound to the cell's tensors (B* in the backend's own layout, prepared outside the timing)."""
    b_star = impl["prepare_b_star"](c["b_star"]) if "prepare_b_star" in impl else c["b_star"]
    if op == "arrow_topk":
        return functools.partial(impl["arrow_topk"], c["x"], c["protos"], K)
    if op == "spectr_rerank":
        return functools.partial(impl["spectr_rerank"], c["x"], c["a_star"], c["cand"], TOP_M)
    if op == "lora_apply":
        sel, w, z = impl["spectr_rerank"](c["x"], c["a_star"], c["cand"], TOP_M)
        return functools.partial(impl["lora_apply"], c["y"], b_star, sel, w, z)
    return functools.partial(impl["layer"], c["x"], c["y"], c["a_star"], b_star, c["protos"], K, TOP_M)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"N{c[0]}-T{c[1]}")
def test_bench_op(benchmark, backend, op, cell):
    impl, why = _implementations()[backend]
    if impl is None:
        pytest.skip(f"{backend}: {why}")
    n, t = cell
    fn = _call(op, impl, _cell(n, t))
    benchmark.group = f"{op} N={n} T={t}"
    benchmark.extra_info.update(backend=backend, dtype=str(DTYPE), d_in=D_IN, d_out=D_OUT, r=R, k=K, device=str(DEVICE))

    def synchronised():
        out = fn()
        harness.sync(DEVICE)
        return out

    out = benchmark(synchronised)
    first = out[0] if isinstance(out, tuple) else out
    assert first.shape[0] == t  # idx [T, k], sel [T, m] or y [T, d_out]

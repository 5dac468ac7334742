"""pytest-benchmark timings of the torch reference at tiny sizes (run with --benchmark-disable in CI)."""

import pytest

pytest.importorskip("pytest_benchmark")

import torch  # noqa: E402

from lag_triton.kernels import get_ops  # noqa: E402
from lag_triton.routing import RoutingConfig, route_and_apply  # noqa: E402

N, R, D_IN, D_OUT, T, K = 64, 6, 48, 40, 4, 8


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(N, R, D_IN, generator=g)
    return {
        "x": torch.randn(T, D_IN, generator=g),
        "y": torch.zeros(T, D_OUT),
        "a_star": a,
        "b_star": torch.randn(N, D_OUT, R, generator=g) * 0.02,
        "prototypes": a[:, 0].contiguous(),
    }


def test_reference_layer(benchmark, data):
    ops = get_ops("torch")
    sel = benchmark(
        route_and_apply,
        data["x"],
        data["y"].clone(),
        data["a_star"],
        data["b_star"],
        data["prototypes"],
        RoutingConfig(k=K, top_m=1),
        ops,
    )
    assert sel.shape == (T, 1)


def test_reference_arrow_topk(benchmark, data):
    idx, _ = benchmark(get_ops("torch").arrow_topk, data["x"], data["prototypes"], K)
    assert idx.shape == (T, K)

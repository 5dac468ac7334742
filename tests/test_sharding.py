"""Sharded routing (issue 13, item 3): ranks holding ~1/P of every module's adapters select and
output what one device holding the whole library does, over gloo in 2 and 3 spawned processes
(and NCCL when several GPUs are present)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import sharded_worker
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lag_triton
from lag_triton import Library, sharding
from lag_triton.library import add_adapters, build_library
from lag_triton.sharding import comm_device, comm_problem, device_backends, shard_bounds, traffic

from factories import make_adapter, tiny_model

# Every router and top_m, with k below, at and above N (k is clamped per module).
SETTINGS = [
    {"router": "lag", "k": 2, "top_m": 1},
    {"router": "lag", "k": 3, "top_m": 2},
    {"router": "lag", "k": 20, "top_m": 3, "combine": "uniform"},
    {"router": "arrow", "top_m": 1},
    {"router": "arrow", "top_m": 2, "temperature": 0.5},
    {"router": "spectr", "top_m": 1},
    {"router": "spectr", "top_m": 2},
]


@pytest.fixture(scope="module")
def library_file(tmp_path_factory):
    """N = 5 (odd: uneven shards); q_proj has one adapter, so some ranks hold none of it."""
    tmp = tmp_path_factory.mktemp("sharded")
    model = tiny_model("llama")
    paths = [
        make_adapter(model, tmp / f"a{i}", seed=i, r=2 + i % 3, targets=["up_proj", "down_proj", "v_proj"])
        for i in range(4)
    ]
    paths.append(make_adapter(model, tmp / "a4", seed=4, r=3, targets=["q_proj", "up_proj"]))
    path = tmp / "lib.safetensors"
    Library.from_peft(paths, progress=False).save(path)
    folder = tmp / "lib"  # the same adapters as a library folder of three parts (stacked modules)
    build_library(paths[:2], folder, folder=True, workers=0, progress=False)
    for step in (paths[2:4], paths[4:]):
        add_adapters(folder, step, workers=0, progress=False)
    return path


def test_shard_bounds_are_balanced_and_cover_every_row():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            b = shard_bounds(n, world)
            assert b[0] == 0 and b[-1] == n and all(0 <= b[p + 1] - b[p] - n // world <= 1 for p in range(world))
    assert shard_bounds(1, 3) == [0, 0, 0, 1]  # ranks 0 and 1 hold nothing of a 1-adapter module


def test_traffic_formula_terms():
    t = traffic(tokens=[3, 5], d_in=48, d_out=80, itemsize=4, cands=[2, 3], router="lag", remote_picks=4)
    assert t == {
        "sizes": 16,
        "activations": 8 * 48 * 4,
        "candidates": 12 * (2 * 5 + 3 * 3),
        "counts": 16,
        "requests": 32,
        "outputs": 4 * 80 * 4,
    }


def _start(fn, world: int, *args, method: str = "fork", timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` new processes; a failure re-raises with its traceback,
    a hang (a collective some rank never joined) fails after ``timeout``. On CPU they fork (they start
    at once, with torch and transformers already imported; each sets one thread); CUDA needs "spawn"."""
    context = mp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} in {world} processes did not finish within {timeout} s (deadlock?)")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_device_over_gloo(library_file, tmp_path, world):
    _start(sharded_worker.check_model, world, str(tmp_path / "store"), "gloo", str(library_file), SETTINGS)


def test_a_sharded_library_folder_equals_single_device_over_gloo(library_file, tmp_path):
    """Each rank copies its rows of every module from the parts that hold them (``copy_rows``)."""
    folder = library_file.parent / "lib"
    _start(sharded_worker.check_model, 3, str(tmp_path / "store"), "gloo", str(folder), SETTINGS[:1])


@pytest.mark.parametrize("world", [2, 3])
def test_exact_ties_across_shards_go_to_the_lower_id(tmp_path, world):
    _start(sharded_worker.check_ties, world, str(tmp_path / "store"), "gloo")


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_that_fails_or_differs_makes_every_rank_raise(tmp_path, world):
    _start(sharded_worker.check_disagreement, world, str(tmp_path / "store"), "gloo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ CUDA devices")
def test_sharded_equals_single_device_over_nccl(library_file, tmp_path):
    world = min(torch.cuda.device_count(), 3)
    _start(
        sharded_worker.check_model, world, str(tmp_path / "store"), "nccl", str(library_file), SETTINGS, method="spawn"
    )


def test_patch_with_a_group_refuses_without_torch_distributed(library_file):
    model = tiny_model("llama")
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        lag_triton.patch(model, library_file, process_group=object())
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())


def test_a_sharded_model_refuses_to_pickle(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 4))
        lag_triton.patch(model, sharded_worker.tie_library(), process_group=dist.group.WORLD)
        with pytest.raises(TypeError, match="cannot be pickled or deep-copied"):
            torch.save(model, tmp_path / "m.pt")
        with pytest.raises(NotImplementedError, match="does not restrict sharded routing"):
            with lag_triton.scope(model, [["t1"]]), torch.no_grad():
                model(torch.ones(1, 8))
        with pytest.raises(TypeError, match="ProcessGroup"):
            lag_triton.patch(nn.Sequential(nn.Linear(8, 4)), sharded_worker.tie_library(), process_group="world")
    finally:
        dist.destroy_process_group()


def test_a_sharded_library_moved_to_meta_and_back_refuses_to_route(tmp_path):
    """As an unsharded one: to_empty() leaves the factors without values, and the forward says so
    (the sharded route's own forward skipped the check and routed with garbage)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(8, 4))
        lag_triton.patch(model, sharded_worker.tie_library(), process_group=dist.group.WORLD)
        model.to("meta").to_empty(device="cpu")
        with pytest.raises(RuntimeError, match="went to the meta device and came back without values"):
            with torch.no_grad():
                model(torch.ones(1, 8))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("config", "cuda_ok", "cpu_ok"),
    [
        ("nccl", True, False),
        ("cuda:nccl", True, False),  # init_process_group() on a CUDA machine, torch >= 2.6
        ("cpu:gloo,cuda:nccl", True, True),  # init_process_group() on a CUDA machine, torch < 2.6
        ("undefined", True, True),  # get_backend()'s answer for such a group (no get_backend_config)
        ("gloo", False, True),
        ("cpu:gloo,cuda:gloo", False, True),  # get_backend_config() of a "gloo" group
        ("cpu:gloo", False, True),  # init_process_group() on a CPU machine
        ("mpi", False, True),
    ],
)
def test_the_backend_decision_accepts_default_and_multi_device_groups(config, cuda_ok, cpu_ok):
    """Bug: the check compared get_backend() with "nccl", refusing every CUDA model on a group made
    by init_process_group() without a backend ('undefined', or "cpu:gloo,cuda:nccl")."""
    backends = device_backends(config)
    assert (comm_problem("cuda", backends) is None) == cuda_ok
    assert (comm_problem("cpu", backends) is None) == cpu_ok
    problem = comm_problem("cuda", backends) or comm_problem("cpu", backends)
    assert problem is None or "use gloo for CPU models and nccl for CUDA models" in problem
    assert comm_problem("xpu", backends) is not None
    if "cpu" in backends:  # patch's own agreement runs where every rank's group can run it
        assert comm_device(backends) == torch.device("cpu")


@pytest.mark.parametrize("has_config", [True, False])
def test_a_default_backend_group_accepts_cuda_layers(tmp_path, monkeypatch, has_config):
    """A group from init_process_group() without a backend, as torchrun scripts make it: on a CUDA
    machine get_backend() says 'undefined' and get_backend_config() "cpu:gloo,cuda:nccl" (simulated:
    the layer is reported on cuda:0; only the check is run, nothing is copied there)."""
    dist.init_process_group(init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert dist.get_backend(dist.group.WORLD) == "undefined"
        lib = sharded_worker.tie_library()
        model = nn.Sequential(nn.Linear(8, 4))
        lag_triton.patch(model, lib, process_group=dist.group.WORLD)  # a CPU model on it: gloo
        lag_triton.unpatch(model)
        if has_config:
            monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:nccl")
        else:  # an older torch without get_backend_config: decided from 'undefined'
            monkeypatch.delattr(dist, "get_backend_config")
        real = sharding._check_layer
        monkeypatch.setattr(
            sharding, "_check_layer", lambda *a: dataclasses.replace(real(*a), device=torch.device("cuda", 0))
        )
        _, _, backends = sharding._group_info(dist.group.WORLD)
        plan, _ = sharding._plan(model, [lib], "torch", backends, 0)
        assert [entry[0] for entry in plan] == ["0"] and comm_device(backends) == torch.device("cpu")
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cpu:gloo,cuda:gloo", raising=False)
        with pytest.raises(ValueError, match="uses gloo for cuda tensors"):
            sharding._plan(model, [lib], "torch", sharding._group_info(dist.group.WORLD)[2], 0)
    finally:
        dist.destroy_process_group()

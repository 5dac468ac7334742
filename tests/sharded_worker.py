"""What each spawned rank of tests/test_sharding.py runs (kept light: no peft import, fast spawn).

Every rank builds the same tiny Llama, patches it with the whole library (the single-device
reference) on its own batch, then with ``process_group=`` (sharded), and checks that selections
are equal and logits equal up to fp32 rounding, for every router setting it is given. Failures
raise, which ``torch.multiprocessing.spawn`` turns into a test failure with the rank's traceback.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lag_triton
from lag_triton import Library, sharding
from lag_triton.library import ModuleWeights
from lag_triton.sharding import ShardedRoute, shard_bounds, traffic


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights on every rank (and as tests/factories.py's tiny_model)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def _init(rank: int, world: int, store: str, backend: str) -> torch.device:
    torch.set_num_threads(1)  # forked from a process whose OpenMP pool may be running; P ranks share the cores
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _forward(model, ids):
    with torch.no_grad(), lag_triton.trace(model) as tr:
        logits = model(input_ids=ids).logits
    return logits, tr.selections


def _remote_picks(model, selections, rank: int, world: int) -> dict[str, int]:
    """Per module: picks of this rank's tokens whose adapter row lives on another rank."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, lag_triton.LagLinear):
            route = module.routes[0]
            rows = torch.searchsorted(route.adapter_ids.cpu(), selections[name])  # ids ascending: row = position
            owner = torch.bucketize(rows, torch.tensor(shard_bounds(route.n_total, world)), right=True) - 1
            out[name] = int((owner != rank).sum())
    return out


def check_model(rank: int, world: int, store: str, backend: str, lib_path: str, settings: list[dict]) -> None:
    device = _init(rank, world, store, backend)
    model = tiny_llama().to(device)
    lib = Library.load(lib_path)
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 97, (1 + rank % 2, 4 + 3 * rank), generator=g).to(device)  # uneven batches
    tokens = [(1 + p % 2) * (4 + 3 * p) for p in range(world)]
    for kw in settings:
        lag_triton.patch(model, lib, **kw)
        want, want_sel = _forward(model, ids)
        lag_triton.unpatch(model)
        lag_triton.patch(model, lib, process_group=dist.group.WORLD, **kw)
        got, got_sel = _forward(model, ids)
        routes = {n: m.routes[0] for n, m in model.named_modules() if isinstance(m, lag_triton.LagLinear)}
        assert all(isinstance(r, ShardedRoute) for r in routes.values())
        assert set(got_sel) == set(want_sel), kw
        for name in want_sel:
            assert torch.equal(got_sel[name], want_sel[name]), (kw, name, got_sel[name], want_sel[name])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=functools.partial("{}: {}".format, kw))
        _check_traffic(model, routes, got_sel, rank, world, tokens, kw)
        logits = model(input_ids=ids).logits  # gradients on: every rank runs the same forwards
        try:
            logits.sum().backward()
        except RuntimeError as e:
            assert "sharded routing" in str(e) and "no_grad" in str(e), e
        else:
            raise AssertionError("a backward through sharded routing returned a gradient without the routed term")
        lag_triton.unpatch(model)
    dist.barrier()
    dist.destroy_process_group()


def _check_traffic(model, routes, selections, rank, world, tokens, kw) -> None:
    """What each module call sent equals the documented formula (summed over ranks)."""
    remote = _remote_picks(model, selections, rank, world)
    for name, route in sorted(routes.items()):
        sent = torch.tensor([route.last_traffic[p] for p in sorted(route.last_traffic)] + [remote[name]])
        dist.all_reduce(sent)
        n = route.n_total
        cands = [
            min(
                route.config.sizes(n)[0 if route.config.router == "lag" else 1],
                shard_bounds(n, world)[p + 1] - shard_bounds(n, world)[p],
            )
            for p in range(world)
        ]
        want = traffic(
            tokens=tokens,
            d_in=route.a_star.shape[2],
            d_out=route.b_star.shape[1],
            itemsize=route.a_star.element_size(),
            cands=cands,
            router=route.config.router,
            remote_picks=int(sent[-1]),
        )
        got = dict(zip(sorted(route.last_traffic), sent[:-1].tolist()))
        assert got == want, (kw, name, got, want)


def tie_library() -> Library:
    """5 adapters on one 8 -> 4 layer with dyadic values (every score and norm exact in fp32);
    adapters 1 and 4 are identical, so they tie exactly and land on different shards."""
    a = torch.zeros(5, 2, 8)
    for i in range(5):
        a[i, 0, i] = 1.0
        a[i, 1, (i + 3) % 8] = 0.5
    a[1, 0, 7] = a[4, 0, 7] = 4.0  # 1 and 4: the largest prototype weight on feature 7
    a[4] = a[1]
    b = torch.arange(5 * 4 * 2, dtype=torch.float32).view(5, 4, 2) / 8
    b[4] = b[1] + 1  # same routing keys, different outputs: the winner is visible in y
    weights = ModuleWeights(
        a_star=a,
        b_star=b,
        prototypes=a[:, 0].clone(),
        adapter_ids=torch.arange(5),
        ranks=torch.full((5,), 2, dtype=torch.int32),
    )
    return Library([f"t{i}" for i in range(5)], {"0": weights})


def check_ties(rank: int, world: int, store: str, backend: str) -> None:
    """Exact ties across shards go to the lower adapter id; a rank may have no tokens at all."""
    device = _init(rank, world, store, backend)
    lib = tie_library()
    x = torch.zeros(0 if rank == world - 1 else 6, 8, device=device)  # the last rank has no tokens
    if x.shape[0]:
        x[:3, 7] = 1.0  # tokens 0-2: adapters 1 and 4 tie on every key
        x[3:5] = 0.25  # all features: more ties
    for kw in (
        {"router": "lag", "k": 2},
        {"router": "lag", "k": 3, "top_m": 2},
        {"router": "arrow", "top_m": 2},
        {"router": "spectr", "top_m": 1},
        {"router": "spectr", "top_m": 3, "combine": "uniform"},
    ):
        outs = []
        for group in (None, dist.group.WORLD):
            torch.manual_seed(1)
            model = nn.Sequential(nn.Linear(8, 4)).to(device)
            lag_triton.patch(model, lib, process_group=group, **kw)
            with torch.no_grad(), lag_triton.trace(model) as tr:
                y = model(x)
            outs.append((y, tr.selections["0"]))
        (want, want_sel), (got, got_sel) = outs
        assert torch.equal(got_sel, want_sel), (kw, got_sel, want_sel)
        if x.shape[0]:
            assert (got_sel[:3, 0] == 1).all(), (kw, got_sel)  # the tie went to the lower id
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    dist.barrier()
    dist.destroy_process_group()


def check_disagreement(rank: int, world: int, store: str, backend: str) -> None:
    """A rank whose checks fail, or whose library differs, makes ``patch`` raise on every rank
    (instead of leaving the others waiting in a collective), and leaves every model unpatched."""
    device = _init(rank, world, store, backend)
    lib = tie_library()
    other = Library([f"other{i}" for i in range(5)], lib.modules)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 4)).to(device)
    mine = other if rank == world - 1 else lib
    try:
        lag_triton.patch(model, mine, process_group=dist.group.WORLD)
    except ValueError as e:
        assert f"ranks [{world - 1}] patch with other libraries" in str(e) or rank == world - 1, e
    else:
        raise AssertionError("patch accepted different libraries on different ranks")
    # A library file the last rank cannot read (missing on its node): it raises its own error, the
    # others that it failed its checks, instead of waiting for it in the first collective.
    path = Path(store).with_name(f"library-rank{rank}.safetensors")
    if rank != world - 1:
        lib.save(path)
    try:
        lag_triton.patch(model, str(path), process_group=dist.group.WORLD)
    except FileNotFoundError as e:
        assert rank == world - 1 and "does not exist" in str(e), e
    except ValueError as e:
        assert rank != world - 1 and f"ranks [{world - 1}] failed their patch checks" in str(e), e
    else:
        raise AssertionError("patch went ahead although a rank could not load its library")
    wrong = nn.Sequential(nn.Linear(8, 5)).to(device) if rank == 0 else model  # rank 0: 8 -> 5, not 8 -> 4
    try:
        lag_triton.patch(wrong, lib, process_group=dist.group.WORLD)
    except ValueError as e:
        assert ("adapters are 8 -> 4 but the model's layer is 8 -> 5" in str(e)) == (rank == 0), e
        assert rank == 0 or "ranks [0] failed their patch checks" in str(e), e
    else:
        raise AssertionError("patch went ahead although rank 0 failed its checks")
    assert not any(isinstance(m, lag_triton.LagLinear) for m in (*model.modules(), *wrong.modules()))
    # A NaN in the last adapter's B*, a row that only the last rank copies: that rank's check of its
    # rows names them, every rank raises, no model changes.
    bad = tie_library()
    bad.modules["0"].b_star[4, 1, 0] = float("nan")
    try:
        lag_triton.patch(model, bad, process_group=dist.group.WORLD)
    except ValueError as e:
        if rank == world - 1:
            lo = shard_bounds(5, world)[rank]
            assert f"module '0', rows [{lo}, 5): b_star holds NaN or inf" in str(e), e
        else:
            assert f"ranks [{world - 1}] failed to copy or check their shards" in str(e), e
    else:
        raise AssertionError("patch went ahead although a rank's rows hold a NaN")
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())
    # The last rank runs out of memory copying its shard: every rank raises, no model changes.
    if rank == world - 1:
        sharding._local_rows = _out_of_memory
    try:
        lag_triton.patch(model, lib, process_group=dist.group.WORLD)
    except torch.OutOfMemoryError as e:
        assert rank == world - 1 and "lag_triton.patch ran out of memory on cpu copying library" in str(e), e
        assert "The model is unchanged" in str(e) and "Tried to allocate" in str(e), e
    except ValueError as e:
        assert rank != world - 1 and f"ranks [{world - 1}] failed to copy or check their shards" in str(e), e
    else:
        raise AssertionError("patch went ahead although a rank ran out of memory")
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())
    sharding._local_rows = _LOCAL_ROWS
    # A setting only the last rank refuses (k = 0): every rank raises (it hung the others).
    try:
        lag_triton.patch(model, lib, k=0 if rank == world - 1 else 2, process_group=dist.group.WORLD)
    except ValueError as e:
        assert ("k must be" in str(e)) == (rank == world - 1), e
        assert rank == world - 1 or f"ranks [{world - 1}] failed their patch checks" in str(e), e
    else:
        raise AssertionError("patch went ahead although a rank refused its settings")
    # Layers routing in another dtype on one rank (the exchanged buffers' sizes differ: gloo aborted at
    # the first forward), and a library whose module maps rows to other adapters on one rank.
    names = [*lib.names, "t5"]  # module "0": adapters 0-4 on every rank but the last, 1-5 there
    first = Library(names, {"0": lib.modules["0"]})
    shifted = Library(names, {"0": dataclasses.replace(lib.modules["0"], adapter_ids=torch.arange(1, 6))})
    for case, ours, theirs in (("dtype", lib, lib), ("adapter ids", first, shifted)):
        target = model.to(torch.bfloat16) if case == "dtype" and rank == world - 1 else model
        try:
            lag_triton.patch(target, theirs if rank == world - 1 else ours, process_group=dist.group.WORLD)
        except ValueError as e:
            assert f"ranks [{world - 1}] patch with other libraries" in str(e) or (
                rank == world - 1 and "ranks [0" in str(e)
            ), (case, e)
        else:
            raise AssertionError(f"patch accepted a different {case} on one rank")
        model.float()
    assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())
    dist.barrier()
    dist.destroy_process_group()


_LOCAL_ROWS = sharding._local_rows


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

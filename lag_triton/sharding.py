"""Sharded routing: P ranks each hold ~1/P of every module's adapters (``patch(..., process_group=)``).

Designed like expert parallelism in MoE (DeepSpeed-MoE, Megatron's all-to-all token dispatcher),
with one difference: a token must be scored against *every* adapter before it is routed, so the
"gate" is itself sharded. Every rank keeps its own batch (data parallel); per module call:

 1. sizes:       all-gather of each rank's token count T_p (the splits of the exchanges below).
 2. activations: all-gather of the tokens x (all-to-all with the same rows to every rank).
 3. local:       each rank ranks all T tokens against its own adapters with the backend's ops
                 (Arrow top-k and/or SpectR norms) and keeps c_p candidates per token, with their
                 z = A* x, which stays on that rank.
 4. candidates:  all-to-all of (global id, Arrow score, SpectR norm) of those candidates back to
                 each token's rank, which merges them into the single-device order.
 5. dispatch:    the token's rank asks each adapter's owner for B* z of the picked (token, slot)s
                 (all-to-all of counts, then of candidate positions), and
 6. combine:     receives them (all-to-all of fp32 rows of d_out) and adds sum_j w_j B*_j z_j.

Why it selects what one device selects: the merge orders by (key descending, adapter id
ascending, NaN last), the reference's order, and the global top-k under that total order is
contained in the union of each shard's local top-k (shards are contiguous id ranges). Values can
differ from one device in the last bits: the shard's GEMMs have other shapes than the single
device's, so a near-tie within rounding can resolve differently (as between backends).

Bytes each module call sends between ranks (all ranks together; b_x = bytes per factor element,
T = sum of T_p, c_p = candidates per token from rank p, R = picked (token, slot)s whose adapter
lives on another rank than the token, F = 3 fields for "lag", 2 for "arrow" and "spectr"):

    8 P (P-1)  +  (P-1) T d_in b_x  +  4 F sum_p c_p (T - T_p)  +  8 P (P-1)  +  8 R  +  4 d_out R

with c_p = min(k, N_p) for "lag" and min(top_m, N_p) for "arrow"/"spectr". :func:`traffic`
evaluates it; each route records what it sent in ``last_traffic``.

Limits: eager only (the splits are read on the host, so no CUDA graph / fullgraph compile); every
rank must run the same forwards in the same order (as with FSDP, ``generate(synced_gpus=True)``);
gloo for CPU models, NCCL for CUDA models; inference only; a sharded model does not pickle.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import torch
import torch.distributed as dist

from .kernels import resolve_backend
from .kernels.common import selection_weights
from .library.weights import check_finite
from .moe import ExpertProjection
from .patching import (
    LibraryRoute,
    _as_libraries,
    _attach,
    _build_routes,
    _check_layer,
    _route_dtype,
    _Targets,
    _targets,
    check_patched_root,
)

__all__ = ["ShardedRoute", "patch_sharded", "shard_bounds", "traffic"]


def shard_bounds(n: int, world: int) -> list[int]:
    """Row boundaries: rank p holds rows [b[p], b[p+1]) of a module with n adapters (sizes differ by
    at most one; with n < world some ranks hold none)."""
    return [p * n // world for p in range(world + 1)]


def candidates_per_token(config, n_total: int, n_local: int) -> int:
    k, m = config.sizes(n_total)
    return min(k if config.router == "lag" else m, n_local)


def fields_of(router: str) -> int:
    return 3 if router == "lag" else 2


def traffic(
    *, tokens: list[int], d_in: int, d_out: int, itemsize: int, cands: list[int], router: str, remote_picks: int
) -> dict[str, int]:
    """Bytes sent between ranks by one module call (see the module docstring), by phase."""
    p, t = len(tokens), sum(tokens)
    return {
        "sizes": 8 * p * (p - 1),
        "activations": (p - 1) * t * d_in * itemsize,
        "candidates": 4 * fields_of(router) * sum(c * (t - tp) for c, tp in zip(cands, tokens)),
        "counts": 8 * p * (p - 1),
        "requests": 8 * remote_picks,
        "outputs": 4 * d_out * remote_picks,
    }


class _Exchange:
    """The collectives of one call, on the tensors' device, counting the bytes sent to other ranks."""

    def __init__(self, group, rank: int, world: int):
        self.group, self.rank, self.world = group, rank, world
        self.sent: dict[str, int] = {}

    def counts(self, n: int, device) -> list[int]:
        out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([n], dtype=torch.int64, device=device), group=self.group)
        self.sent["sizes"] = 8 * (self.world - 1)
        return [int(t.item()) for t in out]

    def all_to_all(self, phase: str, send: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        """Rows send[sum(send_rows[:q]) ...] go to rank q; returns what every rank sent here, by rank."""
        send = send.contiguous()
        out = torch.empty((sum(recv_rows), *send.shape[1:]), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(out, send, recv_rows, send_rows, group=self.group)
        row_bytes = send[0].numel() * send.element_size() if send.shape[0] else 0
        self.sent[phase] = self.sent.get(phase, 0) + row_bytes * (sum(send_rows) - send_rows[self.rank])
        return out


def _f32_bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 values as int32 bit patterns: integer copies never flush or canonicalise anything."""
    return t.float().contiguous().view(torch.int32)


def _bits_f32(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.float32)


def _order(key: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Positions sorting each row by key descending (NaN last), equal keys by ascending adapter id:
    the order every backend uses (kernels/reference.py)."""
    key = torch.nan_to_num(key, nan=float("-inf"))
    by_id = torch.sort(ids, dim=-1, stable=True).indices
    by_key = torch.sort(key.gather(-1, by_id), dim=-1, descending=True, stable=True).indices
    return by_id.gather(-1, by_key)


def _align_to(values: torch.Tensor, order_of_values: torch.Tensor, target_order: torch.Tensor) -> torch.Tensor:
    """``values`` listed in the row order ``order_of_values`` (ids), re-listed in ``target_order``
    (a permutation of the same ids per row)."""
    src = order_of_values.argsort(dim=1)
    dst = target_order.argsort(dim=1)
    return torch.empty_like(values).scatter_(1, dst, values.gather(1, src))


class _NoRoutedGradient(torch.autograd.Function):
    """Identity; a backward through it raises. The ranks exchange candidates and outputs outside
    autograd, so a gradient would silently lack the routed term (an unsharded model has it)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(
            "sharded routing (patch(..., process_group=)) computes no gradient for the routed LoRA term: "
            "run the forward under torch.no_grad() / torch.inference_mode(), or patch without "
            "process_group= (every backend differentiates it there, the routing held fixed)"
        )


class ShardedRoute(LibraryRoute):
    """This rank's rows of one module's library, and the exchange that routes over all ranks.

    ``a_star``/``b_star``/``prototypes`` hold rows [lo, hi) only (possibly none); ``adapter_ids``
    holds the whole module's (global row -> library index, for ``trace``).
    """

    def __init__(
        self,
        library_index: int,
        local,
        adapter_ids: torch.Tensor,
        n_total: int,
        config,
        backend: str,
        group,
        rank: int,
        world: int,
    ):
        super().__init__(
            library_index,
            SimpleNamespace(
                a_star=local.a_star, b_star=local.b_star, prototypes=local.prototypes, adapter_ids=adapter_ids
            ),
            config,
            backend,
        )
        self.group, self.rank, self.world, self.n_total = group, rank, world, n_total
        self.bounds = shard_bounds(n_total, world)
        self.last_traffic: dict[str, int] = {}

    def __getstate__(self):
        raise TypeError(
            "a sharded LAG route holds a torch.distributed process group: a sharded model cannot be "
            "pickled or deep-copied (unpatch it, or patch each copy with its own group)"
        )

    def extra_repr(self) -> str:
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        return f"{super().extra_repr()}, rows [{lo}, {hi}) of {self.n_total} on rank {self.rank}/{self.world}"

    def add_to(
        self, x: torch.Tensor, y: torch.Tensor, allowed: torch.Tensor | None = None, scope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if allowed is not None:
            raise NotImplementedError(
                "lag_triton.scope does not restrict sharded routing (patch(..., "
                "process_group=)) yet: scope an unsharded model"
            )
        self.check_usable()
        xr = x if x.dtype == self.a_star.dtype else x.to(self.a_star.dtype)
        ex = _Exchange(self.group, self.rank, self.world)
        delta, sel = self._route(xr, ex)
        self.last_traffic = ex.sent
        if y.dtype == torch.float64:
            out = y + delta.double()
        else:
            out = (y.float() + delta).to(y.dtype)  # one rounding into y's dtype, as the apply op
        if torch.is_grad_enabled() and xr.requires_grad:
            out = _NoRoutedGradient.apply(out)
        return out, sel

    # -- the phases (module docstring) ----------------------------------------------------------
    def _route(self, x: torch.Tensor, ex: _Exchange) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = ex.counts(x.shape[0], x.device)
        offsets = [sum(tokens[:p]) for p in range(self.world + 1)]
        x_all = ex.all_to_all("activations", x.repeat(self.world, 1), [x.shape[0]] * self.world, tokens)
        cands = [
            candidates_per_token(self.config, self.n_total, self.bounds[p + 1] - self.bounds[p])
            for p in range(self.world)
        ]
        payload, rows, z = self._local_candidates(x_all, cands[self.rank])
        f = fields_of(self.config.router)
        mine = ex.all_to_all(
            "candidates",
            payload.reshape(-1),
            [t * cands[self.rank] * f for t in tokens],
            [x.shape[0] * c * f for c in cands],
        )
        blocks = [b.view(x.shape[0], c, f) for b, c in zip(mine.split([x.shape[0] * c * f for c in cands]), cands)]
        merged = torch.cat(blocks, dim=1)  # [T_q, sum c_p, F]
        sel, w, column = self._merge(merged)
        u = self._fetch_outputs(ex, column, cands, offsets[self.rank], rows, z, x.device)  # [T_q, m, d_out]
        delta = torch.zeros((x.shape[0], self.b_star.shape[1]), dtype=torch.float32, device=x.device)
        for j in range(sel.shape[1]):  # slot order, fp32, as the reference apply sums
            delta += w[:, j, None] * u[:, j]
        return delta, sel

    def _local_candidates(self, x_all: torch.Tensor, c: int):
        """(payload [T, c, F] int32: id, then score and/or norm bits; local rows [T, c]; z [T, c, r])."""
        t, r = x_all.shape[0], self.a_star.shape[1]
        f = fields_of(self.config.router)
        if c == 0 or t == 0:
            empty = torch.empty((t, c), dtype=torch.int64, device=x_all.device)
            return (
                torch.empty((t, c, f), dtype=torch.int32, device=x_all.device),
                empty,
                torch.empty((t, c, r), dtype=torch.float32, device=x_all.device),
            )
        ops, router = self.ops, self.config.router
        scores = None
        if router == "spectr":
            idx = torch.arange(self.a_star.shape[0], device=x_all.device, dtype=torch.int32).expand(t, -1).contiguous()
        else:
            idx, scores = ops.arrow_topk(x_all, self.prototypes, c)
        rows, _, z = ops.spectr_rerank(
            x_all, self.a_star, idx, c, "uniform", 1.0, scores if router == "arrow" else None
        )
        fields = [(rows.long() + self.bounds[self.rank]).to(torch.int32)]
        if scores is not None:
            fields.append(_f32_bits(_align_to(scores, idx.long(), rows.long())))
        if router != "arrow":
            fields.append(_f32_bits(z.norm(dim=-1)))
        return torch.stack(fields, dim=-1), rows.long(), z

    def _merge(self, merged: torch.Tensor):
        """Global picks of this rank's tokens: (sel [T, m] ids, w [T, m], their columns in ``merged``)."""
        k, m = self.config.sizes(self.n_total)
        ids = merged[..., 0].long()
        columns = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        if self.config.router == "lag":  # Arrow top-k by score, then SpectR top-m by norm among those
            top = _order(_bits_f32(merged[..., 1]), ids)[:, :k]
            ids, columns = ids.gather(1, top), columns.gather(1, top)
            key = _bits_f32(merged[..., 2]).gather(1, top)
        else:  # "arrow": by score; "spectr": by norm
            key = _bits_f32(merged[..., 1])
        pick = _order(key, ids)[:, :m]
        chosen_keys = key.gather(1, pick)
        w = selection_weights(chosen_keys, self.config.combine, self.config.temperature)
        return ids.gather(1, pick), w, columns.gather(1, pick)

    def _fetch_outputs(
        self,
        ex: _Exchange,
        column: torch.Tensor,
        cands: list[int],
        token_offset: int,
        rows: torch.Tensor,
        z: torch.Tensor,
        device,
    ) -> torch.Tensor:
        """B*_j z_j (fp32 [T_q, m, d_out]) for every pick, computed by the adapter's owner."""
        t, m = column.shape
        starts = torch.tensor([sum(cands[:p]) for p in range(self.world)], device=device)
        flat = column.reshape(-1)
        owner = torch.bucketize(flat, starts, right=True) - 1
        c_owner = torch.tensor(cands, device=device)[owner]
        token = torch.arange(t, device=device).repeat_interleave(m)
        position = (token_offset + token) * c_owner + (flat - starts[owner])  # in the owner's [T, c] candidates
        order = torch.sort(owner, stable=True).indices
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = ex.all_to_all("counts", send_counts, [1] * self.world, [1] * self.world)
        send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()
        wanted = ex.all_to_all("requests", position[order], send_counts, recv_counts)
        answers = ex.all_to_all("outputs", self._outputs_for(wanted, rows, z), recv_counts, send_counts)
        u = torch.empty((t * m, self.b_star.shape[1]), dtype=torch.float32, device=device)
        u[order] = answers
        return u.view(t, m, self.b_star.shape[1])

    def _outputs_for(self, positions: torch.Tensor, rows: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """B* z (fp32 [R, d_out]) of the requested local candidates, with the backend's apply op."""
        d_out, r = self.b_star.shape[1], self.b_star.shape[2]
        out = torch.zeros((positions.shape[0], d_out), dtype=torch.float32, device=positions.device)
        if positions.shape[0]:
            sel = rows.reshape(-1)[positions].to(torch.int32)[:, None]
            z_sel = z.reshape(-1, r)[positions][:, None, :].contiguous()
            ones = torch.ones(sel.shape, dtype=torch.float32, device=positions.device)
            self.ops.lora_apply(out, self.b_star, sel, ones, z_sel)
        return out


# -- patch ------------------------------------------------------------------------------------------
def _group_info(group) -> tuple[int, int, dict[str, str]]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "process_group given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup (dist.group.WORLD for the default "
            f"group), got {type(group).__name__}"
        )
    get_config = getattr(dist, "get_backend_config", None)  # "cpu:gloo,cuda:nccl": per device type
    backends = device_backends(get_config(group) if get_config is not None else dist.get_backend(group))
    return dist.get_rank(group), dist.get_world_size(group), backends


# What "undefined" (``init_process_group()`` without a backend) stands for where only the name is known
# (a torch without get_backend_config): gloo for CPU tensors and NCCL for CUDA tensors, torch's
# default_device_backend_map. (Recent torch releases set up the detected accelerator's backend only,
# which get_backend_config reports: "cuda:nccl" on a GPU machine, "cpu:gloo" elsewhere.)
_DEFAULT_BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
_CAPABILITY = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda")}


def device_backends(config: str) -> dict[str, str]:
    """Device type -> communication backend of a process group, from its backend config
    (``dist.get_backend_config``: "cpu:gloo,cuda:nccl", "cuda:nccl", "cpu:gloo,cuda:gloo") or its
    backend name (``dist.get_backend``: "nccl", "gloo", or "undefined" for a group made by
    ``init_process_group()`` without a backend, which torch gives its default per-device backends)."""
    config = str(config).strip().lower()
    if ":" in config:
        pairs = [pair.split(":", 1) for pair in config.split(",") if pair.strip()]
        return {device.strip(): backend.strip() for device, backend in pairs}
    if config in ("", "undefined"):
        return dict(_DEFAULT_BACKENDS)
    capability = getattr(getattr(dist, "Backend", None), "backend_capability", None) or _CAPABILITY
    return dict.fromkeys(capability.get(config, ("cpu", "cuda")), config)


def comm_problem(device_type: str, backends: dict[str, str]) -> str | None:
    """Why a layer on ``device_type`` cannot be routed over a group with ``backends``, or None:
    CUDA layers need NCCL for CUDA tensors, CPU layers a backend for CPU tensors (gloo)."""
    backend = backends.get(device_type)
    if device_type == "cuda" and backend == "nccl":
        return None
    if device_type == "cpu" and backend is not None and backend != "nccl":
        return None
    uses = f"uses {backend} for {device_type} tensors" if backend else f"has no backend for {device_type} tensors"
    config = ",".join(f"{d}:{b}" for d, b in backends.items())
    return f"the process group ({config}) {uses}: use gloo for CPU models and nccl for CUDA models"


def comm_device(backends: dict[str, str]) -> torch.device:
    """Where patch's own agreement collectives run: CPU when the group has a CPU backend (the same
    choice on every rank, whose groups have the same config), else this rank's current CUDA device."""
    if "cpu" in backends:
        return torch.device("cpu")
    if "cuda" in backends:
        return torch.device("cuda", torch.cuda.current_device())
    config = ",".join(f"{d}:{b}" for d, b in backends.items())
    raise ValueError(
        f"the process group ({config}) has no backend for CPU or CUDA tensors: use gloo for CPU models "
        "and nccl for CUDA models"
    )


def _fingerprint(libs, plan, config) -> str:
    """What every rank must agree on, or the collectives would pair up wrong data."""
    desc = [
        # the dtype each layer routes in (the exchanged buffers' sizes) and which adapter each row is
        (
            name,
            idx,
            w.num_adapters,
            w.rank,
            w.d_in,
            w.d_out,
            str(w.dtype),
            str(_route_dtype(layer.dtype)),
            _ids_digest(w),
        )
        for name, idx, w, _, layer in plan
    ]
    return json.dumps([[lib.names for lib in libs], desc, repr(config)], sort_keys=True)


def _ids_digest(weights) -> str:
    """A digest of a module's adapter ids and ranks (a few KB even at N = 100k)."""
    h = hashlib.sha256(weights.adapter_ids.to("cpu", torch.int64).numpy().tobytes())
    if weights.ranks is not None:
        h.update(weights.ranks.to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _agree(text: str | None, group, rank: int, world: int, device, failed: str = "failed their patch checks") -> None:
    """Raise on every rank unless every rank passed this step (``text`` not None) with the same
    ``text``: a rank that raised alone would leave the others waiting in the first collective."""
    digest = -1 if text is None else int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(out, torch.tensor([digest], dtype=torch.int64, device=device), group=group)
    digests = [int(t.item()) for t in out]
    failed_ranks = [p for p, d in enumerate(digests) if d == -1]
    if failed_ranks and text is not None:
        raise ValueError(f"rank {rank}: ranks {failed_ranks} {failed} (their errors name the cause)")
    differ = [p for p, d in enumerate(digests) if d != digest]
    if differ and text is not None:
        raise ValueError(
            f"rank {rank}: ranks {differ} patch with other libraries, modules or settings; every rank "
            "of the process group must patch the same model with the same libraries and settings"
        )


def _local_rows(weights, lo: int, hi: int, device, dtype):
    """Rows [lo, hi) of a module's factors, copied to the device (shapes [0, ...] when empty)."""
    return SimpleNamespace(**weights.copy_rows(lo, hi, device, dtype))


def _plan(model, libs, backend: str, backends: dict[str, str], already: int) -> tuple[list, _Targets]:
    """``patch``'s checks, per module: (name, library index, weights, backend, layer info); and
    where the modules are."""
    targets = _targets(model, libs)
    plan = []
    for offset, lib in enumerate(libs):
        for name, weights in lib.modules.items():
            module = targets.modules.get(name)
            base = getattr(module, "base_layer", module)
            if isinstance(base, ExpertProjection) or name in targets.routers:
                raise ValueError(
                    f"library {lib.label}, module {name!r}: the router or an expert of an MoE layer. Sharded routing "
                    "does not route MoE layers: each rank's tokens reach other experts, and the ranks must call "
                    "every routed module together"
                )
            layer = _check_layer(lib, name, module, weights, model)  # not a router: refused above
            problem = comm_problem(layer.device.type, backends)
            if problem is not None:
                raise ValueError(f"module {name!r} is on {layer.device} but {problem}")
            try:  # the whole module's maps: ids and ranks must index the same names on every rank
                weights.check_maps(len(lib.names))
            except ValueError as e:
                raise ValueError(f"library {lib.label}, module {name!r}: {e}") from None
            plan.append((name, already + offset, weights, resolve_backend(backend, layer.device), layer))
    return plan, targets


def patch_sharded(model, libraries, routing_config, backend: str, group):
    """``patch`` with a process group (called by :func:`lag_triton.patch`): checks the settings
    (``routing_config()`` builds them), loads ``libraries`` (as ``patch`` takes them) and checks like
    ``patch``, then each rank copies only its rows of every module. Every rank must call it with the
    same arguments; an error on one rank (a library file missing on its node, a bad setting) is
    raised on every rank."""
    rank, world, backends = _group_info(group)
    already = getattr(model, "_lag_num_libraries", 0)
    agree_on = comm_device(backends)  # raises alike on every rank: their groups have the same config
    try:
        config = routing_config()
        check_patched_root(model, "patch")
        libs = _as_libraries(libraries)
        plan, targets = _plan(model, libs, backend, backends, already)
    except BaseException:
        _agree(None, group, rank, world, agree_on)
        raise
    _agree(_fingerprint(libs, plan, config), group, rank, world, agree_on)

    def build(name, idx, weights, be, layer):
        lo, hi = shard_bounds(weights.num_adapters, world)[rank : rank + 2]
        local = _local_rows(weights, lo, hi, layer.device, _route_dtype(layer.dtype))
        try:  # this rank's rows only, as copied (a value the routing dtype cannot hold is caught too)
            check_finite(**vars(local))
        except ValueError as e:
            raise ValueError(f"library {libs[idx - already].label}, module {name!r}, rows [{lo}, {hi}): {e}") from None
        ids = weights.adapter_ids.to(layer.device, torch.int64, copy=True)
        return ShardedRoute(idx, local, ids, weights.num_adapters, config, be, group, rank, world)

    try:  # every rank copies its shards, then all agree that all did before any model changes
        routes = _build_routes(plan, libs, already, build, lambda w, layer: _shard_bytes(w, layer, world, rank))
    except BaseException:
        _agree(None, group, rank, world, agree_on, failed="failed to copy or check their shards")
        raise
    _agree("copied", group, rank, world, agree_on, failed="failed to copy or check their shards")
    return _attach(model, routes, libs, already, targets)


def _shard_bytes(weights, layer, world: int, rank: int) -> int:
    """Bytes this rank copies of ``weights``: its rows of the factors in the routing dtype, every id."""
    lo, hi = shard_bounds(weights.num_adapters, world)[rank : rank + 2]
    row = weights.rank * (weights.d_in + weights.d_out) + weights.d_in  # A*, B*, prototype
    return row * (hi - lo) * _route_dtype(layer.dtype).itemsize + weights.adapter_ids.numel() * 8

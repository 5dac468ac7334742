"""One module's aligned factors (:class:`ModuleWeights`) and the checks that keep them usable.

Per module m with N_m adapters (r = the library's r_max, rank padding is zero rows/columns):

    a_star      [N_m, r, d_in]   A* = V^T, orthonormal rows, sigma descending
    b_star      [N_m, d_out, r]  B* = U Sigma (scaling folded in)
    prototypes  [N_m, d_in]      A*[:, 0], contiguous (the Arrow prototypes)
    adapter_ids [N_m] int64      row -> index into Library.names
    ranks       [N_m] int32      each adapter's true rank at this module (optional)

Structure (types, shapes, dtypes, devices) is checked on construction, which costs nothing.
Values (ids in range, ranks, finiteness) need the data: :meth:`ModuleWeights.check_values`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

FACTORS = ("a_star", "b_star", "prototypes")
INDEX_MAPS = ("adapter_ids", "ranks")
FIELDS = FACTORS + INDEX_MAPS
# The dtypes the kernels route in, plus fp64 (patch routes fp64 layers in fp32).
FACTOR_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


_CHECK_CHUNK = 2**24  # elements per isfinite pass: its bool temporary stays at 16 MB for any library size


def held_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype ``ModuleWeights.to(..., dtype)`` holds ``t`` in: factors cast, integer maps kept."""
    return dtype if (dtype is not None and t.is_floating_point()) else t.dtype


def _all_finite(t: torch.Tensor) -> bool:
    rows = max(1, _CHECK_CHUNK // max(1, t[0].numel())) if t.shape[0] else 1
    return all(bool(torch.isfinite(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))


def check_finite(**factors: torch.Tensor) -> None:
    """Raise ValueError naming the first factor that holds NaN or inf (reads them all: a host sync)."""
    for name, t in factors.items():
        if t.device.type == "meta":
            raise ValueError("tensors are on the meta device (they hold no values)")
        if not _all_finite(t):
            raise ValueError(f"{name} holds NaN or inf")


def check_index_maps(adapter_ids: torch.Tensor, ranks: torch.Tensor | None, rank: int, num_names: int) -> None:
    """Raise ValueError unless ``adapter_ids`` index ``num_names`` names once each, in increasing
    order, and ``ranks`` (None: every adapter has rank ``rank``) lie in [1, rank]."""
    ids = adapter_ids.to("cpu", torch.int64)
    bad = ids[(ids < 0) | (ids >= num_names)]
    if bad.numel():
        raise ValueError(
            f"adapter_ids holds {bad[0].item()}, outside [0, {num_names}) (the library has {num_names} names)"
        )
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"adapter_ids repeats an adapter: {ids.tolist()[:20]}")
    if (ids[1:] < ids[:-1]).any():  # every backend breaks a tie by row: rows must be in library order
        raise ValueError(
            f"adapter_ids must increase from row to row (rows in library order, so that ties go to the "
            f"lower adapter index), got {ids.tolist()[:20]}"
        )
    if ranks is not None:
        ranks = ranks.to("cpu", torch.int64)
        if ((ranks < 1) | (ranks > rank)).any():
            raise ValueError(f"ranks must lie in [1, r={rank}], got {ranks.tolist()[:20]}")


@dataclass(frozen=True)
class ModuleWeights:
    """The aligned factors of every adapter that targets one module (shapes in the module docstring)."""

    a_star: torch.Tensor
    b_star: torch.Tensor
    prototypes: torch.Tensor
    adapter_ids: torch.Tensor
    ranks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for f in FIELDS:
            t = getattr(self, f)
            if not (isinstance(t, torch.Tensor) or (f == "ranks" and t is None)):
                raise ValueError(f"ModuleWeights.{f} must be a torch.Tensor, got {type(t).__name__}")
        if self.a_star.dim() != 3:
            raise ValueError(f"ModuleWeights.a_star must be [N, r, d_in], got shape {tuple(self.a_star.shape)}")
        n, r, d_in = self.a_star.shape
        if n == 0:
            raise ValueError("ModuleWeights has no adapters (a_star is [0, r, d_in]); every module needs at least one")
        if r == 0 or d_in == 0:
            raise ValueError(f"ModuleWeights.a_star has an empty dimension: shape {tuple(self.a_star.shape)}")
        expected = {"b_star": (n, None, r), "prototypes": (n, d_in), "adapter_ids": (n,), "ranks": (n,)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is None:
                continue
            if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
                raise ValueError(
                    f"ModuleWeights.{name} has shape {tuple(t.shape)}; expected "
                    f"{tuple('d_out' if s is None else s for s in shape)} for a_star {tuple(self.a_star.shape)}"
                )
        if self.b_star.shape[1] == 0:
            raise ValueError(f"ModuleWeights.b_star has d_out = 0: shape {tuple(self.b_star.shape)}")
        for f in FACTORS:
            t = getattr(self, f)
            if t.dtype not in FACTOR_DTYPES:
                raise ValueError(
                    f"ModuleWeights.{f} has dtype {t.dtype}; factors must be float64, float32, float16 or bfloat16"
                )
        for f in INDEX_MAPS:
            t = getattr(self, f)
            if t is not None and t.dtype not in _INDEX_DTYPES:
                raise ValueError(f"ModuleWeights.{f} has dtype {t.dtype}; expected an integer dtype")
        devices = {f: getattr(self, f).device for f in FIELDS if getattr(self, f) is not None}
        if len(set(devices.values())) != 1:
            raise ValueError(f"ModuleWeights tensors are on different devices: {devices}")

    @property
    def num_adapters(self) -> int:
        return self.a_star.shape[0]

    @property
    def d_in(self) -> int:
        return self.a_star.shape[2]

    @property
    def d_out(self) -> int:
        return self.b_star.shape[1]

    @property
    def rank(self) -> int:
        return self.a_star.shape[1]

    @property
    def device(self) -> torch.device:
        return self.a_star.device

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of every tensor, the factors counted in ``dtype`` (as ``to(..., dtype)`` would hold them)."""
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * held_dtype(t, dtype).itemsize for t in tensors if t is not None)

    def check_values(self, num_names: int) -> None:
        """Raise ValueError naming the field unless ids index ``num_names`` names once each, in
        increasing order, ranks lie in [1, r] and every factor is finite. Reads all the data (a host
        sync on a GPU)."""
        self.check_maps(num_names)
        check_finite(**{f: getattr(self, f) for f in FACTORS})

    def check_maps(self, num_names: int) -> None:
        """The index maps part of :meth:`check_values` (ids, ranks: a few bytes per adapter)."""
        if self.device.type == "meta":
            raise ValueError("tensors are on the meta device (they hold no values)")
        check_index_maps(self.adapter_ids, self.ranks, self.rank, num_names)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the A* factors (what ``Library.dtype`` reports)."""
        return self.a_star.dtype

    def copy_rows(self, lo: int, hi: int, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """New tensors holding rows [lo, hi) of the factors (``a_star``, ``b_star``, ``prototypes``;
        [0, ...] shapes when empty) on ``device``, cast to ``dtype``: what a shard of them holds."""

        def rows(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((hi - lo, *t.shape[1:]), dtype=held_dtype(t, dtype), device=device or t.device).copy_(
                t[lo:hi]
            )

        return {f: rows(getattr(self, f)) for f in FACTORS}

    def to(self, device=None, dtype: torch.dtype | None = None, *, copy: bool = False) -> ModuleWeights:
        """Move to ``device``; cast the factors (not the integer maps) to ``dtype``.

        With ``copy=True`` every tensor is a new contiguous tensor that shares no memory with
        this one (nor with a memory-mapped file behind it).
        """

        def move(t: torch.Tensor | None):
            if t is None:
                return None
            cast = held_dtype(t, dtype)
            if copy:
                return torch.empty(t.shape, dtype=cast, device=device or t.device).copy_(t)
            return t.to(device=device, dtype=cast)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

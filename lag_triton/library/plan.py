"""What a library file will hold, known before any adapter is aligned (:class:`LibraryPlan`).

A plan lists, per module, which adapter fills each row, that adapter's true rank, and the shapes;
from it follow the file's header, the byte offset of every row, and the small index tensors. The
streaming build, ``add`` and ``remove`` all write a plan's file, so a library grown in place has
the same plan, hence the same header and layout, as one built from scratch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import safetensors_io as sio
from .general import GeneralKnowledge
from .peft_reader import PeftAdapter
from .sources import adapter_folders, default_adapter_name
from .stored import FORMAT, FORMAT_VERSION, PLAIN_FORMAT_VERSION, check_names, single_base_model


@dataclass
class ModulePlan:
    """Rows of one module: ``ids[row]`` (index into the names) and ``ranks[row]`` (its true rank)."""

    d_in: int
    d_out: int
    ids: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    @property
    def num_adapters(self) -> int:
        return len(self.ids)


@dataclass
class LibraryPlan:
    """Names, dtype, every module's rows (each module padded to ``r_max``), the base model each
    adapter's config declares (None: none; in ``names`` order) and the general knowledge subtracted
    from every adapter (GKS, or None)."""

    names: list[str]
    dtype: torch.dtype
    modules: dict[str, ModulePlan]
    adapter_base_models: list[str | None]
    general: GeneralKnowledge | None = None

    @property
    def base_model(self) -> str | None:
        return single_base_model(self.adapter_base_models)

    @property
    def r_max(self) -> int:
        return max(max(m.ranks) for m in self.modules.values())

    def specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Tensor name -> (dtype, shape), as :meth:`Library.save` would write this library."""
        r, out = self.r_max, {}
        for name, m in self.modules.items():
            n = m.num_adapters
            out.update(
                {
                    f"{name}::a_star": (self.dtype, (n, r, m.d_in)),
                    f"{name}::b_star": (self.dtype, (n, m.d_out, r)),
                    f"{name}::prototypes": (self.dtype, (n, m.d_in)),
                    f"{name}::adapter_ids": (torch.int64, (n,)),
                    f"{name}::ranks": (torch.int32, (n,)),
                }
            )
        return out | (self.general.specs() if self.general else {})

    def metadata(self) -> dict[str, str]:
        return library_metadata(
            self.names,
            self.base_model,
            list(self.modules),
            self.r_max,
            self.dtype,
            self.general,
            self.adapter_base_models,
        )

    def layout(self) -> sio.Layout:
        return sio.plan_layout(self.specs(), self.metadata())

    def fixed_tensors(self) -> dict[str, torch.Tensor]:
        """The small tensors known before any adapter is aligned: index maps and general means."""
        out = self.general.tensors() if self.general else {}
        for name, m in self.modules.items():
            out[f"{name}::adapter_ids"] = torch.tensor(m.ids, dtype=torch.int64)
            out[f"{name}::ranks"] = torch.tensor(m.ranks, dtype=torch.int32)
        return out

    def rows_of_adapters(self) -> list[list[tuple[str, int]]]:
        """For every adapter index: the (module, row) pairs it fills."""
        rows: list[list[tuple[str, int]]] = [[] for _ in self.names]
        for name, m in self.modules.items():
            for row, adapter in enumerate(m.ids):
                rows[adapter].append((name, row))
        return rows


def library_metadata(
    names,
    base_model,
    modules,
    r_max: int,
    dtype: torch.dtype,
    general: GeneralKnowledge | None = None,
    adapter_base_models=None,
) -> dict[str, str]:
    """The file's string metadata (shared with ``Library.save``, so both write the same header).
    A library without general knowledge is written as format version 1, which older readers read.
    ``adapter_base_models`` (per adapter, or None) is written as ``base_models`` only where
    ``base_model`` does not already say it (:mod:`.stored`), so other libraries keep their bytes."""
    header = {
        "names": list(names),
        "base_model": base_model,
        "modules": sorted(modules),
        "r_max": r_max,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if adapter_base_models is not None and any(b != base_model for b in adapter_base_models):
        header["base_models"] = list(adapter_base_models)
    if general is not None:
        header["general"] = general.header()
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION if general is not None else PLAIN_FORMAT_VERSION),
        "library": json.dumps(header, sort_keys=True, separators=(",", ":")),
    }


def plan_adapters(
    paths: list[Path],
    first_index: int = 0,
    modules: dict[str, ModulePlan] | None = None,
    general: GeneralKnowledge | None = None,
) -> tuple[dict[str, ModulePlan], list[str | None]]:
    """Read every folder's config and tensor headers (no tensor data) and add its rows to ``modules``
    (the modules of an existing library, for ``add``; one adapter is in memory at a time).

    Adapter ``j`` gets index ``first_index + j``. A module's d_in x d_out must agree across
    adapters and with ``modules``, and with ``general``'s means when given: else
    :class:`AdapterError` naming both sides.
    Returns (modules sorted by name, the base model each adapter of ``paths`` declares or None).
    """
    modules = {} if modules is None else modules
    origin = {m: "the library" for m in modules}
    base_models: list[str | None] = []
    for j, path in enumerate(paths):
        adapter = PeftAdapter.open(path)
        if general is not None:
            general.check(adapter)
        base_models.append(adapter.base_model or None)
        for module, f in adapter.modules.items():
            plan = modules.get(module)
            if plan is None:
                plan = modules[module] = ModulePlan(f.d_in, f.d_out)
                origin[module] = f"adapter {str(adapter.path)!r}"
            if (f.d_in, f.d_out) != (plan.d_in, plan.d_out):
                raise adapter.error(
                    f"module {module!r} has d_in x d_out = {f.d_in} x {f.d_out} "
                    f"(lora_A {f.key_a!r}) but {origin[module]} has "
                    f"{plan.d_in} x {plan.d_out}: all adapters must share one base model"
                )
            plan.ids.append(first_index + j)
            plan.ranks.append(f.library_rank)
    return dict(sorted(modules.items())), base_models


def check_folder_names(paths, names) -> tuple[list[Path], list[str]]:
    """(local folders, names: folder names or Hub paths by default), checked: unique names, one per
    folder. Hub paths are fetched here (:mod:`.sources`)."""
    from os import PathLike

    paths = [paths] if isinstance(paths, (str, PathLike)) else list(paths)
    for p in paths:
        if not isinstance(p, (str, PathLike)):
            raise TypeError(f"adapter folders must be paths (str or os.PathLike), got {p!r:.60} ({type(p).__name__})")
    if not paths:
        raise ValueError("at least one adapter folder is needed")
    if names is not None:
        names = check_names(names)
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} adapter folders")
    folders = adapter_folders(paths)  # after the cheap checks: this may download
    if names is None:
        names = [default_adapter_name(p, f) for p, f in zip(paths, folders)]
        check_default_names(paths, names)
    return folders, names


def check_default_names(paths, names: list[str]) -> None:
    """Raise ValueError when two adapters named by default (``names``, from ``paths``) share a name."""
    counts = Counter(names)  # not names.count per name: quadratic in a 10,000-adapter build
    name = next((n for n in names if counts[n] > 1), None)
    if name is not None:
        where = [str(p) for p, n in zip(paths, names) if n == name]
        raise ValueError(
            f"adapters are named by their folder's name by default, and {len(where)} folders are named "
            f"{name!r} ({', '.join(where[:3])}{', ...' if len(where) > 3 else ''}); give names= (the "
            "command line: --names), e.g. from the folders' parents"
        )


def check_new_adapters(paths, names, library: str, existing: list[str]) -> tuple[list[Path], list[str]]:
    """:func:`check_folder_names` for adapters added to ``library`` (its description, e.g. "library
    file 'x'"), whose adapters are ``existing``: a name it has already is a ValueError."""
    paths, new_names = check_folder_names(paths, names)
    taken = sorted(set(new_names) & set(existing))
    if taken:
        raise ValueError(
            f"{library} already has adapters named {taken[:10]}: names must be unique "
            "(remove the old ones first, or give other --names)"
        )
    return paths, new_names


def single_factor_dtype(dtypes: set[torch.dtype], library: str, needs: str = "add/remove") -> torch.dtype:
    """The one factor dtype of ``library`` (what ``needs`` writes every row in), else ValueError."""
    if len(dtypes) != 1:
        raise ValueError(
            f"{library} mixes factor dtypes {sorted(map(str, dtypes))}; {needs} needs one dtype (load it, "
            "cast with .to(dtype=...) and save it first)"
        )
    return next(iter(dtypes))


def stored_module_plans(stored) -> dict[str, tuple[ModulePlan, list[int]]]:
    """module -> (its plan as a library file stores it, the stored adapter ids), from the file's
    checked index maps (:class:`.stored.StoredLibrary`): what ``add``, ``remove`` and a folder's
    compaction copy rows by."""
    out = {}
    for name, m in stored.modules.items():
        ids, ranks = stored.index_maps(name)
        ranks = ranks.tolist() if ranks is not None else [m.rank] * m.num_adapters
        out[name] = (ModulePlan(m.d_in, m.d_out, ids.tolist(), ranks), ids.tolist())
    return out

"""Grow or shrink a library file in place: ``add`` appends adapters, ``remove`` drops some.

Neither re-aligns an adapter already in the library: its rows are copied from the old file (by
the kernel, ``copy_file_range``, when the rank padding is unchanged; re-padded otherwise), and
only new adapters are aligned. The result has the same bytes as building the library from
scratch from the same folders in the same order (``add``: old adapters, then the new ones), as
long as the old file was built by lag_triton (ascending rows, true ranks recorded). A library
built with general knowledge subtraction keeps its means: ``add`` subtracts them from the new
adapters, as the build did from the others. The base model is decided as a build decides it, from
the base model each adapter declares (``base_models``, :mod:`.stored`). A file written before that
was recorded says only ``base_model``, and every adapter is taken to declare it: exact unless its
adapters declared different base models, or only some of them declared one.

Both write a complete new file next to the old one and rename it over it: the library is
replaced atomically, and the disk must hold a second copy while the call runs. On a library folder
(:mod:`.folder`) ``add`` writes one new part of the new adapters only, and ``remove`` rewrites only
the parts that hold removed adapters.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .build import BuildReport, write_library
from .folder import add_to_folder, is_library_folder, remove_from_folder
from .plan import (
    LibraryPlan,
    ModulePlan,
    check_new_adapters,
    plan_adapters,
    single_factor_dtype,
    stored_module_plans,
)
from .sources import refuse_overwriting_inputs
from .stored import StoredLibrary, check_names, existing_library_path, read_stored
from .writer import LibraryWriter, RowSource


def _factor_dtype(stored: StoredLibrary) -> torch.dtype:
    return single_factor_dtype(stored.factor_dtypes, f"library file {str(stored.path)!r}")


def add_adapters(
    library,
    paths,
    *,
    names=None,
    output=None,
    workers: int | None = None,
    progress: bool = True,
    resume: bool = False,
) -> BuildReport:
    """Append the PEFT folders ``paths`` to the library file ``library`` (replaced atomically, or
    written to ``output``; a library folder gets one new part, :func:`.folder.add_to_folder`). New
    adapters are aligned into the library's dtype; existing ones are copied. ``resume``: continue a
    killed or failed ``add`` of the same adapters to the same library, aligning only the new adapters
    it had not written (:mod:`.resume`). Raises ValueError for a name already in the library or an
    output that is one of the adapters' files, AdapterError for an adapter whose module shapes
    differ from the library's (or from each other, or from the general means the library subtracts),
    LibraryFormatError for a bad file.
    """
    if is_library_folder(library):
        _refuse_output(library, output, "add")
        return add_to_folder(library, paths, names=names, workers=workers, progress=progress, resume=resume)
    start = time.perf_counter()
    src = existing_library_path(library)
    out = Path(os.path.realpath(src)) if output is None else Path(output)  # in place: a link's target
    paths = paths if isinstance(paths, (str, os.PathLike)) else list(paths)
    refuse_overwriting_inputs(out, paths)
    stored = read_stored(src)
    paths, new_names = check_new_adapters(paths, names, f"library file {str(src)!r}", stored.names)
    dtype = _factor_dtype(stored)
    modules = {name: plan for name, (plan, _) in stored_module_plans(stored).items()}
    old_rows = {name: plan.num_adapters for name, plan in modules.items()}
    first = len(stored.names)
    general = stored.general_knowledge()
    modules, new_base_models = plan_adapters(paths, first_index=first, modules=modules, general=general)
    plan = LibraryPlan(stored.names + new_names, dtype, modules, stored.adapter_base_models + new_base_models, general)
    source = RowSource(stored)

    def copy_old_rows(writer: LibraryWriter) -> None:
        for name, count in old_rows.items():
            writer.copy_rows(name, 0, source, 0, count)

    try:
        aligned, resumed, nbytes = write_library(
            out,
            plan,
            paths,
            first_index=first,
            workers=workers,
            progress=progress,
            desc="aligning new adapters",
            resume=resume,
            copy_rows=copy_old_rows,
        )
    finally:
        source.close()
    return BuildReport(out, len(plan.names), aligned, len(plan.modules), nbytes, time.perf_counter() - start, resumed)


def remove_adapters(library, names, *, output=None) -> BuildReport:
    """Drop the adapters ``names`` from the library file ``library`` (replaced atomically, or
    written to ``output``; a library folder rewrites only the parts that hold them,
    :func:`.folder.remove_from_folder`); a module no remaining adapter targets disappears, and the
    rank padding shrinks to the largest remaining rank. Raises ValueError for an unknown name or for
    removing every adapter."""
    if is_library_folder(library):
        _refuse_output(library, output, "remove")
        return remove_from_folder(library, names)
    start = time.perf_counter()
    src = existing_library_path(library)
    out = Path(os.path.realpath(src)) if output is None else Path(output)  # in place: a link's target
    stored = read_stored(src)
    removed = set(check_names([names] if isinstance(names, str) else names))
    unknown = sorted(removed - set(stored.names))
    if unknown:
        raise ValueError(f"library file {str(src)!r} has no adapters named {unknown[:10]}")
    kept = [i for i, n in enumerate(stored.names) if n not in removed]
    if not kept:
        raise ValueError(f"removing {len(removed)} adapters would leave library file {str(src)!r} empty")
    new_id = {old: new for new, old in enumerate(kept)}
    modules, runs = {}, []
    for name, (plan, ids) in stored_module_plans(stored).items():
        rows = [r for r, i in enumerate(ids) if i in new_id]
        if rows:
            modules[name] = ModulePlan(
                plan.d_in, plan.d_out, [new_id[ids[r]] for r in rows], [plan.ranks[r] for r in rows]
            )
            runs += [(name, dst, src_row, count) for dst, src_row, count in _runs(rows)]
    base_models = stored.adapter_base_models
    plan = LibraryPlan(
        [stored.names[i] for i in kept],
        _factor_dtype(stored),
        dict(sorted(modules.items())),
        [base_models[i] for i in kept],
        stored.general_knowledge(),
    )
    source = RowSource(stored)
    try:
        with LibraryWriter(out, plan) as writer:
            for name, dst, src_row, count in runs:
                writer.copy_rows(name, dst, source, src_row, count)
    finally:
        source.close()
    return BuildReport(out, len(plan.names), 0, len(plan.modules), writer.layout.size, time.perf_counter() - start)


def _refuse_output(library, output, verb: str) -> None:
    if output is not None:
        raise ValueError(
            f"{verb} on library folder {str(library)!r} rewrites its parts in place; output= (-o) is for library files"
        )


def _runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive stretches of kept source rows: (destination row, source row, count)."""
    out: list[tuple[int, int, int]] = []
    for dst, row in enumerate(rows):
        if out and out[-1][1] + out[-1][2] == row:
            d, s, c = out[-1]
            out[-1] = (d, s, c + 1)
        else:
            out.append((dst, row, 1))
    return out

"""Align PEFT adapters into a library, one adapter at a time, into memory or straight into a file.

The file build (:func:`build_library`) reads every folder's config and tensor headers first, which
fixes the whole file layout (:mod:`.plan`); then each adapter is loaded, aligned and its rows are
written where they belong, by this process or by worker processes that write into the same
(temp) file. Memory holds a few adapters, whatever N is; the target appears only when complete.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .align import align_lora
from .general import GeneralKnowledge
from .peft_reader import PeftAdapter
from .plan import LibraryPlan, check_folder_names, plan_adapters
from .resume import BuildJournal, Stamp, find_resumable, set_aside, stamp_before_reading
from .sources import refuse_overwriting_inputs
from .weights import FACTOR_DTYPES, ModuleWeights
from .writer import LibraryWriter, tensor_bytes

# Below this many adapters, starting worker processes costs more than it saves.
_MIN_ADAPTERS_FOR_WORKERS = 16


@dataclass(frozen=True)
class BuildReport:
    """What a build, ``add`` or ``remove`` wrote."""

    path: Path
    adapters: int  # in the library written
    aligned: int  # adapters aligned by this call (add: only the new ones)
    modules: int
    nbytes: int  # file size (a library folder: the part files this call wrote)
    seconds: float
    resumed: int = 0  # adapters whose rows a resumed build took from a killed build's temp file
    untouched: int = 0  # a library folder's adapters in parts this call left as they were
    linked: int = 0  # assemble: adapters whose library file became a part by a hard link (no bytes copied)

    def __str__(self) -> str:
        copied = self.adapters - self.aligned - self.resumed - self.untouched - self.linked  # old rows
        if self.aligned == self.adapters:  # a build: every adapter aligned
            work = f"built in {self.seconds:.1f} s, {self.aligned / max(self.seconds, 1e-9):.1f} adapters/s"
        else:
            parts = [f"{self.aligned} aligned"]
            parts += [f"{self.resumed} kept from a killed build"] if self.resumed else []
            parts += [f"{copied} copied"] if copied else []
            parts += [f"{self.linked} hard-linked"] if self.linked else []
            parts += [f"{self.untouched} left in place"] if self.untouched else []
            work = ", ".join(parts) + f", in {self.seconds:.1f} s"
        return f"{self.path}: {self.adapters} adapters, {self.modules} modules, {self.nbytes:,} bytes ({work})"


# -- one adapter ----------------------------------------------------------------------------------
def align_adapter(
    adapter: PeftAdapter, dtype: torch.dtype, general: GeneralKnowledge | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A* [rank, d_in], B* [d_out, rank]) in ``dtype`` (rank: the module's library rank),
    aligned in float64, after subtracting ``general``'s mean factors (GKS, :mod:`.general`) when given.

    Modules of one rank and shape are aligned in one batched call. Raises AdapterError naming the
    module for non-finite factors or an update that overflows ``dtype``.
    """
    factors = adapter.load_factors()
    if general is not None:
        factors = general.subtract(factors)
    batches: dict[tuple[int, int, int], list[str]] = {}
    for module, f in adapter.modules.items():
        batches.setdefault((f.rank, f.d_in, f.d_out), []).append(module)
    out = {}
    for modules in batches.values():
        a = torch.stack([factors[m][0] for m in modules])
        b = torch.stack([factors[m][1] for m in modules])
        s = torch.tensor([adapter.modules[m].scaling for m in modules], dtype=torch.float64)
        try:
            a_star, b_star = align_lora(a, b, s)
        except ValueError:
            for m in modules:
                if not (factors[m][0].isfinite().all() and factors[m][1].isfinite().all()):
                    raise adapter.error(f"module {m!r} has non-finite values in lora_A/lora_B") from None
            raise adapter.error(
                f"modules {modules[:4]}: the update s*B*A overflows float64 (scalings {s.tolist()[:4]})"
            ) from None
        for j, m in enumerate(modules):
            a_j, b_j = a_star[j].to(dtype), b_star[j].to(dtype)
            if not bool(b_j.isfinite().all()):
                fix = (
                    "build in float32"  # float32 and bfloat16 share one range: only float16's is smaller
                    if dtype == torch.float16
                    else f"it exceeds the range of {dtype} (largest value {torch.finfo(dtype).max:.3g})"
                )
                raise adapter.error(
                    f"module {m!r}: the aligned update overflows {dtype} (its largest singular "
                    f"value is {b_star[j].norm(dim=0).max().item():.3g}); {fix}"
                )
            out[m] = (a_j, b_j)
    return out


Job = tuple[Path, list[tuple[str, int, int]]]  # adapter folder, its (module, row, rank) in the plan


def align_and_write(target, job: Job, general: GeneralKnowledge | None = None) -> None:
    """Open, check against the plan, align and write one adapter (in this process or a worker)."""
    path, rows = job
    adapter = PeftAdapter.open(path)
    planned = {m: rank for m, _, rank in rows}
    found = {m: f.library_rank for m, f in adapter.modules.items()}
    if found != planned:
        changed = sorted(set(found.items()) ^ set(planned.items()))[:3]
        raise adapter.error(f"changed while the library was being built (modules/ranks {changed})")
    aligned = align_adapter(adapter, target.dtype, general)
    for module, row, _ in rows:
        target.write_row(module, row, *aligned[module])


# -- many adapters: in this process or over worker processes ------------------------------------------
_worker_target = None
_worker_general: GeneralKnowledge | None = None


def _start_forkserver_ignoring_ctrl_c() -> None:
    """Start the fork server with SIGINT ignored, which it and the workers it forks keep (an ignored
    signal survives exec; the server restores it in each child): Ctrl-C in a terminal reaches the
    whole process group, and a server or worker interrupted while importing torch printed its
    traceback under the command's one line. This process handles Ctrl-C and shuts the pool down.
    Only the main thread may change a signal's handler: elsewhere the server starts as it would."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()  # spawns the server and returns: SIGINT is ignored here for milliseconds
    finally:
        signal.signal(signal.SIGINT, previous)


def _init_worker(target, general: GeneralKnowledge | None) -> None:
    global _worker_target, _worker_general
    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    _worker_target, _worker_general = target, general  # the means cross once per worker, not per job


def _worker_job(job: Job) -> tuple[Stamp, list | None]:
    """(the adapter's stamp, taken before it is read; the rows, for an in-memory build)."""
    stamp = stamp_before_reading(job[0])
    align_and_write(_worker_target, job, _worker_general)
    return stamp, (_worker_target.take() if isinstance(_worker_target, RowsToParent) else None)


def default_workers(jobs: int) -> int:
    """Worker processes for ``jobs`` adapters: one per available core, none for small builds."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if jobs < _MIN_ADAPTERS_FOR_WORKERS or cores < 2 else min(cores, jobs)


def run_jobs(
    target,
    jobs: list[Job],
    *,
    workers: int | None,
    progress: bool,
    desc: str,
    general: GeneralKnowledge | None = None,
    on_done=None,
) -> None:
    """Align and write every job (subtracting ``general``'s means first, when given); ``workers`` = 0
    aligns here, None picks :func:`default_workers`. ``on_done(position, stamp)`` is called, in job
    order, once job ``position``'s rows are written, with the stamp of the adapter's files taken
    before it was read (:func:`.resume.stamp_before_reading`). Workers write a file target's rows
    themselves; a :class:`MemoryTarget`'s rows come back with each job's result, as does the stamp."""
    on_done = on_done or (lambda position, stamp: None)
    workers = default_workers(len(jobs)) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0 (0 = align in this process), got {workers!r}")
    with tqdm(total=len(jobs), desc=desc, unit=" adapters", disable=not progress, smoothing=0.1) as bar:
        if workers == 0:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # r x r and r x d matrices: more threads only contend (3x slower on 2 busy cores)
            try:
                for position, job in enumerate(jobs):
                    stamp = stamp_before_reading(job[0])
                    align_and_write(target, job, general)
                    on_done(position, stamp)
                    bar.update(1)
            finally:
                torch.set_num_threads(threads)
            return
        context = multiprocessing.get_context("forkserver")  # no fork of a process with OpenMP threads
        context.set_forkserver_preload(["lag_triton.library.build"])  # import torch once, in the server
        _start_forkserver_ignoring_ctrl_c()
        in_memory = isinstance(target, MemoryTarget)
        worker_target = RowsToParent(target.dtype) if in_memory else target
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(worker_target, general)
        ) as pool:
            pending: deque = deque()  # (position, future)

            def finish_oldest() -> None:
                position, future = pending.popleft()
                stamp, rows = future.result()
                if in_memory:
                    target.receive(rows)
                on_done(position, stamp)
                bar.update(1)

            try:
                for position, job in enumerate(jobs):  # at most 2 jobs per worker in flight: memory stays bounded
                    pending.append((position, pool.submit(_worker_job, job)))
                    if len(pending) >= 2 * workers:
                        finish_oldest()
                while pending:
                    finish_oldest()
            except BrokenProcessPool as e:
                pool.shutdown(wait=True, cancel_futures=True)
                raise RuntimeError(
                    f"a worker process aligning adapters died ({e}); a script that builds with "
                    "workers must guard its top level with `if __name__ == '__main__':` (workers "
                    "import it), or pass workers=0"
                ) from None
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


# -- entry points ------------------------------------------------------------------------------------
def check_dtype(dtype) -> torch.dtype:
    if dtype not in FACTOR_DTYPES:
        raise ValueError(f"dtype {dtype} is not a factor dtype; choose one of {FACTOR_DTYPES}")
    return dtype


def plan_build(paths, names, dtype, general_adapters=None) -> tuple[list[Path], LibraryPlan]:
    paths, names = check_folder_names(paths, names)
    dtype = check_dtype(dtype)
    general = None if general_adapters is None else GeneralKnowledge.from_peft(general_adapters)
    modules, base_models = plan_adapters(paths, general=general)
    return paths, LibraryPlan(names, dtype, modules, base_models, general)


def jobs_for(plan: LibraryPlan, paths: list[Path], first_index: int = 0) -> list[Job]:
    """One job per adapter index >= first_index (``paths[j]`` is adapter ``first_index + j``)."""
    rows = plan.rows_of_adapters()
    return [
        (paths[i - first_index], [(m, r, plan.modules[m].ranks[r]) for m, r in rows[i]])
        for i in range(first_index, len(plan.names))
    ]


def build_library(
    paths,
    output,
    *,
    names=None,
    dtype: torch.dtype = torch.float32,
    workers: int | None = None,
    progress: bool = True,
    general_adapters=None,
    resume: bool = False,
    folder: bool = False,
) -> BuildReport:
    """Align PEFT folders straight into the library file ``output`` (see the module docstring).

    The file has the same bytes as ``Library.from_peft(paths, names, dtype=dtype,
    general_adapters=general_adapters).save(output)``. ``workers``: processes aligning in parallel
    (0: this process; None: one per core for 16+ adapters). ``output`` keeps its old content until
    the new file is complete.

    A build that is killed, interrupted or fails after some adapters were written leaves its temp
    file and journal beside ``output``; ``resume=True`` continues the one of the same adapters, names
    and dtype, aligning only the adapters it lacks or that changed since (:mod:`.resume`). Without
    ``resume`` (or without such a file) the build starts from the first adapter and removes them.

    ``folder=True``, or an ``output`` that is a library folder: write a library folder there
    (:mod:`.folder`; one part, replacing any parts it had, atomically).

    Raises ValueError, before any work, for an ``output`` that is one of the adapters' (or general
    adapters') files, AdapterError for a bad adapter.
    """
    from .folder import build_folder, is_library_folder

    if folder or is_library_folder(output):
        kw = dict(names=names, dtype=dtype, workers=workers, progress=progress, resume=resume)
        return build_folder(paths, output, general_adapters=general_adapters, **kw)
    start = time.perf_counter()
    paths = paths if isinstance(paths, (str, os.PathLike)) else list(paths)
    general = general_adapters
    general = general if general is None or isinstance(general, (str, os.PathLike)) else list(general)
    refuse_overwriting_inputs(output, paths)
    refuse_overwriting_inputs(output, general or [], "general adapter")
    paths, plan = plan_build(paths, names, dtype, general)
    aligned, resumed, nbytes = write_library(
        Path(output), plan, paths, workers=workers, progress=progress, desc="aligning adapters", resume=resume
    )
    n = len(plan.names)
    return BuildReport(Path(output), n, aligned, len(plan.modules), nbytes, time.perf_counter() - start, resumed)


def write_library(
    output: Path,
    plan: LibraryPlan,
    paths: list[Path],
    *,
    first_index: int = 0,
    workers: int | None,
    progress: bool,
    desc: str,
    resume: bool,
    copy_rows=None,
) -> tuple[int, int, int]:
    """Write ``plan``'s file at ``output``: ``copy_rows(writer)`` first (``add``: the library's
    adapters), then adapters ``first_index``, ... aligned from ``paths``, each journaled once
    written; with ``resume``, a dead or failed write of this plan is continued (:mod:`.resume`).
    Returns (adapters aligned, adapters carried over from that write, file size)."""
    layout = plan.layout()
    folders = {first_index + j: path for j, path in enumerate(paths)}
    found = find_resumable(output, layout, plan.fixed_tensors(), folders)
    # about to be removed as stale: say what is thrown away
    if found and not found.resumable and found.written:
        warnings.warn(
            f"{output}: starting over, and removing what a killed run to this file left ({found.written} of "
            f"{len(folders)} adapters written, in {found.temp.name}): its rows cannot be kept, since which "
            "row holds which adapter or the general means changed (adapters target other modules now, or "
            "the general adapters changed)",
            stacklevel=3,
        )
    elif found and found.carried and not resume:
        warnings.warn(
            f"{output}: starting over, and removing what a killed run of this same build left "
            f"({len(found.carried)} of {len(folders)} adapters written, in {found.temp.name}); "
            "resume=True (command line: --resume) would have continued it",
            stacklevel=3,
        )
    adopt = found.temp if found and found.resumable and resume else None
    with LibraryWriter(output, plan, adopt=adopt, layout=layout) as writer:
        carried = found.carried if writer.file.adopted else {}
        journal = BuildJournal(writer.file.temp, writer.file.fd, folders, carried)
        todo = [i for i in folders if i not in carried]
        jobs = jobs_for(plan, paths, first_index)
        try:
            if copy_rows is not None:
                copy_rows(writer)
            run_jobs(
                writer.target,
                [jobs[i - first_index] for i in todo],
                workers=workers,
                progress=progress,
                desc=desc + (f" ({len(carried)} kept from a killed build)" if carried else ""),
                general=plan.general,
                on_done=lambda position, stamp: journal.done(todo[position], stamp),
            )
        except BaseException as e:
            _keep_for_resume(e, writer, journal, len(paths))
            raise
        journal.close(keep=False)
    return len(todo), len(carried), layout.size


def _keep_for_resume(error: BaseException, writer: LibraryWriter, journal: BuildJournal, total: int) -> None:
    """A failed build keeps its temp file and journal when they hold some adapters' rows, and says so."""
    if journal.entries == 0:
        journal.close(keep=False)  # nothing worth keeping: the writer removes the temp file
        return
    journal.close(keep=True)
    writer.target.close()
    writer.file.keep()
    kept = set_aside(writer.file.temp, writer.file.path)
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(
            f"{journal.entries} of {total} adapters are written to {kept}; run the same build again "
            "with resume=True (command line: --resume) to align only the others"
        )


class MemoryTarget:
    """Rows kept in memory (``Library.from_peft`` without an output file), zero-padded to r_max."""

    def __init__(self, plan: LibraryPlan):
        self.plan, self.dtype, r = plan, plan.dtype, plan.r_max
        self.a = {m: torch.zeros(p.num_adapters, r, p.d_in, dtype=self.dtype) for m, p in plan.modules.items()}
        self.b = {m: torch.zeros(p.num_adapters, p.d_out, r, dtype=self.dtype) for m, p in plan.modules.items()}

    def write_row(self, module: str, row: int, a_star: torch.Tensor, b_star: torch.Tensor) -> None:
        rank = a_star.shape[0]
        self.a[module][row, :rank] = a_star
        self.b[module][row, :, :rank] = b_star

    def receive(self, rows: list) -> None:
        """Write the rows a worker's :class:`RowsToParent` sent back."""
        for module, row, a_star, b_star in rows:
            self.write_row(module, row, *(RowsToParent.tensor(t, self.dtype) for t in (a_star, b_star)))

    def weights(self) -> dict[str, ModuleWeights]:
        index = self.plan.fixed_tensors()
        return {
            m: ModuleWeights(
                a_star=self.a[m],
                b_star=self.b[m],
                prototypes=self.a[m][:, 0].clone(),
                adapter_ids=index[f"{m}::adapter_ids"],
                ranks=index[f"{m}::ranks"],
            )
            for m in self.plan.modules
        }


class RowsToParent:
    """A worker's target in an in-memory build: the aligned rows of the adapter it is given, which the
    job returns to the parent's :class:`MemoryTarget`. They travel as bytes: a pickled tensor would
    cross through shared memory (/dev/shm), which containers often keep to 64 MB."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.rows: list = []

    def write_row(self, module: str, row: int, a_star: torch.Tensor, b_star: torch.Tensor) -> None:
        # bytearray: unpickled writable, so the parent wraps it without a copy
        self.rows.append((module, row, *((tuple(t.shape), bytearray(tensor_bytes(t))) for t in (a_star, b_star))))

    def take(self) -> list:
        rows, self.rows = self.rows, []
        return rows

    @staticmethod
    def tensor(sent: tuple[tuple[int, ...], bytearray], dtype: torch.dtype) -> torch.Tensor:
        shape, data = sent
        return torch.frombuffer(data, dtype=dtype).view(shape) if data else torch.empty(shape, dtype=dtype)


def build_in_memory(
    paths, names, dtype, progress: bool, general_adapters=None, workers: int = 0
) -> tuple[LibraryPlan, dict[str, ModuleWeights]]:
    paths, plan = plan_build(paths, names, dtype, general_adapters)
    target = MemoryTarget(plan)
    run_jobs(
        target,
        jobs_for(plan, paths),
        workers=workers,
        progress=progress,
        desc="aligning adapters",
        general=plan.general,
    )
    return plan, target.weights()

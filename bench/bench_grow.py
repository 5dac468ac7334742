"""Growing a library: ``add`` / ``remove`` of one adapter on a library file against a library folder,
and what a folder costs when it is read (the copies ``patch`` makes, from parts instead of one file).

    python bench/bench_grow.py --adapters 2000 --layers 4 --parts 8

Writes N + 1 synthetic PEFT folders (bench_build's, Llama-3.2-3B MLP shapes, rank 6, bf16), builds
the first N into one library file and, chunk by chunk, into ``--parts`` files assembled into a
library folder (hard links), then times, each on a warm page cache:

* ``add`` of the last adapter and ``remove`` of it, on the file (a copy of every row) and on the
  folder (one new part; the rewrite of the one part holding it);
* reading every module as ``patch`` keeps it: ``Library.load`` then ``ModuleWeights.to(copy=True)``
  per module on the CPU (best of ``--repeats``), for the file and the folder; both must give equal
  tensors (checked).

Records bench/results/grow-folder-cpu-<date>-n<N>.json with the machine's load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_build import _DTYPES, write_adapters  # noqa: E402
from lag_triton import Library  # noqa: E402
from lag_triton.library import add_adapters, assemble_folder, build_library, remove_adapters  # noqa: E402


def _timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - start, out


def _read_as_patch_does(path) -> tuple[float, dict]:
    """Seconds to load ``path`` and copy every module as patch does on CPU; the copies."""
    start = time.perf_counter()
    lib = Library.load(path, check_values=False)
    copies = {name: m.to("cpu", copy=True) for name, m in lib.modules.items()}
    return time.perf_counter() - start, copies


def run(args) -> dict:
    work = args.workdir
    dtype = _DTYPES[args.library_dtype]
    paths = write_adapters(
        work / "adapters", args.adapters + 1, args.layers, args.hidden, args.intermediate, args.rank, torch.bfloat16
    )
    old, new = paths[:-1], paths[-1:]
    file, folder = work / "library.safetensors", work / "library"
    shutil.rmtree(folder, ignore_errors=True)
    kw = dict(progress=not args.quiet, workers=args.workers)
    build_s, _ = _timed(build_library, old, file, dtype=dtype, **kw)
    bounds = [round(i * len(old) / args.parts) for i in range(args.parts + 1)]
    chunks = [work / f"chunk{i}.safetensors" for i in range(args.parts)]
    for chunk, lo, hi in zip(chunks, bounds, bounds[1:]):
        build_library(old[lo:hi], chunk, dtype=dtype, **kw)
    assemble_folder(folder, chunks)
    for chunk in chunks:
        chunk.unlink()  # the folder holds the only links now
    out: dict = {"build_file_s": round(build_s, 2), "file_bytes": file.stat().st_size}
    for label, lib in (("file", file), ("folder", folder)):
        add_s, report = _timed(add_adapters, lib, new, **kw)
        remove_s, _ = _timed(remove_adapters, lib, [new[0].name])
        out[f"add_{label}_s"], out[f"remove_{label}_s"] = round(add_s, 3), round(remove_s, 3)
        out[f"add_{label}_report"] = str(report)
    reads: dict[str, list[float]] = {"file": [], "folder": []}
    for _ in range(args.repeats):
        for label, lib in (("file", file), ("folder", folder)):
            seconds, copies = _read_as_patch_does(lib)
            reads[label].append(round(seconds, 3))
            if label == "file":
                want = copies
            else:
                assert all(
                    torch.equal(getattr(copies[m], f), getattr(want[m], f))
                    for m in want
                    for f in ("a_star", "b_star", "prototypes", "adapter_ids")
                ), "the folder's modules differ from the file's"
            del copies
    out["read_as_patch_file_s"], out["read_as_patch_folder_s"] = reads["file"], reads["folder"]
    file.unlink()  # the adapters stay for the next run; the libraries are as large as they are
    shutil.rmtree(folder)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=2000)
    p.add_argument("--layers", type=int, default=4, help="MLP layers per adapter (3 modules each)")
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--library-dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--parts", type=int, default=8, help="parts of the folder library")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lag_grow"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not 1 <= args.parts <= args.adapters:
        p.error(f"--parts must lie in [1, --adapters], got {args.parts}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(args)
    record = {
        "what": "add/remove of one adapter on a library file vs a library folder; reading either as patch does",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg": list(os.getloadavg())},
        "versions": {"torch": torch.__version__},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
    }
    stem = f"grow-folder-cpu-{datetime.date.today().isoformat()}-n{args.adapters}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()

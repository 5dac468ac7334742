"""Growing a library: ``add`` / ``remove`` of one adapter on a library file against a library folder,
and what a folder costs when it is read (the copies ``patch`` makes, from parts instead of one file).

    python bench/bench_grow.py --adapters 2000 --layers 4 --parts 8

Writes N + 1 synthetic PEFT folders (bench_build's, Llama-3.2-3B MLP shapes, rank 6, bf16), builds
the first N into one library file and, chunk by chunk, into ``--parts`` files assembled into a
library folder (hard links), then times, each on a warm page cache:

* ``add`` of the last adapter and ``remove`` of it, on the file (a copy of every row) and on the
  folder (one new part; dropping it), then ``remove`` of the middle adapter (the folder rewrites
  the one part holding it);
* reading every module as ``patch`` keeps it: ``Library.load`` then ``to(copy=True)`` per module on
  the CPU, ``--repeats`` times each, alternating which goes first; the two must give equal tensors
  (checked first, module by module).

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


def _read_as_patch_does(path) -> tuple[float, int]:
    """Seconds to load ``path`` and copy every module as patch does on CPU; bytes copied."""
    start = time.perf_counter()
    lib = Library.load(path, check_values=False)
    copies = {name: m.to("cpu", copy=True) for name, m in lib.modules.items()}
    seconds = time.perf_counter() - start
    return seconds, sum(c.nbytes() for c in copies.values())


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
        middle = old[len(old) // 2].name  # a folder rewrites the part that holds it, without it
        remove_s, report = _timed(remove_adapters, lib, [middle])
        out[f"remove_middle_{label}_s"], out[f"remove_middle_{label}_report"] = round(remove_s, 3), str(report)
    whole, parted = Library.load(file), Library.load(folder)  # equal, module by module (bounded memory)
    assert whole.names == parted.names
    for name, m in whole.modules.items():
        a, b = m.to(copy=True), parted.modules[name].to(copy=True)
        fields = ("a_star", "b_star", "prototypes", "adapter_ids", "ranks")
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in fields), f"module {name} differs"
    del whole, parted, a, b
    reads: dict[str, list[float]] = {"file": [], "folder": []}
    for i in range(args.repeats):  # alternating which goes first; nothing held between reads
        for label in ("file", "folder") if i % 2 == 0 else ("folder", "file"):
            seconds, _ = _read_as_patch_does(file if label == "file" else folder)
            reads[label].append(round(seconds, 3))
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

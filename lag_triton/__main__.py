"""Command line: ``python -m lag_triton {build,add,remove,assemble,compact,info,doctor,demo}``."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BACKENDS = ("auto", "triton", "cuda", "torch")
EXIT_FAILED = 1  # the work was attempted and failed (unreadable or invalid input, ...)
EXIT_USAGE = 2  # the command line cannot be carried out as given (as argparse's own errors)
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a program whose reader went away

_EPILOG = (
    f"Errors print one line (add --debug for the traceback). Exit status: 0 on success, {EXIT_FAILED} "
    f"when the work fails (an unreadable or invalid adapter or library), {EXIT_USAGE} for a command "
    "line that cannot be carried out (bad option values, an output path that cannot be written)."
)


class UsageError(Exception):
    """A command-line value that cannot work, found before any work starts."""


def _check_output_file(path: Path, option: str = "-o/--output") -> None:
    from .library.safetensors_io import check_output_path

    try:
        check_output_path(path)
    except OSError as e:
        raise UsageError(f"{option}: {e.args[1] if len(e.args) > 1 else e}") from None


def _check_library_output(args: argparse.Namespace) -> None:
    """``add`` / ``remove``: the library exists (else the error ``info`` gives: exit 1), and the file
    written (-o, or the library itself, replaced in place) can be written; a library folder's
    manifest can be replaced (and -o is refused: its parts are rewritten in place)."""
    from .library.folder import MANIFEST, is_library_folder
    from .library.stored import existing_library_path

    if is_library_folder(args.library):
        if args.output is not None:
            raise UsageError(f"-o/--output: {str(args.library)!r} is a library folder, grown or shrunk in place")
        _check_output_file(args.library / MANIFEST, "library folder")
        return
    existing_library_path(args.library)
    if args.output is not None:
        _check_output_file(args.output)
    else:
        in_place = Path(os.path.realpath(args.library))  # a link's target is replaced, not the link
        _check_output_file(in_place, "library (replaced in place; -o/--output writes elsewhere)")


def _check_not_input(output: Path, args: argparse.Namespace, adapters: list[str], option: str = "-o/--output") -> None:
    """Writing ``output`` must not replace an input: an adapter's (or general adapter's) config or
    weights, or the --adapters-from list file (compared as files, when ``output`` exists)."""
    from .library.sources import input_overwritten

    hit = input_overwritten(output, adapters) or input_overwritten(output, getattr(args, "general", None) or [])
    listed = args.adapters_from
    if hit is None and listed not in (None, "-") and os.path.isfile(output) and os.path.isfile(listed):
        hit = listed if os.path.samefile(listed, output) else None
    if hit is not None:
        raise UsageError(f"{option} {str(output)!r} would overwrite the input {hit!r}")


def _repeated(names: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({n for n in names if n in seen or seen.add(n)})


def _check_output_folder(path: Path, option: str, library: bool = False) -> None:
    """``path`` is, or can be created as, a writable folder (checked before minutes of work);
    ``library``: one that is empty, a library folder already, or holds only what a killed or failed
    writer left there (which ``--resume`` continues); not another folder's files."""
    from .library.folder import is_library_folder, writer_entry

    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} exists and is not a folder")
    if library and existing == path and not is_library_folder(path):
        other = sorted(e for e in os.listdir(path) if not writer_entry(e))  # a killed writer's leftovers may stay
        if other:
            raise UsageError(
                f"{option} {str(path)!r} is a folder that is not empty and not a library folder: {other[:3]}"
            )
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r}: folder {str(existing)!r} is not writable")


def _check_workers(workers) -> None:
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0 (0 = align in this process), got {workers}")


_BLANK = " \t"  # what a list file's lines and fields are stripped of: no other character ends a path


def _read_stdin(option: str) -> bytes | str:
    stdin = sys.stdin
    if stdin is None or stdin.closed:  # `<&-`: Python sets sys.stdin to None
        raise UsageError(f"{option} '-': standard input is closed")
    buffer = getattr(stdin, "buffer", None)  # the bytes, decoded below as a file's (not in the locale's encoding)
    return buffer.read() if buffer is not None else stdin.read()


def _list_file(path: str, option: str) -> list[tuple[int, str]]:
    """(line number, line) of a list file ('-': standard input), without blank and '#' lines.
    UTF-8 (a byte order mark skipped); lines end at "\n" only (a "\r" before it is dropped), as
    folder names may hold any other character str.splitlines() would break at (U+2028, "\x0c", ...)."""
    try:
        data = _read_stdin(option) if path == "-" else Path(path).read_bytes()
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data.removeprefix("\ufeff")
    except OSError as e:
        raise UsageError(f"{option} {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{option} {path!r} is not UTF-8 text") from None
    lines = enumerate((line.removesuffix("\r") for line in text.split("\n")), 1)
    return [(n, line) for n, line in lines if line.strip(_BLANK) and not line.strip(_BLANK).startswith("#")]


def _adapters_and_names(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    """The adapters of the command line, then those of --adapters-from (a line: folder or Hub path,
    optionally a tab and its name), and their names (--names, or the file's), checked."""
    adapters, names = list(args.adapters), args.names
    blank = next((i for i, n in enumerate(names or []) if not n.strip()), None)
    if blank is not None:
        raise UsageError(f"--names: name {blank + 1} is empty ({names[blank]!r}): every adapter needs a name")
    if args.adapters_from is not None:
        rows = _list_file(args.adapters_from, "--adapters-from")
        fields = [(n, [f.strip(_BLANK) for f in line.split("\t")]) for n, line in rows]
        bad = next(((n, f) for n, f in fields if len(f) > 2 or not all(f)), None)
        if bad is not None:
            raise UsageError(
                f"--adapters-from {args.adapters_from!r}, line {bad[0]}: expected a folder or Hub path, "
                f"optionally a tab and the adapter's name; got {len(bad[1])} fields {bad[1][:3]}"
            )
        named = [n for n, f in fields if len(f) == 2]
        if named and (len(named) != len(fields) or adapters or names is not None):
            unnamed = next((n for n, f in fields if len(f) == 1), None)
            raise UsageError(
                f"--adapters-from {args.adapters_from!r} names adapters (line {named[0]}): then every line "
                "must name its adapter"
                + (f" (line {unnamed} does not)" if unnamed else "")
                + ", and no adapter or --names may come from the command line"
            )
        adapters += [f[0] for _, f in fields]
        if named:
            names = [f[1] for _, f in fields]
    if not adapters:
        raise UsageError("no adapters: give PEFT folders (or Hub paths), or --adapters-from FILE")
    if names is not None and len(names) != len(adapters):
        raise UsageError(f"--names gives {len(names)} names for {len(adapters)} adapter folders")
    if names is not None and _repeated(names):
        given = "--names" if args.names is not None else f"--adapters-from {args.adapters_from!r}"
        raise UsageError(f"{given} gives the same name to several adapters: {_repeated(names)[:10]}")
    if names is None:  # named by their folders: two of one name is a usage error too, found before fetching
        from .library.plan import check_default_names
        from .library.sources import default_adapter_name

        defaults = [default_adapter_name(a, Path(a)) for a in adapters]  # a Hub path's needs no snapshot
        try:
            check_default_names(adapters, defaults)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return adapters, names


def _build(args: argparse.Namespace) -> int:
    from .library import build_library

    adapters, names = _adapters_and_names(args)
    _check_workers(args.workers)
    from .library.folder import is_library_folder

    args.folder = args.folder or is_library_folder(args.output)  # a library folder is rebuilt as one
    if args.folder:
        _check_output_folder(args.output, "-o/--output", library=True)
    else:
        _check_not_input(args.output, args, adapters)
        _check_output_file(args.output)
    report = build_library(
        adapters,
        args.output,
        names=names,
        dtype=_DTYPES[args.dtype],
        workers=args.workers,
        progress=not args.quiet,
        general_adapters=args.general,
        resume=args.resume,
        folder=args.folder,
    )
    print(f"wrote {report}")
    return 0


def _add(args: argparse.Namespace) -> int:
    from .library import add_adapters
    from .library.folder import is_library_folder

    adapters, names = _adapters_and_names(args)
    _check_workers(args.workers)
    _check_library_output(args)
    if not is_library_folder(args.library):  # a folder's new part gets a fresh name
        _check_not_input(args.output or args.library, args, adapters, "-o/--output" if args.output else "library")
    report = add_adapters(
        args.library,
        adapters,
        names=names,
        output=args.output,
        workers=args.workers,
        progress=not args.quiet,
        resume=args.resume,
    )
    print(f"wrote {report}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from .library import remove_adapters

    names = list(args.names)
    if args.names_from is not None:
        names += [line.strip(_BLANK) for _, line in _list_file(args.names_from, "--names-from")]
    if not names:
        raise UsageError("no adapters to remove: give their names, or --names-from FILE")
    if _repeated(names):
        raise UsageError(f"the names of the adapters to remove repeat: {_repeated(names)[:10]}")
    _check_library_output(args)
    print(f"wrote {remove_adapters(args.library, names, output=args.output)}")
    return 0


def _assemble(args: argparse.Namespace) -> int:
    from .library.folder import assemble_folder

    _check_output_folder(args.folder, "folder", library=True)
    if len(set(map(os.path.realpath, args.libraries))) != len(args.libraries):
        raise UsageError("a library file is given twice: its adapters' names would repeat")
    report = assemble_folder(args.folder, args.libraries)
    how = f"{_size(report.nbytes)} copied" if report.nbytes else "hard-linked, nothing copied"
    parts = len(args.libraries)
    print(f"wrote {report.path}: {report.adapters} adapters, {report.modules} modules ({parts} parts added, {how})")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from .library.folder import MANIFEST, compact_folder, is_library_folder, read_folder

    if not is_library_folder(args.folder):
        read_folder(args.folder)  # raises the error info gives (exit 1), before the output is checked
    if args.output is not None:
        if args.output.resolve().parent == args.folder.resolve():
            raise UsageError(f"-o/--output {str(args.output)!r}: write the merged library file outside the folder")
        if args.output.is_file():  # a part may be a link to a file outside the folder
            for part in sorted(args.folder.iterdir()):
                if part.is_file() and os.path.samefile(part, args.output):
                    raise UsageError(f"-o/--output {str(args.output)!r} would overwrite the input {str(part)!r}")
        _check_output_file(args.output)
    else:
        _check_output_file(args.folder / MANIFEST, "library folder")
    print(f"wrote {compact_folder(args.folder, args.output)}")
    return 0


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _module_lines(modules: dict[str, list]) -> list[str]:
    """``info``'s line per module ([adapters, d_in, d_out, ranks, bytes]) in natural order (layer 2
    before layer 10), where a run of consecutive numbers ``<head>.<e>`` with equal adapters, sizes and
    ranks takes one line: an MoE layer's experts (``<experts>.<parameter>.<e>``), 128 to a layer."""
    runs: list[list] = []  # [head, first, last, row]; first is None for a name that ends in no number
    for name in sorted(modules, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]):
        head, _, tail = name.rpartition(".")
        row = modules[name]
        if not (head and tail.isdigit()):
            runs.append([name, None, None, row])
            continue
        e = int(tail)
        run = runs[-1] if runs else None
        if run and run[1] is not None and run[0] == head and run[2] == e - 1 and run[3][:4] == row[:4]:
            run[2], run[3] = e, [*row[:4], run[3][4] + row[4]]
        else:
            runs.append([head, e, e, row])
    lines = []
    for head, first, last, (count, d_in, d_out, ranks, nbytes) in runs:
        what = f"{count} adapters, {d_in} -> {d_out}, ranks {sorted(ranks)}"
        if first is None or first == last:
            lines.append(f"{head if first is None else f'{head}.{first}'}: {what}, {_size(nbytes)}")
        else:
            lines.append(f"{head}.{{{first}..{last}}}: {last - first + 1} modules of {what}, {_size(nbytes)} in all")
    return lines


def _info(args: argparse.Namespace) -> int:
    from .library import Library
    from .library.folder import is_library_folder, read_folder
    from .library.stored import existing_library_path, read_stored

    folder = read_folder(args.library) if is_library_folder(args.library) else None
    parts = folder.parts if folder else [read_stored(existing_library_path(args.library))]
    if args.check:
        Library.load(args.library)  # reads and checks every value
    modules: dict[str, list] = {}  # name -> [adapters, d_in, d_out, ranks, bytes] over the parts
    for stored in parts:
        for name, m in stored.modules.items():
            _, ranks = stored.index_maps(name)
            row = modules.setdefault(name, [0, m.d_in, m.d_out, set(), 0])
            row[0] += m.num_adapters
            row[3] |= set(ranks.tolist()) if ranks is not None else {m.rank}
            row[4] += m.nbytes
    names = folder.names if folder else parts[0].names
    dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in set().union(*(p.factor_dtypes for p in parts))))
    r_max = max(m.rank for p in parts for m in p.modules.values())
    print(f"library     {args.library}" + (f"  (a folder of {len(parts)} parts)" if folder else ""))
    print(f"base model  {(folder or parts[0]).base_model or 'unknown'}")
    print(f"adapters    {len(names)}  (r_max {r_max}, dtype {dtypes})")
    print(f"size        {sum(row[4] for row in modules.values()):,} bytes")
    print(f"modules     {len(modules)}")
    if parts[0].general is not None:
        general_names = parts[0].general[0]
        shown = ", ".join(general_names[:3]) + (", ..." if len(general_names) > 3 else "")
        print(f"general     mean of {len(general_names)} general adapters subtracted (GKS): {shown}")
    for line in _module_lines(modules):
        print(f"  {line}")
    if folder:
        print("parts")
        for f, stored in zip(folder.files, parts):
            size = sum(m.nbytes for m in stored.modules.values())
            print(f"  {f}: {len(stored.names)} adapters, {len(stored.modules)} modules, {_size(size)}")
    print(
        "values      "
        + (
            "checked (ids, ranks, finite factors)"
            if args.check
            else "ids and ranks checked; factors not read (--check reads them all)"
        )
    )
    if args.adapters:
        print("adapter names:")
        for i, n in enumerate(names):
            print(f"  {i}: {n}")
    return 0


def _check_device(text: str) -> None:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"--device {text}: this torch {torch.__version__} is a CPU-only build")
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "meta":
        raise UsageError(f"--device {text}: meta tensors hold no values; choose cpu or a GPU")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - any failure means the device cannot be used
            raise UsageError(f"--device {text} cannot be used: {str(e).splitlines()[0]}") from None


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run

    return run(self_test=not args.no_self_test)


def _check_stem(stem: str) -> None:
    """The demo writes OUT/STEM.json and OUT/STEM.png: STEM must name a file in OUT."""
    separators = {"/", os.sep, os.altsep} - {None}
    if stem in ("", ".", "..") or "\0" in stem or any(sep in stem for sep in separators):
        raise UsageError(f"--stem must be a plain file name (no folder; the files go to --out), got {stem!r}")


def _check_general_adapters(args: argparse.Namespace) -> None:
    """--general-adapters G: G >= 0, and G general documents the demo's data can provide (their
    pre-training entities are finite: asked of the data generator itself, on the demo's settings)."""
    count = args.general_adapters
    if count < 0:
        raise UsageError(f"--general-adapters must be >= 0 (0: none), got {count}")
    if count == 0:
        return
    from .experiment.data import general_documents
    from .experiment.run import config_from_args, experiment_data

    cfg = config_from_args(args)
    data = experiment_data(cfg)  # the first seed's; every seed has as many pre-training entities
    try:
        general_documents(data, count, cfg.entities_per_doc)
    except ValueError as e:
        raise UsageError(f"--general-adapters {count} is too many: {e}") from None


def _check_experiment_args(args: argparse.Namespace) -> None:
    """The demo's option checks, also those of ``python -m lag_triton.experiment.run [--ablation]``."""
    from .experiment.data import max_documents

    missing = [m for m in ("peft", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:  # the PEFT check and the plot come after minutes of training
        raise UsageError(
            f"the demo needs {' and '.join(missing)} (its check against PEFT's forward, its plot): "
            "pip install 'lag_triton[demo]' (from a checkout: pip install -e '.[demo]')"
        )
    if args.adapters < 1:
        raise UsageError(f"--adapters must be >= 1, got {args.adapters}")
    if args.adapters > max_documents():  # before --general-adapters asks the data generator for them
        raise UsageError(
            f"--adapters must be <= {max_documents()} (the demo's documents need distinct entity names, and "
            f"there are that many documents' worth), got {args.adapters}"
        )
    if getattr(args, "seed", 0) < 0:  # random.Random takes |seed|: -1 would draw seed 1's documents
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.layers < 1:
        raise UsageError(f"--layers must be >= 1, got {args.layers}")
    if args.hidden < 8 or args.hidden % 8:
        raise UsageError(
            f"--hidden must be a positive multiple of 8 (4 heads of an even size, for rotary embeddings), "
            f"got {args.hidden}"
        )
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    for option in ("pretrain_steps", "adapter_steps", "threads"):
        if getattr(args, option) < 0:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    if not (math.isfinite(args.a_init_scale) and args.a_init_scale > 0):
        raise UsageError(f"--a-init-scale must be a finite number > 0, got {args.a_init_scale}")
    if not (math.isfinite(args.lr_a_ratio) and args.lr_a_ratio >= 0):
        raise UsageError(f"--lr-a-ratio must be a finite number >= 0, got {args.lr_a_ratio}")
    ks = str(args.ks).split(",")
    if not all(k.strip().isascii() and k.strip().isdigit() and int(k) >= 1 for k in ks):
        raise UsageError(f"--ks must be comma-separated integers >= 1, got {args.ks!r}")
    if args.backend not in _BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(_BACKENDS)}, got {args.backend!r}")
    _check_stem(args.stem)
    _check_general_adapters(args)
    _check_device(args.device)
    if args.backend != "auto":
        from .kernels import backend_unavailable_reason

        reason = backend_unavailable_reason(args.backend, torch.device(args.device))
        if reason is not None:
            raise UsageError(f"--backend {args.backend} cannot run on --device {args.device}: {reason}")
    _check_demo_output(Path(args.out), args.stem, getattr(args, "keep_adapters", False))


def _check_demo_output(out: Path, stem: str, keep_adapters: bool) -> None:
    """OUT gets STEM.json and STEM.png (and adapters/ with --keep-adapters): it is made, and a file
    written in it, now, so that results that could not be written fail before minutes of work
    (os.access says yes to root where nothing can be made, e.g. under /proc)."""
    _check_output_folder(out, "--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"--out {str(out)!r}: cannot write there ({e.strerror or e})") from None
    files, folders = [f"{stem}.json", f"{stem}.png"], ["adapters"] if keep_adapters else []
    for name in files + folders:
        if (out / name).exists() and (out / name).is_dir() != (name in folders):
            raise UsageError(f"--out {str(out)!r}: {name!r} there is {'not ' if name in folders else ''}a folder")


def _demo(args: argparse.Namespace) -> int:
    _check_experiment_args(args)
    from . import demo

    return demo.run(args)


def _adapters_from(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapters-from",
        metavar="FILE",
        help="more adapters, one per line: a folder or Hub path, optionally a tab and its name ('-': standard "
        "input; '#' lines skipped); for libraries too large for a command line",
    )


def _resume(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue a killed, interrupted or failed `{command}` of the same adapters to the same file: "
        "only the adapters it had not written (or that changed since) are aligned",
    )


def _workers_and_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes aligning adapters in parallel (default: one per core for 16+ adapters; 0: none)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _parser(with_demo: bool = True) -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the full traceback of an error"
    )
    parser = argparse.ArgumentParser(prog="python -m lag_triton", description=__doc__, epilog=_EPILOG)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # command name -> its parser, for _parse

    p = sub.add_parser(
        "build",
        parents=[debug],
        help="align PEFT LoRA folders into one library file (or a library folder: --folder)",
        epilog=_EPILOG,
    )
    p.add_argument("adapters", nargs="*", help="PEFT adapter folders, or Hub paths user/repo[/subfolder]")
    _adapters_from(p)
    p.add_argument(
        "-o", "--output", required=True, type=Path, help="library file to write (.safetensors), or folder (--folder)"
    )
    p.add_argument(
        "--folder",
        action="store_true",
        help="write a library folder (parts + library.json): `add` then writes only the new adapters",
    )
    p.add_argument("--names", nargs="+", help="adapter names (default: folder names, Hub paths as given)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="storage dtype")
    p.add_argument(
        "--general",
        nargs="+",
        metavar="ADAPTER",
        help="general adapters (folders or Hub paths) whose mean lora_A / lora_B is subtracted from every "
        "adapter first: PEFT Arrow's general knowledge subtraction (GKS); `add` then subtracts the same mean",
    )
    _resume(p, "build")
    _workers_and_quiet(p)
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "add",
        parents=[debug],
        epilog=_EPILOG,
        help="append PEFT LoRA folders to a library file or folder (existing adapters are not re-aligned)",
    )
    p.add_argument(
        "library",
        type=Path,
        help="library file, replaced atomically unless -o is given; or library folder, given a new part",
    )
    p.add_argument("adapters", nargs="*", help="PEFT adapter folders (or Hub paths) to add")
    _adapters_from(p)
    p.add_argument("-o", "--output", type=Path, help="write the grown library here instead")
    p.add_argument("--names", nargs="+", help="names of the new adapters (default: folder names)")
    _resume(p, "add")
    _workers_and_quiet(p)
    p.set_defaults(func=_add)

    p = sub.add_parser("remove", parents=[debug], help="drop adapters from a library file or folder", epilog=_EPILOG)
    p.add_argument(
        "library",
        type=Path,
        help="library file, replaced atomically unless -o is given; or library folder (parts holding them rewritten)",
    )
    p.add_argument("names", nargs="*", help="names of the adapters to drop")
    p.add_argument(
        "--names-from", metavar="FILE", help="more names, one per line ('-': standard input; '#' lines skipped)"
    )
    p.add_argument("-o", "--output", type=Path, help="write the smaller library here instead")
    p.set_defaults(func=_remove)

    p = sub.add_parser(
        "assemble",
        parents=[debug],
        epilog=_EPILOG,
        help="make library files (built apart) the next parts of a library folder, hard-linked where possible",
    )
    p.add_argument("folder", type=Path, help="library folder (created if missing)")
    p.add_argument("libraries", nargs="+", type=Path, help="library files, in library order")
    p.set_defaults(func=_assemble)

    p = sub.add_parser(
        "compact",
        parents=[debug],
        epilog=_EPILOG,
        help="merge a library folder's parts into one part, or into one library file (-o); rows are copied",
    )
    p.add_argument("folder", type=Path, help="library folder")
    p.add_argument("-o", "--output", type=Path, help="write one library file here instead (the folder stays)")
    p.set_defaults(func=_compact)

    p = sub.add_parser(
        "info", parents=[debug], help="describe a library file or folder (sizes per module)", epilog=_EPILOG
    )
    p.add_argument("library", type=Path)
    p.add_argument("--adapters", action="store_true", help="also list every adapter name")
    p.add_argument("--check", action="store_true", help="read and check every factor value (reads the whole file)")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "doctor",
        parents=[debug],
        epilog=_EPILOG,
        help="versions, devices, the backend each device gets, and a self-test of every available backend "
        "(its ops against the reference, a patched model under torch.compile)",
    )
    p.add_argument("--no-self-test", action="store_true", help="only report; run no backend")
    p.set_defaults(func=_doctor)

    p = sub.add_parser(
        "demo",
        parents=[debug],
        epilog=_EPILOG,
        help="the LAG knowledge-library experiment on a tiny model (offline, CPU)",
    )
    if with_demo:  # its options come from the experiment, whose imports take seconds and ~200 MB
        from .experiment.run import add_arguments

        add_arguments(p)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(with_demo="demo" in argv)
    args = _parse(parser, argv)  # exits 2 with argparse's own one-line message on a bad command line
    try:
        code = args.func(args)
        # A pipe's stdout is block-buffered: write it out here, where a reader that went away is caught
        # below, rather than at interpreter exit ("Exception ignored ... BrokenPipeError", exit 120).
        sys.stdout.flush()
        return code
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        _print_notes(e)
        return 130
    except BrokenPipeError:  # the reader left (`info --adapters | head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if args.debug:
            traceback.print_exc()
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        documented = isinstance(e, (ValueError, OSError, TypeError, RuntimeError))
        kind = "" if documented and message else f"{type(e).__name__}: "
        hint = "" if args.debug else " (--debug for the traceback)"
        print(f"{parser.prog} {args.command}: error: {kind}{message}{hint if kind else ''}", file=sys.stderr)
        if not args.debug:  # the traceback printed them
            _print_notes(e)
        return EXIT_FAILED


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that a command's options may come between its positional
    arguments (``remove LIB --names-from F NAME``, ``build A -o X B``): plain argparse stops filling
    a positional list at the first option, and its intermixed parsing refuses subparsers, so the
    command's own parser takes the arguments after the command name."""
    at = next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)
    if at is None or argv[at] not in parser.commands or any(arg != "--debug" for arg in argv[:at]):
        return parser.parse_args(argv)  # help, a missing or unknown command or option: argparse's own message
    args = parser.commands[argv[at]].parse_intermixed_args(argv[at + 1 :])
    args.command = argv[at]
    args.debug = "--debug" in argv[:at] or getattr(args, "debug", False)
    return args


def _print_notes(error: BaseException) -> None:
    """What the library added to an error (e.g. that a failed build can be resumed), one line each."""
    for note in getattr(error, "__notes__", ()):
        print(f"  {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``python -m lag_triton {build,info,demo}``."""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BACKENDS = ("auto", "triton", "cuda", "torch")
EXIT_FAILED = 1  # the work was attempted and failed (unreadable or invalid input, ...)
EXIT_USAGE = 2  # the command line cannot be carried out as given (as argparse's own errors)

_EPILOG = (f"Errors print one line (add --debug for the traceback). Exit status: 0 on success, {EXIT_FAILED} "
           f"when the work fails (an unreadable or invalid adapter or library), {EXIT_USAGE} for a command "
           "line that cannot be carried out (bad option values, an output path that cannot be written).")


class UsageError(Exception):
    """A command-line value that cannot work, found before any work starts."""


def _check_output_file(path: Path) -> None:
    from .library.safetensors_io import check_output_path

    try:
        check_output_path(path)
    except OSError as e:
        raise UsageError(f"-o/--output: {e.args[1] if len(e.args) > 1 else e}") from None


def _check_output_folder(path: Path, option: str) -> None:
    """``path`` is, or can be created as, a writable folder (checked before minutes of work)."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r} exists and is not a folder")
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {str(path)!r}: folder {str(existing)!r} is not writable")


def _build(args: argparse.Namespace) -> int:
    from .library import Library

    if args.names is not None and len(args.names) != len(args.adapters):
        raise UsageError(f"--names gives {len(args.names)} names for {len(args.adapters)} adapter folders")
    _check_output_file(args.output)
    lib = Library.from_peft(args.adapters, names=args.names, dtype=_DTYPES[args.dtype], progress=not args.quiet)
    lib.save(args.output)
    print(f"wrote {args.output}: {lib}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .library import Library

    lib = Library.load(args.library)
    print(f"library     {args.library}")
    print(f"base model  {lib.base_model or 'unknown'}")
    print(f"adapters    {len(lib.names)}  (r_max {lib.r_max}, dtype {str(lib.dtype).removeprefix('torch.')})")
    print(f"size        {lib.nbytes:,} bytes")
    print(f"modules     {len(lib.modules)}")
    for name, m in lib.modules.items():
        ranks = sorted(set(m.ranks.tolist())) if m.ranks is not None else [m.rank]
        print(f"  {name}: {m.num_adapters} adapters, {m.d_in} -> {m.d_out}, ranks {ranks}")
    if args.adapters:
        print("adapter names:")
        for i, n in enumerate(lib.names):
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
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - any failure means the device cannot be used
            raise UsageError(f"--device {text} cannot be used: {str(e).splitlines()[0]}") from None


def _demo(args: argparse.Namespace) -> int:
    if args.adapters < 1:
        raise UsageError(f"--adapters must be >= 1, got {args.adapters}")
    if args.layers < 1:
        raise UsageError(f"--layers must be >= 1, got {args.layers}")
    if args.hidden < 4 or args.hidden % 4:
        raise UsageError(f"--hidden must be a positive multiple of 4 (the demo model has 4 heads), got {args.hidden}")
    for option in ("pretrain_steps", "adapter_steps", "threads"):
        if getattr(args, option) < 0:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    if not (math.isfinite(args.a_init_scale) and args.a_init_scale > 0):
        raise UsageError(f"--a-init-scale must be a finite number > 0, got {args.a_init_scale}")
    ks = str(args.ks).split(",")
    if not all(k.strip().isascii() and k.strip().isdigit() and int(k) >= 1 for k in ks):
        raise UsageError(f"--ks must be comma-separated integers >= 1, got {args.ks!r}")
    if args.backend not in _BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(_BACKENDS)}, got {args.backend!r}")
    _check_device(args.device)
    _check_output_folder(Path(args.out), "--out")
    from . import demo

    return demo.run(args)


def _parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the full traceback of an error")
    parser = argparse.ArgumentParser(prog="python -m lag_triton", description=__doc__, epilog=_EPILOG)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", parents=[debug], help="align PEFT LoRA folders into one library file", epilog=_EPILOG)
    p.add_argument("adapters", nargs="+", type=Path, help="PEFT adapter folders")
    p.add_argument("-o", "--output", required=True, type=Path, help="library file to write (.safetensors)")
    p.add_argument("--names", nargs="+", help="adapter names (default: folder names)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="storage dtype")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_build)

    p = sub.add_parser("info", parents=[debug], help="describe a library file", epilog=_EPILOG)
    p.add_argument("library", type=Path)
    p.add_argument("--adapters", action="store_true", help="also list every adapter name")
    p.set_defaults(func=_info)

    from .experiment.run import add_arguments

    p = sub.add_parser("demo", parents=[debug], epilog=_EPILOG,
                       help="the LAG knowledge-library experiment on a tiny model (offline, CPU)")
    add_arguments(p)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 with argparse's own one-line message on a bad command line
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if args.debug:
            traceback.print_exc()
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        documented = isinstance(e, (ValueError, OSError, TypeError, RuntimeError))
        kind = "" if documented and message else f"{type(e).__name__}: "
        hint = "" if args.debug else " (--debug for the traceback)"
        print(f"{parser.prog} {args.command}: error: {kind}{message}{hint if kind else ''}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

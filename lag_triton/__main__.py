"""Command line: ``python -m lag_triton {build,info,demo}``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _build(args: argparse.Namespace) -> int:
    from .library import Library

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lag_triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="align PEFT LoRA folders into one library file")
    p.add_argument("adapters", nargs="+", type=Path, help="PEFT adapter folders")
    p.add_argument("-o", "--output", required=True, type=Path, help="library file to write (.safetensors)")
    p.add_argument("--names", nargs="+", help="adapter names (default: folder names)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="storage dtype")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_build)

    p = sub.add_parser("info", help="describe a library file")
    p.add_argument("library", type=Path)
    p.add_argument("--adapters", action="store_true", help="also list every adapter name")
    p.set_defaults(func=_info)

    from . import demo

    p = sub.add_parser("demo", help="the LAG knowledge-library experiment on a tiny model (offline, CPU)")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

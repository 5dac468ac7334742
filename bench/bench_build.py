"""Library build time: align N PEFT adapter folders (Llama-3.2-3B MLP shapes by default) on CPU.

    python bench/bench_build.py --adapters 1000 --layers 28 --workdir /tmp/lag_build

Writes synthetic PEFT folders (adapter_config.json + adapter_model.safetensors, the layout
``save_pretrained`` produces) once, then times ``Library.from_peft`` over them and records the
result in bench/results/build-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lag_triton import Library

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def write_adapters(root: Path, n: int, layers: int, hidden: int, intermediate: int, rank: int,
                   dtype: torch.dtype) -> list[Path]:
    shapes = {"gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes),
              "bias": "none", "base_model_name_or_path": "synthetic/llama-3.2-3b-shape"}
    paths = []
    for i in range(n):
        path = root / f"adapter{i:05d}"
        paths.append(path)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for proj, (d_in, d_out) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.mlp.{proj}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) / d_in ** 0.5).to(dtype)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.01).to(dtype)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--adapter-dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--library-dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lag_build"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    t0 = time.perf_counter()
    paths = write_adapters(args.workdir, args.adapters, args.layers, args.hidden, args.intermediate, args.rank,
                           _DTYPES[args.adapter_dtype])
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    lib = Library.from_peft(paths, dtype=_DTYPES[args.library_dtype])
    t_build = time.perf_counter() - t0
    row = {
        "date": datetime.date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "adapters": args.adapters, "modules": len(lib.modules), "layers": args.layers, "hidden": args.hidden,
        "intermediate": args.intermediate, "rank": args.rank, "adapter_dtype": args.adapter_dtype,
        "library_dtype": args.library_dtype, "library_bytes": lib.nbytes,
        "write_adapters_s": round(t_write, 2), "build_s": round(t_build, 2),
        "adapters_per_s": round(args.adapters / t_build, 2),
    }
    print(json.dumps(row, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"build-cpu-{row['date']}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()

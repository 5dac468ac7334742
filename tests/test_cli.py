"""``python -m lag_triton build / info``."""

from __future__ import annotations

import subprocess
import sys

import torch

from factories import make_adapter, tiny_model
from lag_triton import Library
from lag_triton.__main__ import main


def test_build_then_info(tmp_path, capsys):
    model = tiny_model("llama")
    dirs = [make_adapter(model, tmp_path / f"doc{i}", seed=i, r=2 + i) for i in range(3)]
    out = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, dirs), "-o", str(out), "--dtype", "bfloat16", "-q"]) == 0
    lib = Library.load(out)
    assert lib.names == ["doc0", "doc1", "doc2"] and lib.dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["info", str(out), "--adapters"]) == 0
    text = capsys.readouterr().out
    assert "adapters    3  (r_max 4, dtype bfloat16)" in text
    assert f"size        {lib.nbytes:,} bytes" in text
    assert "model.layers.1.mlp.up_proj: 3 adapters, 48 -> 80, ranks [2, 3, 4]" in text
    assert "2: doc2" in text


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert main(["build", str(tmp_path), "-o", str(tmp_path / "x"), "-q"]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lag_triton", "--help"], capture_output=True, text=True, check=True)
    assert "build" in out.stdout and "demo" in out.stdout

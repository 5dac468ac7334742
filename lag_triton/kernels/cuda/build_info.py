"""What the CUDA extension is built from, and where nvcc is: one definition for the JIT build
(``lag_triton.kernels.cuda``), the ahead-of-time build (``setup.py``, which loads this file by path
before torch or lag_triton can be imported: it must stay standard-library only) and the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SOURCES = ("binding.cpp", "arrow_topk.cu", "spectr_rerank.cu", "lora_apply.cu")  # in csrc/
SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")  # every file of csrc/ the build reads (headers included)
NVCC_FLAGS = ("-O3", "-lineinfo")


def find_nvcc(cuda_home: str | None = None) -> str | None:
    """nvcc on PATH, else under ``cuda_home``, $CUDA_HOME or /usr/local/cuda; None if none has it."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None

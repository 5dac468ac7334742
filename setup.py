"""Build script. Metadata lives in pyproject.toml; this file only adds the optional CUDA extension.

The CUDA C++ backend (csrc/) is built ahead of time as ``lag_triton._lag_cuda`` when, at build
time, torch is importable, is a CUDA build, and nvcc is found. Otherwise (CPU torch, no toolkit,
or an isolated build where torch is not installed - torch is deliberately absent from the build
requirements) this is a plain pure-Python ``setup()`` and the extension is JIT-built on first use
by lag_triton.kernels.cuda instead. Set LAG_TRITON_NO_CUDA_EXT=1 to skip the build explicitly.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["binding.cpp", "arrow_topk.cu", "spectr_rerank.cu", "lora_apply.cu"]


def _cuda_extension_kwargs():
    """setup() keyword arguments that build the extension, or {} with a note on stderr when we skip."""
    if os.environ.get("LAG_TRITON_NO_CUDA_EXT", "0") not in ("", "0"):
        return {}
    if not all((CSRC / name).is_file() for name in SOURCES):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:  # isolated build (torch is not a build requirement) or broken torch
        print("lag_triton: torch not importable at build time; CUDA extension will be JIT-built on use", file=sys.stderr)
        return {}
    if torch.version.cuda is None:
        print("lag_triton: torch is a CPU build; skipping the CUDA extension", file=sys.stderr)
        return {}
    cuda_home = cpp_extension.CUDA_HOME
    has_nvcc = bool(cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists()) or shutil.which("nvcc") is not None
    if not has_nvcc:
        print("lag_triton: nvcc not found; skipping the CUDA extension", file=sys.stderr)
        return {}
    ext = cpp_extension.CUDAExtension(
        name="lag_triton._lag_cuda",
        sources=[os.path.relpath(CSRC / name, ROOT) for name in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_cuda_extension_kwargs())

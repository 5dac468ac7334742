"""Build script. Metadata lives in pyproject.toml; this file only adds the optional CUDA extension.

The CUDA C++ backend (csrc/) is built ahead of time as ``lag_triton._lag_cuda`` when, at build
time, torch is importable, is a CUDA build, and nvcc is found. Otherwise (CPU torch, no toolkit,
or an isolated build where torch is not installed - torch is deliberately absent from the build
requirements) this is a plain pure-Python ``setup()`` and the extension is JIT-built on first use
by lag_triton.kernels.cuda instead. Set LAG_TRITON_NO_CUDA_EXT=1 to skip the build explicitly.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _build_info():
    """lag_triton/kernels/cuda/build_info.py, loaded by path: importing lag_triton needs torch."""
    spec = importlib.util.spec_from_file_location("_lag_build_info", ROOT / "lag_triton/kernels/cuda/build_info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_info()
SOURCES = BUILD.SOURCES


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
        print(
            "lag_triton: torch not importable at build time; CUDA extension will be JIT-built on use", file=sys.stderr
        )
        return {}
    if torch.version.cuda is None:
        print("lag_triton: torch is a CPU build; skipping the CUDA extension", file=sys.stderr)
        return {}
    if BUILD.find_nvcc(cpp_extension.CUDA_HOME) is None:
        print("lag_triton: nvcc not found; skipping the CUDA extension", file=sys.stderr)
        return {}
    ext = cpp_extension.CUDAExtension(
        name="lag_triton._lag_cuda",
        sources=[os.path.relpath(CSRC / name, ROOT) for name in SOURCES],
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": list(BUILD.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


class BuildPyWithCudaSources(build_py):
    """Also copies csrc/ into the built package (lag_triton/kernels/cuda/csrc), so that a wheel or a
    non-editable install, which has no repository beside it, carries the CUDA sources and can
    JIT-build the CUDA backend on first use (``lag_triton.kernels.cuda.csrc_dir``)."""

    def run(self):
        super().run()
        target = Path(self.build_lib, "lag_triton", "kernels", "cuda", "csrc")
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(CSRC.iterdir()):
            if path.suffix in BUILD.SOURCE_SUFFIXES:
                shutil.copy2(path, target / path.name)


kwargs = _cuda_extension_kwargs()
kwargs.setdefault("cmdclass", {})["build_py"] = BuildPyWithCudaSources
setup(**kwargs)

"""Build checks for the CUDA C++ backend that run without a GPU (CI).

Every csrc/*.cu file must compile with nvcc for sm_80 and sm_90 (with the half/bfloat16 flags
torch's extension builder adds), binding.cpp must compile against the installed torch headers,
the kernels must include no torch header, and on a machine without CUDA torch / a device the
backend must say why it is unavailable without trying to compile anything.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from lag_triton.kernels import cuda as cuda_backend
from lag_triton.kernels.cuda.build_info import SOURCE_SUFFIXES, find_nvcc

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
# flags torch.utils.cpp_extension passes to nvcc: the kernels must not rely on implicit conversions
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
ALLOWED_KERNEL_INCLUDES = {
    "cuda_runtime.h",
    "cuda_fp16.h",
    "cuda_bf16.h",
    "stdint.h",
    "stddef.h",
    "string.h",
    "type_traits",
    "lag_common.cuh",
    "lag_cuda.h",
}


def _nvcc() -> str | None:
    return find_nvcc()


def _includes(path: Path) -> set[str]:
    return set(re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M))


def test_sources_present():
    assert CU_FILES == ["arrow_topk.cu", "lora_apply.cu", "spectr_rerank.cu"]
    for name in cuda_backend.SOURCES:
        assert (CSRC / name).is_file(), name
    assert cuda_backend.csrc_dir().resolve() == CSRC.resolve()


def test_a_wheel_carries_the_cuda_sources(tmp_path, monkeypatch):
    """A wheel or a non-editable install has no repository beside it: setup.py's build_py copies
    csrc/ into the package, and csrc_dir() takes that copy, so the backend can still JIT-build."""
    # pip runs setup.py with the installed setuptools (no build isolation: no download)
    need = re.search(r'"setuptools>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    have = importlib.metadata.version("setuptools")
    if Version(have) < Version(need):
        pytest.skip(f"setuptools {have} is installed and the build needs >= {need} (pyproject.toml)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(ROOT / "lag_triton", src / "lag_triton", ignore=ignore)
    shutil.copytree(CSRC, src / "csrc", ignore=ignore)
    command = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q"]
    env = dict(os.environ, LAG_TRITON_NO_CUDA_EXT="1")  # the sources, not an ahead-of-time build
    built = subprocess.run([*command, "-w", str(tmp_path / "dist")], env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lag_triton-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    packaged = tmp_path / "site" / "lag_triton" / "kernels" / "cuda" / "csrc"
    assert sorted(p.name for p in packaged.iterdir()) == sorted(
        p.name for p in CSRC.iterdir() if p.suffix in SOURCE_SUFFIXES
    )
    assert set(cuda_backend.SOURCES) <= {p.name for p in packaged.iterdir()}
    monkeypatch.delenv("LAG_TRITON_CSRC", raising=False)
    monkeypatch.setattr(cuda_backend, "PACKAGED_CSRC", packaged)
    assert cuda_backend.csrc_dir() == packaged
    for p in CSRC.iterdir():
        if p.suffix in SOURCE_SUFFIXES:
            assert (packaged / p.name).read_bytes() == p.read_bytes()


@pytest.mark.parametrize("name", CU_FILES + ["lag_common.cuh", "lag_cuda.h"])
def test_kernels_include_only_cuda_headers(name):
    extra = _includes(CSRC / name) - ALLOWED_KERNEL_INCLUDES
    assert not extra, f"{name} includes {sorted(extra)}; kernels may include only CUDA/C headers"


def test_binding_includes_no_cuda_header():
    assert _includes(CSRC / "binding.cpp") <= {"torch/extension.h", "string", "type_traits", "lag_cuda.h"}
    assert _includes(CSRC / "lag_cuda.h") <= {"stddef.h", "stdint.h"}


@pytest.fixture(scope="module")
def nvcc_objects(tmp_path_factory):
    """Compile every .cu for sm_80 (C++17) and sm_90 (C++20) in parallel; {(file, arch): (rc, log, obj)}."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc")
    jobs = [(name, arch, std) for name in CU_FILES for arch, std in (("sm_80", "c++17"), ("sm_90", "c++20"))]

    def build(job):
        name, arch, std = job
        obj = out / f"{name}.{arch}.o"
        cmd = [
            nvcc,
            "-c",
            f"-arch={arch}",
            f"-std={std}",
            "-O3",
            "--expt-relaxed-constexpr",
            *TORCH_NVCC_DEFINES,
            f"-I{CSRC}",
            "-Xcompiler",
            "-fPIC",
            "-Xptxas",
            "-v",  # registers and spills per kernel, for test_cu_kernels_do_not_spill
            str(CSRC / name),
            "-o",
            str(obj),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        return job[:2], (proc.returncode, " ".join(cmd) + "\n" + proc.stdout + proc.stderr, obj)

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return dict(pool.map(build, jobs))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles(nvcc_objects, name, arch):
    rc, log, obj = nvcc_objects[(name, arch)]
    assert rc == 0, f"nvcc failed for {name} ({arch}):\n{log[-6000:]}"
    assert obj.exists() and obj.stat().st_size > 0


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_kernels_do_not_spill(nvcc_objects, name, arch):
    """Every kernel instantiation fits in registers: ptxas reports 0 bytes of spill stores and loads
    (a spill turns a register into local-memory traffic on every loop iteration)."""
    rc, log, _ = nvcc_objects[(name, arch)]
    assert rc == 0, log[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    assert spills and len(spills) >= len(kernels), f"no ptxas -v report in the log:\n{log[-3000:]}"
    assert all(store == "0" and load == "0" for store, load in spills), "\n".join(
        line for line in log.splitlines() if "spill" in line or "entry function" in line
    )


EXPECTED_SYMBOLS = {
    "arrow_topk.cu": [
        "lag_arrow_select_launch",
        "lag_arrow_select_workspace_bytes",
        "lag_cuda_error_string",
    ],
    "spectr_rerank.cu": ["lag_spectr_rerank_launch", "lag_spectr_rerank_workspace_bytes"],
    "lora_apply.cu": ["lag_lora_apply_launch"],
}


@pytest.mark.parametrize("name", CU_FILES)
def test_cu_exports_c_launchers(nvcc_objects, name):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    rc, log, obj = nvcc_objects[(name, "sm_90")]
    assert rc == 0, log[-3000:]
    symbols = subprocess.run([nm, "-g", "--defined-only", str(obj)], capture_output=True, text=True).stdout
    defined = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    for sym in EXPECTED_SYMBOLS[name]:
        assert sym in defined, f'{name} does not export extern "C" {sym}'


def test_binding_compiles_against_torch_headers(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(CSRC)]
    logs = []
    for std in ("c++17", "c++20"):  # brief asks for C++17; newer torch headers build extensions as C++20
        cmd = [
            cxx,
            "-fsyntax-only",
            f"-std={std}",
            "-DTORCH_EXTENSION_NAME=lag_cuda_syntax_check",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-D_GLIBCXX_USE_CXX11_ABI=" + str(int(torch.compiled_with_cxx11_abi())),
            *[f"-I{p}" for p in includes],
            str(CSRC / "binding.cpp"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            return
        logs.append(f"[{std}] " + proc.stderr[-4000:])
    pytest.fail("binding.cpp does not compile against the torch headers:\n" + "\n".join(logs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_unavailable_reason_without_cuda(monkeypatch):
    from torch.utils import cpp_extension

    def no_build(*args, **kwargs):
        raise AssertionError("must not try to compile without CUDA torch / a device")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    reason = cuda_backend.extension_unavailable_reason()
    assert isinstance(reason, str) and reason
    if torch.version.cuda is None:
        assert "CPU build" in reason
    else:
        assert "no CUDA device" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_resolve_backend_reports_reason():
    from lag_triton.kernels import resolve_backend

    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", "cpu")
    assert resolve_backend("auto", "cpu") == "torch"


def test_ops_reject_cpu_tensors():
    x = torch.randn(2, 16)
    p = torch.randn(4, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend.arrow_topk(x, p, 2)
    a = torch.randn(4, 3, 16)
    cand = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend.spectr_rerank(x, a, cand, 1)
    y = torch.randn(2, 8)
    b = torch.randn(4, 8, 3)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_backend.lora_apply(y, b, cand[:, :1], torch.ones(2, 1), torch.zeros(2, 1, 3))
    # shape errors come from the shared checks first, as in every backend
    with pytest.raises(ValueError, match="k must be"):
        cuda_backend.arrow_topk(x, p, 5)


def test_setup_skips_extension_without_cuda_torch():
    if torch.version.cuda is not None:
        pytest.skip("CUDA torch: setup.py would build the extension")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lag_triton" in proc.stdout
    assert "skipping the CUDA extension" in proc.stderr

"""The CUDA backend's kernels (csrc/*.cu) run on the CPU, for tests on machines without a GPU.

The .cu files are compiled by the host C++ compiler against tests/cuda_emu/ (an emulation of the
CUDA subset they use; its cuda_runtime.h says what is emulated and what it reports) after one
rewrite: ``kernel<<<grid, block, smem, stream>>>(args)`` becomes a call of the emulator's launcher.
The kernels and their host-side launch plans are the real sources, unmodified.

``use_emulated_backend(monkeypatch)`` makes backend "cuda" run on CPU tensors: the cuda backend's
Python wrapper (``lag_triton.kernels.cuda``) with its torch binding replaced by
:class:`EmulatedExtension`, the binding's three calls over the C API of csrc/lag_cuda.h. So a test
runs the wrapper, the launch plans and the kernels (and, through ``patch``, the routing on top);
only csrc/binding.cpp (argument checks, scratch allocation) is left to the GPU tests. Every output
and scratch buffer is filled with poison before a launch, as recycled GPU memory would be.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from lag_triton import kernels
from lag_triton.kernels import cuda
from lag_triton.kernels.cuda.build_info import SOURCES

EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
KERNEL_SOURCES = tuple(name for name in SOURCES if name.endswith(".cu"))
CXX_FLAGS = ("-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE")
#: LAG_EMU_ASAN=1: the kernels built with AddressSanitizer (run the process with libasan preloaded)
ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SMS = 132  # the emulated GPU's SM count (an H100 / H200): the launch plans size grids by it
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[\w, ]+>)?)\s*<<<(.*?)>>>\(")

_library: ctypes.CDLL | None = None
_failure: str | None = None


def rewrite_launches(source: str) -> str:
    """``k<<<g, b, s, st>>>(args)`` -> ``lag_emu::launcher(g, b, s, st)("k", k, args)`` (one line each)."""
    return _LAUNCH.sub(lambda m: f'lag_emu::launcher({m.group(2)})("{m.group(1)}", {m.group(1)}, ', source)


def compiler() -> str | None:
    """The host C++ compiler: $CXX, else g++, else c++ (None if there is none)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def unavailable_reason() -> str | None:
    """Why the emulated kernels cannot be built here (None when they can)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        where = f"{platform.system()} {platform.machine()}"
        return f"the CUDA emulator needs Linux on x86-64 (its stack switch), not {where}"
    if compiler() is None:
        return "no C++ compiler (g++) to build the emulated CUDA kernels"
    return None


def build(extra_sources: tuple[Path, ...] = ()) -> Path:
    """Compiles csrc's kernels (and ``extra_sources``, .cu files written for the emulator's own tests)
    with the emulator into a shared library, cached by content under the temp dir; returns its path."""
    csrc = cuda.csrc_dir()
    cu_files = [csrc / name for name in KERNEL_SOURCES] + list(extra_sources)
    inputs = sorted(cu_files + list(csrc.glob("*.h*")) + list(EMU_DIR.rglob("*.h")) + [EMU_DIR / "runtime.cpp"])
    flags = CXX_FLAGS + (ASAN_FLAGS if os.environ.get("LAG_EMU_ASAN", "0") not in ("", "0") else ())
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in inputs:
        digest.update(path.name.encode() + path.read_bytes())
    out = Path(tempfile.gettempdir()) / f"lag_triton_cuda_emu-{digest.hexdigest()[:16]}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="lag_cuda_emu_") as work:
        sources = []
        for path in cu_files:
            rewritten = Path(work) / (path.stem + ".cpp")
            rewritten.write_text(f'#line 1 "{path}"\n' + rewrite_launches(path.read_text()))
            sources.append(str(rewritten))
        partial = Path(work) / out.name
        cmd = [compiler(), *flags, "-Wno-unknown-pragmas", "-I", str(EMU_DIR / "include"), "-I", str(csrc)]
        cmd += [*sources, str(EMU_DIR / "runtime.cpp"), "-o", str(partial)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the emulated CUDA kernels failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        os.replace(partial, out)  # atomic: concurrent test processes may build the same file
    return out


def load(extra_sources: tuple[Path, ...] = ()) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(extra_sources)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lag_arrow_select_workspace_bytes.restype = ctypes.c_size_t
    lib.lag_arrow_select_workspace_bytes.argtypes = [i64, i64, i64, ctypes.c_int]
    lib.lag_arrow_select_launch.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_size_t]
    lib.lag_arrow_select_launch.argtypes += [ptr, ptr, ctypes.c_int, ptr]
    lib.lag_spectr_rerank_workspace_bytes.restype = ctypes.c_size_t
    lib.lag_spectr_rerank_workspace_bytes.argtypes = [i64, i64, i64]
    lib.lag_spectr_rerank_launch.argtypes = [ptr, ctypes.c_int, ptr, ctypes.c_int, ptr, ptr] + [i64] * 6
    lib.lag_spectr_rerank_launch.argtypes += [ctypes.c_int, ctypes.c_float, ptr, ptr, ptr, ctypes.c_size_t]
    lib.lag_spectr_rerank_launch.argtypes += [ptr, ptr, ptr, ctypes.c_int, ptr]
    lib.lag_lora_apply_launch.argtypes = [ptr, ctypes.c_int, ptr, ctypes.c_int, ptr, ptr, ptr] + [i64] * 5
    lib.lag_lora_apply_launch.argtypes += [ctypes.c_int, ptr]
    lib.lag_cuda_error_string.restype = ctypes.c_char_p
    lib.lag_emu_message.restype = ctypes.c_char_p
    lib.lag_emu_configure.argtypes = [ctypes.c_ulonglong, ctypes.c_int]
    lib.lag_emu_configure(int(os.environ.get("LAG_EMU_SEED", "0")), SMS)
    return lib


def library() -> ctypes.CDLL:
    """The emulated kernels, built once per process; raises RuntimeError if they cannot be."""
    global _library, _failure
    if _library is None:
        if _failure is None:
            _failure = unavailable_reason()
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            _library = load()
        except RuntimeError as exc:
            _failure = str(exc)
            raise
    return _library


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _poison(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(0xFF)
        else:
            t.fill_(-7777)


class EmulatedExtension:
    """The torch binding's calls (csrc/binding.cpp: same arguments, '' or an error message back)
    over the emulated C API. Arguments are trusted: the binding's checks are the GPU tests' subject."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _status(self, rc: int, op: str) -> str:
        """'' or the binding's message for launcher return code ``rc``, with the emulator's detail.
        The emulated context is then reset, so that one failing test does not fail the next ones
        (a faulted GPU context would fail every later launch of the process)."""
        detail = self.lib.lag_emu_message().decode()
        self.lib.lag_emu_reset()
        if rc == 0:
            return ""
        text = self.lib.lag_cuda_error_string(rc).decode()
        return f"lag_triton cuda backend: {op} launch failed: {text}" + (f" ({detail})" if detail else "")

    def arrow_select(self, scores, k, idx, out_scores, allowed, scope, stream):
        t, n = scores.shape
        _poison(idx, out_scores)
        s = 0 if allowed is None else allowed.shape[0]
        ws_bytes = self.lib.lag_arrow_select_workspace_bytes(t, n, k, 0)
        ws = torch.empty(ws_bytes, dtype=torch.uint8)
        _poison(ws)
        rc = self.lib.lag_arrow_select_launch(
            _ptr(scores),
            t,
            n,
            scores.stride(0),
            k,
            _ptr(allowed),
            _ptr(scope),
            s,
            n,
            _ptr(ws) if ws_bytes else None,
            ws_bytes,
            _ptr(idx),
            _ptr(out_scores),
            0,
            None,
        )
        return self._status(rc, "arrow_select")

    def spectr_rerank(self, x, a_star, candidates, top_m, combine_uniform, temperature, candidate_scores, sel, w, z, s):
        t, d = x.shape
        n, r, _ = a_star.shape
        k = candidates.shape[1]
        _poison(sel, w, z)
        z_all, key_all = torch.empty(t, k, r), torch.empty(t, k)
        ws_bytes = self.lib.lag_spectr_rerank_workspace_bytes(t, n, k)
        ws = torch.empty(ws_bytes, dtype=torch.uint8)
        _poison(z_all, key_all, ws)
        rc = self.lib.lag_spectr_rerank_launch(
            _ptr(x),
            DTYPE_CODES[x.dtype],
            _ptr(a_star),
            DTYPE_CODES[a_star.dtype],
            _ptr(candidates),
            _ptr(candidate_scores),
            t,
            n,
            r,
            d,
            k,
            top_m,
            int(combine_uniform),
            temperature,
            _ptr(z_all),
            _ptr(key_all),
            _ptr(ws) if ws_bytes else None,
            ws_bytes,
            _ptr(sel),
            _ptr(w),
            _ptr(z),
            0,
            None,
        )
        return self._status(rc, "spectr_rerank")

    def lora_apply(self, y, b_star, sel, w, z, stream):
        t, d_out = y.shape
        n, _, r = b_star.shape
        rc = self.lib.lag_lora_apply_launch(
            _ptr(y),
            DTYPE_CODES[y.dtype],
            _ptr(b_star),
            DTYPE_CODES[b_star.dtype],
            _ptr(sel),
            _ptr(w),
            _ptr(z),
            t,
            n,
            d_out,
            r,
            sel.shape[1],
            0,
            None,
        )
        return self._status(rc, "lora_apply")


def emulated(name: str, device) -> bool:
    """Whether backend ``name`` on ``device`` is the emulator's to run: "cuda" on CPU tensors."""
    return name == "cuda" and torch.device(device).type == "cpu"


def install_backend(name: str, device, mp: pytest.MonkeyPatch) -> None:
    """Make backend ``name`` usable on ``device`` while ``mp`` is active: the emulator where
    ``emulated(name, device)``, nothing otherwise (see ``use_emulated_backend``)."""
    if emulated(name, device):
        use_emulated_backend(mp)


def use_emulated_backend(mp: pytest.MonkeyPatch) -> None:
    """While ``mp`` is active, backend "cuda" runs on CPU tensors through the emulator: the cuda
    module's binding is the emulated extension and CPU tensors are a device it accepts, so
    ``get_ops("cuda")`` and ``patch(model, ..., backend="cuda")`` work on a CPU model. Skips when a
    GPU is present (the compiled backend runs there) or no compiler can build the kernels; fails
    when a compiler is there and the build fails."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the compiled cuda backend runs instead of the emulator")
    try:
        ext = EmulatedExtension(library())
    except RuntimeError as exc:
        if unavailable_reason() is None:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    available = kernels.backend_unavailable_reason

    def unavailable(name, device):
        return None if emulated(name, device) else available(name, device)

    mp.setattr(cuda, "_ext_for", lambda *tensors: ext)
    mp.setattr(cuda, "_stream", lambda device: 0)
    mp.setattr(kernels, "backend_unavailable_reason", unavailable)

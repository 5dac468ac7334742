"""``python -m lag_triton doctor``: what this installation can run, and whether it runs it right.

Prints the versions that matter, the devices, which backend ``backend="auto"`` picks on each (and
why every other one is unavailable there), then a self-test: every available kernel backend runs
the three ops on each device against the reference (``lag_triton.kernels.reference``) on random
inputs of odd sizes, 16-bit and fp32. The operands are small integers and the weights multiples of
1/4, so every fp32 dot product and sum is exact in any order: selections, scores, z and the
updated y must equal the reference's bit for bit (ties included), the softmax weights to 2e-6.
Then, for every available backend the reference included, a small model patched with it must
compile whole with ``torch.compile(fullgraph=True)`` (the path of transformers' static-cache
generation) and equal its eager forward. On first use on a GPU this compiles the kernels (the CUDA
extension: minutes). Exit status 0 when every available backend passed, 1 when one did not, or
when ``LAG_TRITON_BACKEND`` names a backend no device here can use (every ``backend="auto"`` patch
would raise).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .kernels import BACKENDS, ENV_OVERRIDE, backend_unavailable_reason, get_ops, reference, resolve_backend

#: (T, N, d_in, d_out, r, k, top_m): decode and prefill token counts around the kernels' thresholds,
#: d_in both a multiple of 16 (vectorised loads) and odd (the unaligned plans), N not a power of two
CASES = (
    (1, 301, 64, 96, 6, 20, 1),
    (7, 301, 67, 33, 6, 20, 3),
    (70, 301, 64, 96, 5, 20, 1),
    (133, 97, 131, 70, 16, 8, 2),
)
DTYPES = (torch.bfloat16, torch.float32)
OPS_PER_CASE = 3  # arrow_topk, spectr_rerank, lora_apply: the checks of one case and dtype (_case_checks)
_ENVIRONMENT = (ENV_OVERRIDE, "LAG_TRITON_FOLD_SPLITS", "LAG_TRITON_FILTER_GEMM", "TRITON_INTERPRET")


@dataclass(frozen=True)
class Mismatch:
    """One output of one op that differs from the reference's."""

    backend: str
    device: str
    op: str
    case: str
    detail: str
    not_run: int = 0  # the case's later checks, not run because this op raised

    def __str__(self) -> str:
        return f"{self.backend} on {self.device}: {self.op} {self.case}: {self.detail}"


def versions() -> dict[str, str]:
    found = {}
    for package in ("lag_triton", "torch", "triton", "transformers", "peft", "safetensors"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["torch"] = torch.__version__  # its own spelling: a CUDA build's local version included
    found["torch CUDA"] = torch.version.cuda or "none (a CPU build)"
    found["python"] = platform.python_version()
    return found


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def describe(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    p = torch.cuda.get_device_properties(device)
    return f"{device}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"


def _ints(shape, gen, lo=-3, hi=4, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=gen).to(dtype).to(device)


def _differs(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 0.0) -> str | None:
    """None when ``got`` equals ``want`` (NaN equal to NaN; within ``atol``), else where it differs."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: {tuple(got.shape)} {got.dtype}, the reference {tuple(want.shape)} {want.dtype}"
    g, w = got.double().cpu(), want.double().cpu()
    bad = ~(((g - w).abs() <= atol) | (g.isnan() & w.isnan()) | (g == w))
    if not bad.any():
        return None
    at = tuple(int(i) for i in bad.nonzero()[0])
    count = int(bad.sum())
    differ = "1 element differs" if count == 1 else f"{count} elements differ"
    return f"{name}{list(at)} = {g[at].item():g}, the reference {w[at].item():g} ({differ})"


def check_backend(backend: str, device: torch.device, seed: int = 0) -> Iterator[Mismatch]:
    """Run backend ``backend``'s three ops on ``device`` against the reference (see the module
    docstring); an op that raises is a mismatch too, and the case goes on to the next one."""
    ops = get_ops(backend)
    for (t, n, d_in, d_out, r, k, m), dtype in ((case, dtype) for case in CASES for dtype in DTYPES):
        case = f"T={t} N={n} d_in={d_in} d_out={d_out} r={r} k={k} top_m={m} {str(dtype).removeprefix('torch.')}"
        g = torch.Generator().manual_seed(seed + 7919 * t + n)
        for i, (op, check) in enumerate(_case_checks(ops, device, g, dtype, t, n, d_in, d_out, r, k, m)):
            try:
                detail = check()
            except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or launch is a finding
                raised = f"raised {type(e).__name__}: {str(e).strip()[:300]}"
                yield Mismatch(backend, str(device), op, case, raised, not_run=OPS_PER_CASE - 1 - i)
                break
            if detail is not None:
                yield Mismatch(backend, str(device), op, case, detail)


def _case_checks(ops, device, g, dtype, t, n, d_in, d_out, r, k, m) -> Iterator[tuple[str, Callable[[], str | None]]]:
    """(op, a check that runs it and says where its output differs from the reference's, or None)
    for the three ops, in pipeline order; each takes its inputs from the reference's outputs."""
    x = _ints((t, d_in), g, dtype=dtype, device=device)
    prototypes = _ints((n, d_in), g, lo=-2, hi=3, dtype=dtype, device=device)
    want_idx, want_scores = reference.arrow_topk(x, prototypes, k)

    def arrow_topk() -> str | None:
        idx, scores = ops.arrow_topk(x, prototypes, k)
        return _differs("idx", idx, want_idx) or _differs("scores", scores, want_scores)

    yield "arrow_topk", arrow_topk

    a_star = _ints((n, r, d_in), g, lo=-2, hi=3, dtype=dtype, device=device)
    candidates = want_idx.clone()
    candidates[torch.rand(candidates.shape, generator=g).to(device) < 0.1] = -1  # missing candidates
    want_sel, want_w, want_z = reference.spectr_rerank(x, a_star, candidates, m, "softmax", 0.7)

    def spectr_rerank() -> str | None:
        sel, w, z = ops.spectr_rerank(x, a_star, candidates, m, "softmax", 0.7)
        return _differs("sel", sel, want_sel) or _differs("z", z, want_z) or _differs("w", w, want_w, 2e-6)

    yield "spectr_rerank", spectr_rerank

    b_star = _ints((n, d_out, r), g, dtype=dtype, device=device)
    y0 = _ints((t, d_out), g, lo=-8, hi=9, dtype=dtype, device=device)
    weights = (torch.randint(0, 5, (t, m), generator=g).float() / 4).to(device)
    z = _ints((t, m, r), g, device=device)
    expected = reference.lora_apply(y0.clone(), b_star, want_sel, weights, z)

    def lora_apply() -> str | None:
        return _differs("y", ops.lora_apply(y0.clone(), ops.prepare_b_star(b_star), want_sel, weights, z), expected)

    yield "lora_apply", lora_apply


def compile_check(backend: str, device: torch.device) -> str | None:
    """None when ``torch.compile(fullgraph=True)`` takes a model patched with ``backend`` whole (no
    graph break) and its forward equals the eager one; else what went wrong. The path transformers'
    static-cache generation takes: a torch release whose custom-op support lags shows here.
    ``aot_eager`` on CPU (no C++ toolchain needed), inductor on a GPU."""
    from .library.library import Library
    from .library.weights import ModuleWeights
    from .patching import patch

    g = torch.Generator().manual_seed(1)
    n, r, d_in, d_out = 37, 4, 64, 48
    a_star = torch.randn(n, r, d_in, generator=g) / d_in**0.5
    weights = ModuleWeights(a_star, torch.randn(n, d_out, r, generator=g), a_star[:, 0].clone(), torch.arange(n))
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).to(device).eval()
    x = torch.randn(3, 5, d_in, generator=g).to(device)
    torch._dynamo.reset()
    try:
        patch(model, Library([f"a{i}" for i in range(n)], {"0": weights}), k=8, top_m=2, backend=backend)
        compiled = torch.compile(
            model, fullgraph=True, dynamic=False, backend="inductor" if device.type == "cuda" else "aot_eager"
        )
        with torch.no_grad():
            want, got = model(x), compiled(x)
    except Exception as e:  # noqa: BLE001 - a graph break (fullgraph) or a compiler error is the finding
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        return f"patch + torch.compile(fullgraph=True) raised {type(e).__name__}: {first_line}"
    finally:
        torch._dynamo.reset()
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        return f"the compiled forward differs from the eager one by up to {(got - want).abs().max().item():.3g}"
    return None


def run(out: Callable[[str], None] = print, self_test: bool = True) -> int:
    """Print the report; 0 when every available backend passed its self-test, else 1."""
    out("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    set_env = [f"{name}={os.environ[name]}" for name in _ENVIRONMENT if name in os.environ]
    out("environment: " + (", ".join(set_env) or "no lag_triton or Triton variables set"))
    if not torch.cuda.is_available():
        out("CUDA: not available to torch" + ("" if torch.version.cuda else " (a CPU build of torch)"))
    failures, auto_errors = 0, []
    all_devices = devices()
    for device in all_devices:
        out(describe(device))
        try:
            out(f"  backend='auto' routes with: {resolve_backend('auto', device)}")
        except RuntimeError as e:
            out(f"  backend='auto': {e}")
            auto_errors.append(str(e))
        for backend in BACKENDS:
            reason = backend_unavailable_reason(backend, device)
            if reason is not None:
                out(f"  {backend}: unavailable: {reason}")
                continue
            if not self_test:
                out(f"  {backend}: available" + (" (the reference)" if backend == "torch" else ""))
                continue
            failures += not _self_test(backend, device, out)
    if len(auto_errors) == len(all_devices):  # only an unusable LAG_TRITON_BACKEND makes "auto" fail
        override = os.environ.get(ENV_OVERRIDE, "")
        out(
            f"FAILED: {ENV_OVERRIDE}={override} leaves backend='auto' no backend on any device here, so every "
            f"patch with backend='auto' raises: {auto_errors[0]} (unset it, or name a backend listed available)"
        )
        failures += 1
    return 1 if failures else 0


def _self_test(backend: str, device: torch.device, out: Callable[[str], None]) -> bool:
    """Report ``backend``'s self-test on ``device``: its ops against the reference (not for the
    reference itself), then a compiled patched model. True when both pass."""
    findings, passed_ops = [], " (the reference); " if backend == "torch" else "; "
    if backend != "torch":
        start = time.perf_counter()
        mismatches = list(check_backend(backend, device))
        not_run = sum(m.not_run for m in mismatches)
        checks = OPS_PER_CASE * len(CASES) * len(DTYPES) - not_run  # those that ran
        passed_ops = f"; ops equal the reference ({checks} checks, {time.perf_counter() - start:.1f} s); "
        if mismatches:
            skipped = f" ({not_run} more not run: an op raised before them)" if not_run else ""
            findings.append(f"its ops differ from the reference in {len(mismatches)} of {checks} checks{skipped}:")
            findings += [f"  {m.op} {m.case}: {m.detail}" for m in mismatches[:10]]
    start = time.perf_counter()
    error = compile_check(backend, device)
    if error is not None:
        findings.append(error)
    if not findings:
        seconds = time.perf_counter() - start
        out(f"  {backend}: available{passed_ops}torch.compile(fullgraph=True) equals eager ({seconds:.1f} s)")
        return True
    out(f"  {backend}: available; SELF-TEST FAILED:")
    for line in findings:
        out(f"    {line}")
    return False

"""``python -m lag_triton doctor``: the report, a passing self-test, and a broken backend found.

Without a GPU the Triton backend runs on CPU under the interpreter (tests/conftest.py), so its
self-test here is real; the cases are cut to two (one decode, one odd-size prefill) to keep CI short.
"""

from __future__ import annotations

import pytest
import torch

from lag_triton import doctor
from lag_triton.__main__ import main

from factories import TRITON_UNAVAILABLE, needs_triton

ON_CPU = not torch.cuda.is_available()


@pytest.fixture
def two_cases(monkeypatch):
    monkeypatch.setattr(doctor, "CASES", (doctor.CASES[0], doctor.CASES[3]))


def _triton_backend():
    """The Triton backend's module, whose functions the ops call."""
    from lag_triton.kernels import get_ops

    return get_ops("triton").module


def test_report_and_passing_self_test(two_cases, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "lag_triton " in out
    assert "cpu: " in out
    assert "torch: available (the reference); torch.compile(fullgraph=True) equals eager" in out
    if ON_CPU:
        assert "backend='auto' routes with: torch" in out
        if TRITON_UNAVAILABLE is None:
            assert "triton: available; ops equal the reference (12 checks" in out
        else:  # an old Triton, say: the report names why and runs nothing of it
            assert f"triton: unavailable: {TRITON_UNAVAILABLE}\n" in out
        assert out.count("torch.compile(fullgraph=True) equals eager") == 1 + (TRITON_UNAVAILABLE is None)
        assert "cuda: unavailable: the cuda backend needs CUDA tensors, got device cpu" in out


@needs_triton
@pytest.mark.skipif(not ON_CPU, reason="breaks the Triton backend's CPU (interpreter) run")
def test_a_wrong_output_and_a_failing_op_are_reported(two_cases, capsys, monkeypatch):
    backend = _triton_backend()
    correct = backend.lora_apply

    def off_by_a_quarter(y, b_star, sel, w, z):
        correct(y, b_star, sel, w, z)
        y[-1, -1] += 0.25
        return y

    monkeypatch.setattr(backend, "lora_apply", off_by_a_quarter)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "triton: available; SELF-TEST FAILED:\n    its ops differ from the reference in 4 of 12 checks:" in out
    assert out.count("      lora_apply T=") == 4 and "(1 element differs)" in out
    assert "arrow_topk T=" not in out and "spectr_rerank T=" not in out

    def no_kernel(*args, **kwargs):
        raise RuntimeError("ptxas fatal: out of registers")

    monkeypatch.setattr(backend, "spectr_rerank", no_kernel)
    mismatches = list(doctor.check_backend("triton", torch.device("cpu")))
    assert {m.op for m in mismatches} == {"spectr_rerank"}  # a case stops at the op that raised
    assert all("raised RuntimeError: ptxas fatal: out of registers" in m.detail for m in mismatches)
    assert len(mismatches) == len(doctor.CASES) * len(doctor.DTYPES)


def test_a_compile_failure_is_reported(two_cases, capsys, monkeypatch):
    def graph_break(*args, **kwargs):
        raise torch._dynamo.exc.Unsupported("graph break in a custom op")

    monkeypatch.setattr(doctor, "check_backend", lambda *a: iter(()))  # the ops pass: only compiling fails
    monkeypatch.setattr(torch, "compile", graph_break)
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert (
        "torch: available; SELF-TEST FAILED:\n    patch + torch.compile(fullgraph=True) raised Unsupported: graph break"
        in out
    )


def test_report_only_runs_no_backend(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "check_backend", lambda *a: pytest.fail("self-test ran"))
    monkeypatch.setattr(doctor, "compile_check", lambda *a: pytest.fail("compile check ran"))
    assert main(["doctor", "--no-self-test"]) == 0
    out = capsys.readouterr().out
    assert "  torch: available (the reference)\n" in out
    if ON_CPU:
        triton_line = "available" if TRITON_UNAVAILABLE is None else f"unavailable: {TRITON_UNAVAILABLE}"
        assert f"  triton: {triton_line}\n" in out


@pytest.mark.parametrize("value", ["nope", "cuda"])
def test_an_unusable_backend_override_fails(capsys, monkeypatch, value):
    """LAG_TRITON_BACKEND naming an unknown backend, or one no device here can use, makes every
    patch with backend="auto" raise: the report said so per device, yet exited 0."""
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("the cuda backend may be usable on this machine's GPUs")
    monkeypatch.setenv("LAG_TRITON_BACKEND", value)
    assert main(["doctor", "--no-self-test"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED: LAG_TRITON_BACKEND={value} leaves backend='auto' no backend on any device here" in out
    assert f"lag_triton backend '{value}' (from LAG_TRITON_BACKEND) is unavailable: " in out
    monkeypatch.setenv("LAG_TRITON_BACKEND", "torch")  # usable everywhere
    assert main(["doctor", "--no-self-test"]) == 0
    assert "FAILED" not in capsys.readouterr().out


def test_checks_not_run_after_an_op_raised_are_not_counted(two_cases, capsys, monkeypatch):
    """A case stops at the op that raised: "N of M checks" counts the checks that ran, and says how
    many did not (not the 12 a full run has). A stand-in backend: the reference, its rerank failing."""
    from types import SimpleNamespace

    from lag_triton.kernels import reference

    def no_kernel(*args, **kwargs):
        raise RuntimeError("ptxas fatal: out of registers")

    ops = SimpleNamespace(
        arrow_topk=reference.arrow_topk,
        spectr_rerank=no_kernel,
        lora_apply=reference.lora_apply,
        prepare_b_star=lambda b: b,
    )
    monkeypatch.setattr(doctor, "get_ops", lambda backend: ops)
    monkeypatch.setattr(doctor, "compile_check", lambda *a: None)
    lines = []
    assert not doctor._self_test("stand-in", torch.device("cpu"), lines.append)
    out = "\n".join(lines)
    assert "its ops differ from the reference in 4 of 8 checks (4 more not run: an op raised before them):" in out
    assert out.count("spectr_rerank T=") == 4 and "lora_apply T=" not in out

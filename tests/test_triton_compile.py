"""The Triton kernels compile for the H100 (sm_90) with the pinned Triton, in CI, without a GPU.

Everything else in CI runs the kernels under TRITON_INTERPRET=1, which accepts programs the
real compiler rejects (and swaps the top-k implementation); this runs the full pipeline down to
a ptxas cubin for every configuration the launchers pick (lag_triton/kernels/triton/_aot_check.py).

The compiles take minutes of compiler time but are independent of the other tests, which run the
interpreter on one core: ``tests/conftest.py`` starts the check in the background as soon as this
test is collected (``start_compile_check``, one core fewer than the machine has), and the test
waits for its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from factories import needs_triton

pytestmark = needs_triton  # compiles the Triton backend's kernels with the installed Triton
ROOT = Path(__file__).resolve().parents[1]


class CompileCheck:
    """``_aot_check`` for sm_90 running in a subprocess, its output going to a temporary file."""

    def __init__(self, jobs: int):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.log = tempfile.TemporaryFile(mode="w+")  # not a pipe: nobody reads it until the end
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lag_triton.kernels.triton._aot_check", "90", "--jobs", str(jobs)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def report(self, timeout: float) -> tuple[int, str]:
        """Wait for the check; its exit code and output."""
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:  # timed out
                self.stop()
        self.log.seek(0)
        out = self.log.read()
        self.stop()
        return code, out

    def stop(self) -> None:
        """Kill the check if it still runs (the session ended without its test) and drop its output."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start_compile_check(background: bool) -> CompileCheck:
    """Start the check; in the background it leaves one core to the tests that run meanwhile."""
    cores = os.cpu_count() or 1
    return CompileCheck(jobs=max(1, cores - 1) if background else cores)


def test_every_launch_configuration_compiles_for_sm90(pytestconfig):
    check = getattr(pytestconfig, "lag_compile_check", None) or start_compile_check(background=False)
    code, out = check.report(timeout=3600)
    report = f"exit code {code}\n{out[-12000:]}"
    assert code == 0, report
    assert "compiles for sm_90, 0 failures" in out, report


TEST_NAME = test_every_launch_configuration_compiles_for_sm90.__name__  # the test conftest starts early


# The last-to-arrive protocol as _aot_check finds it in the PTX of every folding configuration
# (registers and names as Triton emits them; only the memory operations matter to the rule).
_STORES = "st.global.b64 [ %rd1 + 0 ], { %rd2 };"
_TICKET = "@%p1 atom.global.gpu.acq_rel.add.u32 %r1, [ %rd3 + 0 ], %r2;"
_PARTIAL = "@%p2 ld.global.cg.b64 { %rd4 }, [ %rd5 + 0 ];"
_SAFE = [_STORES, "bar.sync 0;", _TICKET, "bar.sync 0;", _PARTIAL]


@pytest.mark.parametrize(
    "ptx,folds,error",
    [
        (_SAFE, True, None),
        ([_STORES, _PARTIAL], False, None),  # no fold, no ticket: nothing to check
        ([_STORES, "bar.sync 0;", _TICKET.replace("acq_rel", "relaxed"), "bar.sync 0;", _PARTIAL], True, "no acq_rel"),
        ([_STORES, "bar.sync 0;", _TICKET.replace(".gpu", ".cta"), "bar.sync 0;", _PARTIAL], True, "not gpu-scoped"),
        ([_STORES, _TICKET, "bar.sync 0;", _PARTIAL], True, "no CTA barrier right before"),
        ([_STORES, "bar.sync 0;", _TICKET, _PARTIAL, "bar.sync 0;"], True, "before any CTA barrier"),
        ([*_SAFE, _PARTIAL.replace(".cg", "")], True, "not .cg"),
        # cp.async (a pipelined load into shared memory): .ca goes through L1, .cg around it
        ([*_SAFE, "cp.async.cg.shared.global [ %r3 + 0 ], [ %rd6 + 0 ], 16;", "cp.async.commit_group;"], True, None),
        ([*_SAFE, "cp.async.ca.shared.global [ %r3 + 0 ], [ %rd6 + 0 ], 8;"], True, "not .cg"),
        ([_STORES, "bar.sync 0;", _TICKET, "cp.async.cg.shared.global [ %r3 + 0 ], [ %rd6 + 0 ], 16;"], True, "before"),
    ],
)
def test_fold_ordering_rule(ptx, folds, error):
    from lag_triton.kernels.triton._aot_check import fold_ordering_error

    found = fold_ordering_error("\n".join(ptx), folds)
    assert (found is None) if error is None else (found is not None and error in found), found

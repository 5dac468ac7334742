"""The Triton kernels compile for the H100 (sm_90) with the pinned Triton, in CI, without a GPU.

Everything else in CI runs the kernels under TRITON_INTERPRET=1, which accepts programs the
real compiler rejects (and swaps the top-k implementation); this runs the full pipeline down to
a ptxas cubin for every configuration the launchers pick (lag_triton/kernels/triton/_aot_check.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_launch_configuration_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "lag_triton.kernels.triton._aot_check", "90", "--jobs", str(os.cpu_count() or 1)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    report = f"exit code {proc.returncode}\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    assert "compiles for sm_90, 0 failures" in proc.stdout, report

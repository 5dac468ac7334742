"""The CUDA emulator (tests/cuda_emu) against CUDA's documented semantics, so that a kernel test
passing under it means what it would on a GPU: warp shuffles and votes, barriers (exited threads
do not count), uninitialised shared memory, the seeded schedule, fp16 / bf16 conversions (bit for
bit against torch), and the faults it must report rather than hide: deadlock, lanes at different
collectives, misaligned vector loads, invalid launch configurations. Last, the CUDA kernel tests
under AddressSanitizer (a CPU stand-in for compute-sanitizer's memcheck).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from emulated_cuda import EMU_DIR, SMS, compiler, load, rewrite_launches, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]

THREADS = 256
LAUNCH_FAILURE, MISALIGNED, INVALID_CONFIGURATION = 719, 716, 9


@pytest.fixture(scope="module")
def emu():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lib = load(extra_sources=(EMU_DIR / "selftest.cu",))
    lib.emu_selftest.argtypes = [ctypes.c_int, ctypes.c_void_p]
    for name in ("emu_narrow", "emu_widen"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _run(emu, which, *, reset=True):
    """(return code, the emulator's message, out) of self-test kernel ``which``."""
    out = torch.full((5 * THREADS,), -5, dtype=torch.int64)
    rc = emu.emu_selftest(which, out.data_ptr())
    message = emu.lag_emu_message().decode()
    if reset:
        emu.lag_emu_reset()
    return rc, message, out


def test_warp_shuffles_and_ballot(emu):
    rc, message, out = _run(emu, 0)
    assert rc == 0, message
    out = out[: 5 * THREADS].view(THREADS, 5)
    tid = torch.arange(THREADS)
    lane, base = tid % 32, tid - tid % 32
    assert torch.equal(out[:, 0], base + (lane ^ 5))
    assert torch.equal(out[:, 1], torch.where(lane >= 3, tid - 3, tid))  # lanes below delta keep their own
    assert torch.equal(out[:, 2], base + 7)
    votes = ((lane % 3 == 0) | (tid == 40)).view(-1, 32)
    masks = (votes.long() << torch.arange(32)).sum(dim=1)
    assert torch.equal(out[:, 3], masks.repeat_interleave(32))
    assert torch.equal(out[:, 4], (1 << 40) + base + (lane ^ 1))  # 64-bit values shuffle whole


def test_barriers_order_shared_memory_and_exited_threads_do_not_count(emu):
    rc, message, out = _run(emu, 1)
    assert rc == 0, message
    tid = torch.arange(THREADS)
    expect = 1000 + (tid + 1) % THREADS + (tid < 128).long()
    assert torch.equal(out[:THREADS], expect)


def test_uninitialised_shared_memory_is_poisoned(emu):
    rc, message, out = _run(emu, 2)
    assert rc == 0, message
    assert (out[:THREADS] == -1).all()  # 0xffffffff ints
    assert (out[THREADS : 2 * THREADS] == 1).all()  # NaN floats


def test_schedule_is_seeded_and_varies(emu):
    orders = []
    for seed in range(4):
        emu.lag_emu_configure(seed, SMS)
        rc, message, out = _run(emu, 3)
        assert rc == 0, message
        rounds = out[: 3 * THREADS].view(3, THREADS)
        for r in rounds:  # every thread took exactly one slot per round
            assert torch.equal(r.sort().values, torch.arange(THREADS))
        orders.append(rounds)
    emu.lag_emu_configure(0, SMS)
    assert torch.equal(_run(emu, 3)[2][: 3 * THREADS].view(3, THREADS), orders[0]), "same seed, same schedule"
    assert any(not torch.equal(orders[0], o) for o in orders[1:]), "the schedule ignores the seed"
    assert not torch.equal(orders[0][0], torch.arange(THREADS)), "threads run in index order"


def test_deadlock_is_reported(emu):
    rc, message, _ = _run(emu, 4)
    assert rc == LAUNCH_FAILURE
    assert "deadlock in deadlock_kernel block (0, 0, 0): 240 threads wait at __syncthreads, 16 at warp" in message


def test_lanes_at_different_collectives_are_reported(emu):
    rc, message, _ = _run(emu, 5)
    assert rc == LAUNCH_FAILURE
    assert "lanes of one warp reached different warp collectives in mixed_collectives_kernel" in message


def test_misaligned_vector_load_is_a_sticky_fault(emu):
    rc, message, _ = _run(emu, 6, reset=False)
    assert rc == MISALIGNED and "misaligned address in __ldg in misaligned_kernel" in message
    rc, _, _ = _run(emu, 0, reset=False)  # as on a GPU, a faulted context fails every later launch
    assert rc == MISALIGNED
    emu.lag_emu_reset()
    assert _run(emu, 0)[0] == 0


@pytest.mark.parametrize("which,what", [(7, "block of 2048 threads"), (8, "grid (1, 70000, 1)")])
def test_invalid_launch_configuration(emu, which, what):
    rc, message, _ = _run(emu, which)
    assert rc == INVALID_CONFIGURATION
    assert "invalid launch configuration of empty_kernel" in message and what in message
    assert _run(emu, 0)[0] == 0  # not sticky


def test_half_and_bfloat16_conversions_match_torch_bit_for_bit(emu):
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)  # every 16-bit pattern
    from_half, from_bf16 = torch.empty(1 << 16), torch.empty(1 << 16)
    emu.emu_widen(bits.data_ptr(), 1 << 16, from_half.data_ptr(), from_bf16.data_ptr())
    for got, dtype in ((from_half, torch.float16), (from_bf16, torch.bfloat16)):
        want = bits.view(dtype).float()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~want.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))
    # fp32 values around every rounding boundary: random bit patterns, halfway cases, the subnormal
    # and overflow ranges of fp16
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), generator=g, dtype=torch.int64)
            .to(torch.int32)
            .view(torch.float32),
            (torch.arange(1 << 16, dtype=torch.int32) << 13 | (1 << 12)).view(torch.float32),  # fp16 halfway
            (torch.arange(1 << 16, dtype=torch.int32) << 16 | (1 << 15)).view(torch.float32),  # bf16 halfway
            torch.linspace(-7e-5, 7e-5, 100_001),
            torch.tensor([65504.0, 65519.99, 65520.0, 1e9, float("inf"), -float("inf"), float("nan"), 0.0, -0.0]),
        ]
    )
    to_half = torch.empty(values.numel(), dtype=torch.int16)
    to_bf16 = torch.empty(values.numel(), dtype=torch.int16)
    emu.emu_narrow(values.data_ptr(), values.numel(), to_half.data_ptr(), to_bf16.data_ptr())
    for got, dtype in ((to_half, torch.float16), (to_bf16, torch.bfloat16)):
        want = values.to(dtype)
        nan = want.isnan()
        assert torch.equal(got.view(dtype).isnan(), nan)
        assert torch.equal(got[~nan], want.view(torch.int16)[~nan])


def test_rewrite_launches():
    src = (
        "k<<<g, kThreads, 0, s>>>(a, b);\n"
        "foo<TY, TB, 8, 4><<<dim3(1, 2), 256>>>(x);\n"
        "bar<TE><<<static_cast<unsigned>(t), 32>>>(y);"
    )
    assert rewrite_launches(src).splitlines() == [
        'lag_emu::launcher(g, kThreads, 0, s)("k", k, a, b);',
        'lag_emu::launcher(dim3(1, 2), 256)("foo<TY, TB, 8, 4>", foo<TY, TB, 8, 4>, x);',
        'lag_emu::launcher(static_cast<unsigned>(t), 32)("bar<TE>", bar<TE>, y);',
    ]


def _asan_env() -> dict:
    """The environment of a process whose emulated kernels are built with AddressSanitizer: libasan
    preloaded (Python is not built with it), so torch's CPU tensors get redzones too."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernels run on it, under compute-sanitizer in bench/gpu_run.sh")
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    found = subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(found) or not os.path.exists(found):
        pytest.skip(f"{compiler()} has no AddressSanitizer runtime (libasan.so)")
    return dict(
        os.environ,
        LD_PRELOAD=found,
        LAG_EMU_ASAN="1",
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    )


# A caller's error the kernels cannot see: Arrow scores of 1 x 2048 passed as 1 x 4096. Under
# AddressSanitizer the select's reads past the tensor are a heap-buffer-overflow report.
_CANARY = """
import torch
from emulated_cuda import library
lib = library()
scores, idx, out = torch.rand(2048), torch.empty(20, dtype=torch.int32), torch.empty(20)
lib.lag_arrow_select_launch(scores.data_ptr(), 1, 4096, 4096, 20, None, None, 0, 0, None, 0,
                            idx.data_ptr(), out.data_ptr(), 0, None)
print("NOT DETECTED")
"""

# csrc-specific cases that take every path of the three kernels at small sizes: the select's rounds,
# flushes, N splits and multi-batch merge, unaligned and mixed-dtype inputs, scopes, ties; the
# per-task and the grouped rerank (two rank-row groups, a scan of several rounds); apply's rank paths
_ASAN_CASES = (
    "(flushes and not 300-3000) or (split_merge_offsets_dtypes and 3-90-64-9) or (gemm_select and not 2048)"
    " or (spectr_rerank_matches and (7-40 or 3-30 or 1-50 or 2-10 or 300-40-13-2049-10-3-softmax-dtype2))"
    " or scan_spans or lora_apply or ties"
)


def test_kernels_under_address_sanitizer():
    env = _asan_env()
    canary = subprocess.run([sys.executable, "-c", _CANARY], cwd=ROOT, env=env, capture_output=True, text=True)
    assert "heap-buffer-overflow" in canary.stderr and "NOT DETECTED" not in canary.stdout, canary.stderr[-3000:]
    tests = ["tests/test_cuda_backend.py", "-k", _ASAN_CASES]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    report = f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, report
    assert " passed" in run.stdout and "failed" not in run.stdout, report

"""Streaming library build (issue 13, item 1): straight into the file, same bytes as the in-memory
build and save, flat peak memory as N grows, parallel workers, and no corrupt output when killed."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lag_triton
from lag_triton import AdapterError, Library
from lag_triton.library import ModuleWeights, build_library
from lag_triton.library.build import align_and_write as _ALIGN_AND_WRITE

from factories import VOCAB, count_alignments, make_adapter, peft_logits, tiny_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Five adapters: mixed ranks, subsets of modules, one module only one adapter targets."""
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    specs = [
        dict(r=4),
        dict(r=2, targets=["up_proj", "down_proj"]),
        dict(r=3, targets=["up_proj", "q_proj"]),
        dict(r=6, targets=["v_proj"]),
        dict(r=2, use_rslora=True),
    ]
    return [make_adapter(model, tmp / f"a{i}", seed=i, **s) for i, s in enumerate(specs)]


def _saved_bytes(paths, tmp_path, dtype=torch.bfloat16) -> bytes:
    Library.from_peft(paths, dtype=dtype, progress=False).save(tmp_path / "memory.safetensors")
    return (tmp_path / "memory.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_streamed_file_has_the_bytes_of_the_in_memory_build(adapters, tmp_path, dtype, monkeypatch):
    out = tmp_path / "lib.safetensors"
    report = build_library(adapters, out, dtype=dtype, workers=0, progress=False)
    assert out.read_bytes() == _saved_bytes(adapters, tmp_path, dtype)
    assert (report.adapters, report.aligned, report.modules, report.nbytes) == (5, 5, 8, out.stat().st_size)
    checked = []  # the values were checked as they were aligned: the new file is not read back whole
    monkeypatch.setattr(ModuleWeights, "check_values", lambda self, n: checked.append(n))
    loaded = Library.from_peft(adapters, dtype=dtype, progress=False, output=tmp_path / "again.safetensors")
    assert loaded.source == str(tmp_path / "again.safetensors") and loaded.names == ["a0", "a1", "a2", "a3", "a4"]
    assert checked == [] and (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.safetensors", "lib.safetensors", "memory.safetensors"]


def _with_a_nan(adapter: Path, folder: Path) -> Path:
    """A copy of ``adapter`` at ``folder`` with one NaN in a lora_B: it fails as it is aligned."""
    folder.mkdir()
    for f in adapter.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(folder / "adapter_model.safetensors"))
    return folder


def test_worker_processes_write_the_same_file_and_report_errors(adapters, tmp_path):
    build_library(adapters, tmp_path / "par.safetensors", dtype=torch.bfloat16, workers=2, progress=False)
    assert (tmp_path / "par.safetensors").read_bytes() == _saved_bytes(adapters, tmp_path)
    # an adapter that fails inside a worker: its error, naming it, and no output and no temp file
    bad = _with_a_nan(adapters[1], tmp_path / "bad")
    never = tmp_path / "never.safetensors"
    with pytest.raises(AdapterError, match=r"bad'.*non-finite values") as caught:
        build_library([*adapters, bad], never, workers=2, progress=False)
    assert not never.exists()
    # the five good adapters' rows are kept for a resumed build, which aligns only the mended one
    if sys.version_info >= (3, 11):
        assert caught.value.__notes__[0].startswith("5 of 6 adapters are written to")
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".never")]) == 2
    (bad / "adapter_model.safetensors").write_bytes((adapters[1] / "adapter_model.safetensors").read_bytes())
    report = build_library([*adapters, bad], never, workers=2, progress=False, resume=True)
    assert (report.aligned, report.resumed) == (1, 5)
    assert never.read_bytes() == _saved_bytes([*adapters, bad], tmp_path, torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad",
        "memory.safetensors",
        "never.safetensors",
        "par.safetensors",
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_in_memory_build_with_workers_is_the_same_library(adapters, tmp_path, dtype, monkeypatch):
    """workers=N in memory: the rows come back from the worker processes as bytes; the library saves
    to the same bytes as the one aligned in this process, whose default stays in-process."""
    from lag_triton.library import build

    received = []
    receive = build.MemoryTarget.receive
    monkeypatch.setattr(build.MemoryTarget, "receive", lambda self, rows: received.append(rows) or receive(self, rows))
    parallel = Library.from_peft(adapters, dtype=dtype, progress=False, workers=2)
    assert len(received) == len(adapters)  # every adapter's rows came from a worker
    parallel.save(tmp_path / "parallel.safetensors")
    assert (tmp_path / "parallel.safetensors").read_bytes() == _saved_bytes(adapters, tmp_path, dtype)
    assert all(m.a_star.dtype == dtype for m in parallel.modules.values())
    started = []
    monkeypatch.setattr(build, "ProcessPoolExecutor", lambda *a, **k: started.append(a) or pytest.fail("workers"))
    Library.from_peft(adapters[:2], progress=False)
    assert started == []


def test_in_memory_build_reports_a_worker_s_adapter_error(adapters, tmp_path):
    """An adapter that fails inside a worker (non-finite weights are found as it is aligned, after
    every header was planned): its error, naming it, as from an in-process build."""
    from safetensors.torch import load_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in adapters[1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(bad / "adapter_model.safetensors"))
    weights[next(k for k in weights if k.endswith("lora_B.weight"))][0, 0] = float("nan")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"bad'.*non-finite values"):
        Library.from_peft([*adapters, bad], progress=False, workers=2)


def test_bad_arguments_fail_before_any_file_is_written(adapters, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        build_library(adapters, tmp_path / "x", workers=-1, progress=False)
    with pytest.raises(ValueError, match="is not a factor dtype"):
        build_library(adapters, tmp_path / "x", dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match=r"repeated: \['a'\]"):
        build_library(adapters[:2], tmp_path / "x", names=["a", "a"], progress=False)

    def full_disk(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(OSError, match=r"x': it needs [\d,]+ bytes and [\d,]+ are free"):
        build_library(adapters, tmp_path / "x", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_an_adapter_file_is_refused_before_any_work(adapters, tmp_path, monkeypatch):
    import shutil

    from lag_triton.library import add_adapters, build

    a0 = Path(shutil.copytree(adapters[0], tmp_path / "a0"))
    lib = tmp_path / "lib.safetensors"
    build_library(adapters[1:2], lib, progress=False)
    saved = {f: f.read_bytes() for f in a0.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("adapters were read before the output was checked")

    monkeypatch.setattr(build, "plan_adapters", boom)
    weights = a0 / "adapter_model.safetensors"
    with pytest.raises(ValueError, match="would overwrite an input"):
        build_library([a0, adapters[1]], weights, progress=False)
    with pytest.raises(ValueError, match="would overwrite an input"):
        build_library(iter([str(a0)]), a0 / "adapter_config.json", progress=False)
    with pytest.raises(ValueError, match="general adapter file"):
        build_library(adapters[1:2], weights, general_adapters=[a0], progress=False)
    with pytest.raises(ValueError, match="would overwrite an input"):
        add_adapters(lib, [a0], output=weights, progress=False)
    assert {f: f.read_bytes() for f in a0.iterdir()} == saved


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_update_that_overflows_the_dtype_suggests_float32_only_for_float16(adapters, tmp_path, dtype):
    import shutil

    folder = Path(shutil.copytree(adapters[0], tmp_path / "big"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 1e9 if dtype == torch.float16 else 1e40
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=f"overflows {dtype}") as info:
        build_library([folder], tmp_path / "lib.safetensors", dtype=dtype, progress=False)
    assert ("build in float32" in str(info.value)) == (dtype == torch.float16), str(info.value)
    assert dtype == torch.float16 or f"exceeds the range of {dtype}" in str(info.value)


def test_a_rank_above_the_layer_size_is_held_at_that_size_and_reproduces_peft(tmp_path):
    """PEFT saves a rank above min(d_in, d_out) ("all-linear" on Qwen2-MoE's 1-output shared-expert
    gate, say; it was refused): the update has at most that rank, so the library holds that many."""
    model = tiny_model("llama")
    folder = make_adapter(
        model, tmp_path / "big_rank", seed=0, r=60, targets=["up_proj", "v_proj"]
    )  # 48 -> 80, 48 -> 32
    build_library([folder], tmp_path / "lib.safetensors", progress=False)
    library = Library.load(tmp_path / "lib.safetensors")
    assert {n.rpartition(".")[2]: int(m.ranks[0]) for n, m in library.modules.items()} == {"up_proj": 48, "v_proj": 24}
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want = peft_logits(model, folder, ids)
    lag_triton.patch(model, library, k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# -- memory ------------------------------------------------------------------------------------------
def _big_adapters(root, n: int) -> list:
    """n PEFT folders of 4 modules 1024 -> 4096 at rank 16 (1.3 MB of float32 each)."""
    paths = []
    config = {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "bias": "none"}
    for i in range(n):
        path = root / f"big{i:03d}"
        paths.append(path)
        if path.exists():
            continue
        path.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for m in range(4):
            tensors[f"base_model.model.layer{m}.lora_A.weight"] = torch.randn(16, 1024, generator=g)
            tensors[f"base_model.model.layer{m}.lora_B.weight"] = torch.randn(4096, 16, generator=g)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(config))
    return paths


_PEAK_RSS_GROWTH = textwrap.dedent("""
    import json, os, sys, threading, time
    from lag_triton import Library
    from lag_triton.library import build_library

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_growth(fn):
        base, peak, done = rss(), [0], threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.002)
        thread = threading.Thread(target=sample)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], rss()) - base

    out, paths = sys.argv[1], sys.argv[2:]
    build_library(paths[:2], out + ".warm", workers=0, progress=False)  # warm the allocator and imports
    print(json.dumps({
        "small": peak_growth(lambda: build_library(paths[:8], out + ".s", workers=0, progress=False)),
        "large": peak_growth(lambda: build_library(paths, out, workers=0, progress=False)),
        "in_memory": peak_growth(lambda: Library.from_peft(paths, progress=False)),
    }))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_streaming_peak_memory_stays_flat_as_n_grows(tmp_path):
    """Peak resident memory, sampled every 2 ms in a fresh process: in the test process, heap that
    earlier tests freed but the allocator kept would absorb the in-memory build's growth and hide it."""
    paths = _big_adapters(tmp_path / "adapters", 40)
    out = tmp_path / "l.safetensors"
    # a fixed mmap threshold: glibc returns each freed adapter-sized block at once instead of keeping
    # it for reuse by whichever build comes next (the dynamic threshold made the figures flaky)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**17)}
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_GROWTH, str(out), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    growth = {key: value / 2**20 for key, value in json.loads(run.stdout.strip().splitlines()[-1]).items()}
    library_mib = out.stat().st_size / 2**20  # 53 MiB for 40 adapters
    # five times the adapters: the streaming build's peak grows by less than 2 adapters' worth,
    # while building in memory holds the whole library (the test would see a leak of that size)
    assert growth["large"] - growth["small"] < 4, growth
    assert growth["in_memory"] > 0.8 * library_mib, (growth, library_mib)


# -- a killed build, and resuming one ----------------------------------------------------------------------
_KILLED_BUILD = textwrap.dedent("""
    import sys, time
    from lag_triton.library import build, build_library, resume

    resume._SYNC_SECONDS = 0  # journal every adapter at once: the test knows what the journal holds
    real, count = build.align_and_write, [0]
    def slow(target, job, *general):
        real(target, job, *general)
        count[0] += 1
        if count[0] == 3:  # two adapters journaled, the third written but not yet journaled
            print("ready", flush=True)
            time.sleep(60)
    build.align_and_write = slow
    build_library(sys.argv[2:], sys.argv[1], workers=0, progress=False)
""")


@pytest.mark.parametrize("resume", [False, True])
def test_a_killed_build_leaves_the_old_library_intact_and_the_next_build_resumes_or_cleans_up(
    adapters, tmp_path, monkeypatch, resume
):
    out = tmp_path / "lib.safetensors"
    build_library(adapters[:2], out, workers=0, progress=False)
    before = out.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILD, str(out), *map(str, adapters)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        temps = sorted(p.name for p in tmp_path.iterdir() if p.name != out.name)
        # the rows go to a temp file, the adapters written so far to its journal
        assert len(temps) == 2 and temps[0].endswith(".journal.lag-tmp") and temps[1].endswith(".lag-tmp"), temps
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert out.read_bytes() == before
    Library.load(out)
    aligned = count_alignments(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_library(adapters, out, workers=0, progress=False, resume=resume)
    # starting over throws the dead build's work away: the warning says so, and how to keep it
    said = [str(w.message) for w in caught if "starting over" in str(w.message)]
    assert len(said) == (0 if resume else 1) and all("2 of 5 adapters written" in m for m in said)
    # resumed: the two journaled adapters are kept, the third (written, not journaled) is aligned
    # again; not resumed: the dead build's files are removed and every adapter is aligned
    assert aligned == [p.name for p in (adapters[2:] if resume else adapters)]
    assert (report.aligned, report.resumed) == ((3, 2) if resume else (5, 0))
    assert ("2 kept from a killed build" in str(report)) == resume
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert out.read_bytes() == _saved_bytes(adapters, tmp_path / "..", torch.float32)


def test_an_interrupted_build_resumes_with_only_the_missing_or_changed_adapters(adapters, tmp_path, monkeypatch):
    out = tmp_path / "out" / "lib.safetensors"
    out.parent.mkdir()
    expected = _saved_bytes(adapters, tmp_path, torch.bfloat16)

    def interrupted(after: int, **kwargs) -> KeyboardInterrupt:
        count_alignments(monkeypatch, fail_after=after)
        with pytest.raises(KeyboardInterrupt) as caught:
            build_library(adapters, out, dtype=torch.bfloat16, workers=0, progress=False, **kwargs)
        assert not out.exists() and len(list(out.parent.iterdir())) == 2  # temp file and journal kept
        return caught.value

    error = interrupted(3)
    if sys.version_info >= (3, 11):
        assert re.fullmatch(
            r"3 of 5 adapters are written to .*\.lag-tmp; run the same build again with resume=True .*",
            error.__notes__[0],
        )
    # another dtype is another file: nothing is resumed, and the dead build's files are removed
    aligned = count_alignments(monkeypatch)
    assert build_library(adapters, out, workers=0, progress=False, resume=True).resumed == 0
    assert len(aligned) == 5 and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    out.unlink()

    interrupted(3)
    interrupted(1, resume=True)  # a resumed build interrupted again keeps what it carried: 3 + 1
    journal = next(p for p in out.parent.iterdir() if p.name.endswith(".journal.lag-tmp"))
    assert len(journal.read_text().splitlines()) == 4
    with journal.open("a") as f:  # a line torn by a kill mid-write is ignored
        f.write('{"index": 4, "folder": "')
    weights = adapters[1] / "adapter_model.safetensors"  # touched since it was aligned: aligned again
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    aligned = count_alignments(monkeypatch)
    report = build_library(adapters, out, dtype=torch.bfloat16, workers=0, progress=False, resume=True)
    assert aligned == ["a1", "a4"] and (report.aligned, report.resumed) == (2, 3)
    assert out.read_bytes() == expected and sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_resume_on_the_command_line_and_from_peft(adapters, tmp_path, monkeypatch, capsys):
    from lag_triton.__main__ import main

    out = tmp_path / "lib.safetensors"
    count_alignments(monkeypatch, fail_after=2)
    assert main(["build", *map(str, adapters), "-o", str(out), "--workers", "0", "-q"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err
    if sys.version_info >= (3, 11):
        assert "2 of 5 adapters are written to" in err and "(command line: --resume)" in err
    aligned = count_alignments(monkeypatch)
    assert main(["build", *map(str, adapters), "-o", str(out), "--workers", "0", "-q", "--resume"]) == 0
    assert "3 aligned, 2 kept from a killed build" in capsys.readouterr().out and len(aligned) == 3
    assert out.read_bytes() == _saved_bytes(adapters, tmp_path, torch.float32)
    with pytest.raises(ValueError, match="resume=True continues a build into a file: give output="):
        Library.from_peft(adapters, progress=False, resume=True)
    # from_peft(output=, resume=True) with nothing to resume is a plain build
    del aligned[:]
    lib = Library.from_peft(adapters, progress=False, output=tmp_path / "again.safetensors", resume=True)
    assert lib.names == [p.name for p in adapters] and len(aligned) == 5


@pytest.fixture(scope="module")
def interrupted_build(adapters, tmp_path_factory):
    """The files an interrupted bf16 build of ``adapters`` leaves (4 of 5 adapters journaled), by
    name, and the bytes of the complete library."""
    from lag_triton.library import build

    folder = tmp_path_factory.mktemp("interrupted")
    out = folder / "lib.safetensors"
    done = []

    def four_then_interrupt(target, job, *general):
        if len(done) == 4:
            raise KeyboardInterrupt
        _ALIGN_AND_WRITE(target, job, *general)
        done.append(job[0].name)

    build.align_and_write = four_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            build_library(adapters, out, dtype=torch.bfloat16, workers=0, progress=False)
    finally:
        build.align_and_write = _ALIGN_AND_WRITE
    left = {p.name: p.read_bytes() for p in folder.iterdir()}
    scratch = tmp_path_factory.mktemp("scratch") / "lib.safetensors"
    build_library(adapters, scratch, dtype=torch.bfloat16, workers=0, progress=False)
    return left, scratch.read_bytes()


def test_a_journal_torn_anywhere_resumes_to_the_same_bytes(adapters, interrupted_build):
    """A kill can cut the journal at any byte (and a line may be written twice): resuming keeps
    exactly the adapters of its complete lines and gives the bytes of a build from scratch."""
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    left, complete = interrupted_build
    journal_name = next(n for n in left if n.endswith(".journal.lag-tmp"))
    lines = left[journal_name].decode().splitlines(keepends=True)
    assert len(lines) == 4

    @settings(derandomize=True, database=None, deadline=None, max_examples=25)
    @given(cut=st.integers(0, len(left[journal_name])), repeat=st.booleans())
    def resume_after(cut: int, repeat: bool) -> None:
        journal = left[journal_name][:cut]
        if repeat and journal:
            journal = lines[0].encode() + journal
        whole = sum(1 for i in range(1, 5) if len("".join(lines[:i]).encode()) <= cut)  # lines kept whole
        if repeat and journal:
            whole = max(whole, 1)  # the repeated first line is whole (and counts once)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            for name, data in left.items():
                (folder / name).write_bytes(journal if name == journal_name else data)
            report = build_library(
                adapters, folder / "lib.safetensors", dtype=torch.bfloat16, workers=0, progress=False, resume=True
            )
            assert (report.resumed, report.aligned) == (whole, 5 - whole)
            assert (folder / "lib.safetensors").read_bytes() == complete
            assert [p.name for p in folder.iterdir()] == ["lib.safetensors"]

    resume_after()


def test_a_build_that_loses_the_race_for_a_dead_builds_file_starts_over(adapters, interrupted_build, monkeypatch):
    """Two builds resuming at once: the one whose claim (a rename) fails builds from the start."""
    from lag_triton.library import safetensors_io

    left, complete = interrupted_build
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, data in left.items():
            (folder / name).write_bytes(data)

        def claimed_by_another(temp, path):
            os.unlink(temp)  # the other build renamed it away
            raise FileNotFoundError(temp)

        monkeypatch.setattr(safetensors_io, "_claim_temp", claimed_by_another)
        report = build_library(
            adapters, folder / "lib.safetensors", dtype=torch.bfloat16, workers=0, progress=False, resume=True
        )
        assert (report.resumed, report.aligned) == (0, 5)
        assert (folder / "lib.safetensors").read_bytes() == complete


def _interrupted_then_resumed(paths, out, monkeypatch, after: int, mend, **kwargs):
    """Interrupt a build of ``paths`` after ``after`` adapters, ``mend()`` the folders, resume it:
    (the report, the warnings it gave, the folder names it aligned)."""
    count_alignments(monkeypatch, fail_after=after)
    with pytest.raises(KeyboardInterrupt):
        build_library(paths, out, workers=0, progress=False, **kwargs)
    mend()
    aligned = count_alignments(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build_library(paths, out, workers=0, progress=False, resume=True, **kwargs)
    return report, [str(w.message) for w in caught], aligned


def _head(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def test_a_resumed_build_keeps_no_rows_that_moved_to_another_row(tmp_path, monkeypatch):
    """Adapters that trade modules while every module keeps its number of adapters leave the header
    unchanged, but move an unchanged adapter's rows: its kept rows would sit under another adapter's
    id. The dead build's index maps differ from the new plan's, so the build starts over."""
    model = tiny_model("llama")
    targets = [["up_proj"], ["up_proj", "down_proj"], ["down_proj"], ["up_proj"]]
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, r=2, targets=t) for i, t in enumerate(targets)]
    out = tmp_path / "out" / "lib.safetensors"
    out.parent.mkdir()
    heads = []

    def trade_modules():  # a1, journaled and untouched, moves from row 1 to 0 of up_proj, 0 to 1 of down_proj
        heads.append(_head(next(p for p in out.parent.iterdir() if not p.name.endswith(".journal.lag-tmp"))))
        make_adapter(model, paths[0], seed=10, r=2, targets=["down_proj"])
        make_adapter(model, paths[2], seed=12, r=2, targets=["up_proj"])

    report, said, aligned = _interrupted_then_resumed(paths, out, monkeypatch, 3, trade_modules)
    assert (report.aligned, report.resumed) == (4, 0) and aligned == ["a0", "a1", "a2", "a3"]
    build_library(paths, tmp_path / "scratch.safetensors", workers=0, progress=False)
    assert heads == [_head(tmp_path / "scratch.safetensors")]  # the header alone could not tell
    assert len(said) == 1 and "3 of 4 adapters written" in said[0] and "rows cannot be kept" in said[0]
    assert out.read_bytes() == (tmp_path / "scratch.safetensors").read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_a_resumed_build_keeps_no_rows_aligned_against_general_adapters_changed_since(tmp_path, monkeypatch):
    """General adapters retrained in place (same names and shapes) leave the header unchanged; the
    means in the dead build's file differ from the new ones, so its rows are not kept."""
    model = tiny_model("llama")
    tasks = [make_adapter(model, tmp_path / f"t{i}", seed=i, targets=["up_proj"]) for i in range(3)]
    general = [make_adapter(model, tmp_path / "g0", seed=100, targets=["up_proj"])]
    out = tmp_path / "out" / "lib.safetensors"
    out.parent.mkdir()

    def retrain_general():
        make_adapter(model, general[0], seed=200, targets=["up_proj"])

    report, said, aligned = _interrupted_then_resumed(
        tasks, out, monkeypatch, 2, retrain_general, general_adapters=general
    )
    assert (report.aligned, report.resumed) == (3, 0) and len(aligned) == 3
    assert len(said) == 1 and "rows cannot be kept" in said[0]
    build_library(tasks, tmp_path / "scratch.safetensors", workers=0, progress=False, general_adapters=general)
    assert out.read_bytes() == (tmp_path / "scratch.safetensors").read_bytes()


def _save_again_after_reading(monkeypatch, folder: Path, model) -> None:
    """Make every alignment of ``folder`` save it again (other weights) once it has been read: a
    trainer writing checkpoints into a folder the build is reading."""
    from lag_triton.library import build

    def read_then_saved_again(target, job, *general):
        _ALIGN_AND_WRITE(target, job, *general)
        if job[0] == folder:
            make_adapter(model, folder, seed=99, r=2, targets=["up_proj"])
            stat = (folder / "adapter_model.safetensors").stat()  # past the clock's granularity
            os.utime(folder / "adapter_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    monkeypatch.setattr(build, "align_and_write", read_then_saved_again)


def test_the_journal_stamps_an_adapter_as_it_was_before_it_was_read(tmp_path, monkeypatch):
    """An adapter saved again while it was being aligned is journaled with the stamp of the files it
    was read from, so a resumed build aligns its new content instead of keeping the old rows."""
    from lag_triton.library import build

    model = tiny_model("llama")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, r=2, targets=["up_proj"]) for i in range(3)]
    out = tmp_path / "out" / "lib.safetensors"
    out.parent.mkdir()
    _save_again_after_reading(monkeypatch, paths[0], model)
    real = build.align_and_write
    done = []

    def two_then_interrupt(target, job, *general):
        if len(done) == 2:
            raise KeyboardInterrupt
        real(target, job, *general)
        done.append(job[0].name)

    monkeypatch.setattr(build, "align_and_write", two_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_library(paths, out, workers=0, progress=False)
    aligned = count_alignments(monkeypatch)
    report = build_library(paths, out, workers=0, progress=False, resume=True)
    assert aligned == ["a0", "a2"] and (report.aligned, report.resumed) == (2, 1)
    assert out.read_bytes() == _saved_bytes(paths, tmp_path, torch.float32)


def test_a_worker_returns_the_stamp_taken_before_it_read_the_adapter(tmp_path, monkeypatch):
    from lag_triton.library import build
    from lag_triton.library.resume import adapter_stamp

    model = tiny_model("llama")
    folder = make_adapter(model, tmp_path / "a0", seed=0, r=2, targets=["up_proj"])
    paths, plan = build.plan_build([folder], None, torch.float32)
    before = adapter_stamp(folder)
    _save_again_after_reading(monkeypatch, folder, model)
    monkeypatch.setattr(build, "_worker_target", build.RowsToParent(torch.float32))  # as _init_worker sets it
    stamp, rows = build._worker_job(build.jobs_for(plan, paths)[0])
    assert stamp == before != adapter_stamp(folder) and len(rows) == 2


@pytest.mark.parametrize("where", [".", ".."])
def test_a_folder_given_as_dot_or_dot_dot_is_named_by_the_folder_it_leads_to(adapters, tmp_path, monkeypatch, where):
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    for f in adapters[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "inside").mkdir()
    monkeypatch.chdir(folder if where == "." else folder / "inside")
    assert Library.from_peft(where, progress=False).names == ["my-adapter"]
    from lag_triton.library import GeneralKnowledge

    assert GeneralKnowledge.from_peft(where).names == ["my-adapter"]


def test_build_workers_and_their_fork_server_ignore_ctrl_c():
    """Ctrl-C in a terminal signals the whole process group: the fork server (importing torch) and
    the workers printed KeyboardInterrupt tracebacks under the command's one line. They ignore it;
    the building process still handles it (and shuts the pool down)."""
    code = (
        "import multiprocessing, signal\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from lag_triton.library import build\n"
        "build._start_forkserver_ignoring_ctrl_c()\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('forkserver')) as pool:\n"
        "    print(pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "True", (done.stdout, done.stderr[-2000:])


def test_a_long_output_name_builds_and_resumes(adapters, tmp_path, monkeypatch):
    """A temp file's name adds the host's name, a pid, a random tag and suffixes (a journal's too) to
    the output's: a long but valid output name, or a long hostname, passed the filesystem's 255
    bytes and the build failed after planning, naming a temp file. Those temp names are shortened
    with a digest of the output's name and the host's, so a failed build still resumes."""
    monkeypatch.setattr("socket.gethostname", lambda: "pod-" + "h" * 59)
    out = tmp_path / ("L" * 230 + ".safetensors")  # 242 bytes
    bad = _with_a_nan(adapters[0], tmp_path / "bad")
    with pytest.raises(AdapterError, match="non-finite values"):
        build_library([*adapters, bad], out, workers=0, progress=False)
    kept = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(kept) == 2 and all(len(name.encode()) <= 255 for name in kept), kept  # temp + journal
    (bad / "adapter_model.safetensors").write_bytes((adapters[0] / "adapter_model.safetensors").read_bytes())
    report = build_library([*adapters, bad], out, workers=0, progress=False, resume=True)
    assert (report.aligned, report.resumed) == (1, len(adapters))
    assert Library.load(out).names == [*(a.name for a in adapters), "bad"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["bad", out.name])

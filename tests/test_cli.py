"""``python -m lag_triton build / info / demo``: output, and one line per error with the documented exit code."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lag_triton import Library
from lag_triton.__main__ import EXIT_FAILED, EXIT_USAGE, main

from factories import make_adapter, tiny_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = tiny_model("llama")
    return [make_adapter(model, tmp / f"doc{i}", seed=i, r=2 + i) for i in range(3)]


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


def test_build_then_info(adapters, tmp_path, capsys):
    out = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, adapters), "-o", str(out), "--dtype", "bfloat16", "-q"]) == 0
    lib = Library.load(out)
    assert lib.names == ["doc0", "doc1", "doc2"] and lib.dtype == torch.bfloat16
    capsys.readouterr()
    assert main(["info", str(out), "--adapters"]) == 0
    text = capsys.readouterr().out
    assert "adapters    3  (r_max 4, dtype bfloat16)" in text
    assert f"size        {lib.nbytes:,} bytes" in text
    assert "model.layers.1.mlp.up_proj: 3 adapters, 48 -> 80, ranks [2, 3, 4]" in text
    assert "2: doc2" in text


def test_info_gives_an_moe_layers_experts_one_line(tmp_path, capsys):
    """An all-linear library of an MoE model has a module per (layer, parameter, expert): 12k for a
    Qwen3-30B-sized model. info lists a run of equal experts on one line, layers in natural order."""
    model = tiny_model("qwen3_moe")
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip("this transformers keeps the experts as nn.Linear (one module per expert and projection)")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe", r=2) for i in range(2)]
    assert main(["build", *map(str, paths), "-o", str(tmp_path / "lib.safetensors"), "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "lib.safetensors")]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  model.")]
    experts = [line.partition(", ranks")[0] for line in lines if ".experts." in line]
    assert experts == [
        f"model.layers.{layer}.mlp.experts.{p}.{{0..3}}: 4 modules of 2 adapters, {shape}"
        for layer in (0, 1)
        for p, shape in (("down_proj", "32 -> 64"), ("gate_up_proj", "64 -> 64"))
    ]
    assert lines.index(next(x for x in lines if "layers.1." in x)) > max(
        i for i, x in enumerate(lines) if "layers.0." in x
    )


def test_info_groups_only_equal_consecutive_numbered_modules():
    from lag_triton.__main__ import _module_lines

    modules = {f"m.layers.{layer}.experts.w.{e}": [3, 8, 4, {2}, 100] for layer in (2, 10) for e in range(6)}
    modules["m.layers.2.experts.w.3"] = [2, 8, 4, {2}, 50]  # an expert fewer adapters reach
    modules["m.layers.10.q"] = [3, 8, 8, {1, 2}, 2048]
    del modules["m.layers.10.experts.w.4"]
    assert _module_lines(modules) == [
        "m.layers.2.experts.w.{0..2}: 3 modules of 3 adapters, 8 -> 4, ranks [2], 300 B in all",
        "m.layers.2.experts.w.3: 2 adapters, 8 -> 4, ranks [2], 50 B",
        "m.layers.2.experts.w.{4..5}: 2 modules of 3 adapters, 8 -> 4, ranks [2], 200 B in all",
        "m.layers.10.experts.w.{0..3}: 4 modules of 3 adapters, 8 -> 4, ranks [2], 400 B in all",
        "m.layers.10.experts.w.5: 3 adapters, 8 -> 4, ranks [2], 100 B",
        "m.layers.10.q: 3 adapters, 8 -> 8, ranks [1, 2], 2.0 KiB",
    ]


def test_failed_work_exits_1_with_one_line(adapters, tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == EXIT_FAILED
    _one_line_error(capsys, "missing.safetensors", "does not exist")
    assert main(["build", str(tmp_path), "-o", str(tmp_path / "x"), "-q"]) == EXIT_FAILED
    _one_line_error(capsys, "has no adapter_config.json", str(tmp_path))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00[1, 2, 3]       ")
    assert main(["info", str(bad)]) == EXIT_FAILED
    _one_line_error(capsys, str(bad), "JSON list")


def _fail_if_aligning(monkeypatch):
    from lag_triton.library import build

    def boom(*args, **kwargs):
        raise AssertionError("adapters were read before the output path was checked")

    monkeypatch.setattr(Library, "from_peft", boom)
    monkeypatch.setattr(build, "plan_adapters", boom)


@pytest.mark.parametrize("case", ["missing_folder", "directory", "under_a_file", "read_only"])
def test_build_checks_the_output_path_before_any_work(adapters, tmp_path, capsys, monkeypatch, case):
    target = {
        "missing_folder": tmp_path / "nope" / "lib.safetensors",
        "directory": tmp_path,
        "under_a_file": tmp_path / "file" / "lib.safetensors",
        "read_only": tmp_path / "ro" / "lib.safetensors",
    }[case]
    (tmp_path / "file").write_text("x")
    (tmp_path / "ro").mkdir()
    real_open = os.open

    def read_only_open(path, flags, *args, **kwargs):  # tests run as root, where chmod cannot deny writes
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    _fail_if_aligning(monkeypatch)
    assert main(["build", *map(str, adapters), "-o", str(target), "-q"]) == EXIT_USAGE
    needle = {
        "missing_folder": "does not exist",
        "directory": "is a directory",
        "under_a_file": "is not a folder",
        "read_only": "Read-only file system",
    }[case]
    _one_line_error(capsys, str(target), needle)
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == []


def test_names_count_is_a_usage_error(adapters, tmp_path, capsys, monkeypatch):
    _fail_if_aligning(monkeypatch)
    assert main(["build", *map(str, adapters), "--names", "a", "-o", str(tmp_path / "l"), "-q"]) == EXIT_USAGE
    _one_line_error(capsys, "--names gives 1 names for 3 adapter folders")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--adapters", "0"], "--adapters must be >= 1, got 0"),
        (["--adapters", "-3"], "--adapters must be >= 1, got -3"),
        (["--hidden", "30"], "--hidden must be a positive multiple of 8"),
        (["--hidden", "12"], "--hidden must be a positive multiple of 8"),  # rotary needs an even head size
        (["--adapters", "2769"], "--adapters must be <= 2768"),  # the data's entity names run out (it hung)
        (["--adapters", "3000", "--general-adapters", "1"], "--adapters must be <= 2768"),
        (["--seed", "-1"], "--seed must be >= 0"),  # random.Random(-1) draws seed 1's data
        (["--backend", "cuda"], "--backend cuda cannot run on --device cpu"),
        (["--out", "{json_is_a_folder}"], "'lag_demo.json' there is a folder"),
        (["--out", "/proc/lag_triton_demo"], "cannot write there"),
        (["--ks", "1,x"], "--ks must be comma-separated integers"),
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--lr-a-ratio", "-0.5"], "--lr-a-ratio must be a finite number >= 0, got -0.5"),
        (["--lr-a-ratio", "nan"], "--lr-a-ratio must be a finite number >= 0, got nan"),
        (["--backend", "gpu"], "--backend must be one of"),
        (["--device", "foo"], "--device 'foo' is not a torch device"),
        (["--device", "meta"], "--device meta: meta tensors hold no values"),  # failed after work began
        pytest.param(
            ["--device", "cuda"],
            "CPU-only build",
            marks=pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch"),
        ),
        (["--out", "{file}"], "exists and is not a folder"),
        (["--general-adapters", "-1"], "--general-adapters must be >= 0 (0: none), got -1"),
        (["--general-adapters", "33"], "--general-adapters 33 is too many: 33 general adapters x 3 entities need 99"),
        (["--stem", "sub/name"], "--stem must be a plain file name"),
        (["--stem", ".."], "--stem must be a plain file name"),
        (["--stem", ""], "--stem must be a plain file name"),
    ],
)
def test_demo_usage_errors_exit_2_before_any_work(tmp_path, capsys, monkeypatch, args, needle):
    from lag_triton import demo

    monkeypatch.setattr(demo, "run", lambda a: pytest.fail("the demo ran"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "out" / "lag_demo.json").mkdir(parents=True)
    args = [a.format(file=tmp_path / "file", json_is_a_folder=tmp_path / "out") for a in args]
    assert main(["demo", *args]) == EXIT_USAGE
    _one_line_error(capsys, needle)


@pytest.mark.parametrize(
    "argv,want",
    [
        (["/venv/bin/lag-triton", "demo", "--adapters", "8"], "lag-triton demo --adapters 8"),
        (["/x/lag_triton/__main__.py", "demo", "--seed", "2"], "python -m lag_triton demo --seed 2"),
        (["/usr/bin/pytest", "-q"], "python -m lag_triton demo"),  # called from Python: the plain command
    ],
)
def test_the_demo_records_how_it_was_started(monkeypatch, argv, want):
    """The results JSON's command: the console script's line was recorded as the plain demo, its options lost."""
    from lag_triton import demo

    monkeypatch.setattr(sys, "argv", argv)
    assert demo._command_line() == want


@pytest.mark.parametrize("module", ["peft", "matplotlib"])
def test_demo_without_its_extra_says_what_to_install_before_any_work(module, capsys, monkeypatch):
    """Without the [demo] extra the demo printed its first lines, trained, then failed importing peft."""
    import importlib.util

    from lag_triton import demo

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    monkeypatch.setattr(demo, "run", lambda a: pytest.fail("the demo ran"))
    assert main(["demo"]) == EXIT_USAGE
    _one_line_error(capsys, f"the demo needs {module}")


def test_demo_accepts_as_many_general_adapters_as_the_data_provides(tmp_path, monkeypatch):
    """The bound --general-adapters is checked against is the data generator's own (32 by default:
    96 pre-training entities, 3 per general document), not a stricter one."""
    from lag_triton import demo

    ran = []
    monkeypatch.setattr(demo, "run", lambda a: ran.append((a.general_adapters, a.stem)) or 0)
    assert main(["demo", "--general-adapters", "32", "--stem", "run.v2", "--out", str(tmp_path)]) == 0
    assert ran == [(32, "run.v2")]


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build", "-q"])
    assert info.value.code == EXIT_USAGE


def test_options_may_come_between_positional_arguments(adapters, tmp_path):
    """argparse alone stops filling a positional list at the first option: `build A -o X B` and
    `remove LIB --names-from F NAME` would fail with "unrecognized arguments"."""
    lib, scratch = tmp_path / "lib.safetensors", tmp_path / "scratch.safetensors"
    assert main(["build", str(adapters[0]), "-o", str(scratch), "-q", str(adapters[1]), str(adapters[2])]) == 0
    assert main(["build", *map(str, adapters), "-o", str(lib), "-q"]) == 0
    assert lib.read_bytes() == scratch.read_bytes()
    (tmp_path / "drop.txt").write_text("doc1\n")
    assert main(["remove", str(lib), "--names-from", str(tmp_path / "drop.txt"), "doc0"]) == 0
    assert Library.load(lib).names == ["doc2"]
    assert main(["--debug", "add", str(lib), "--workers", "0", str(adapters[0]), "-q"]) == 0
    assert Library.load(lib).names == ["doc2", "doc0"]


def test_unexpected_exceptions_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    from lag_triton.library import stored

    def crash(path):
        raise KeyError("names")

    monkeypatch.setattr(stored, "read_stored", crash)
    (tmp_path / "x").write_text("x")
    assert main(["info", str(tmp_path / "x")]) == EXIT_FAILED
    _one_line_error(capsys, "KeyError: 'names'", "--debug")
    assert main(["info", str(tmp_path / "x"), "--debug"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert main(["--debug", "info", str(tmp_path / "x")]) == EXIT_FAILED
    assert "Traceback" in capsys.readouterr().err


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path, capsys, monkeypatch):
    """`lag_triton info LIB --adapters | head`: the pipe closes under a print; exit as SIGPIPE
    would (141) with no error line, instead of "error: [Errno 32] Broken pipe"."""
    import lag_triton.__main__ as cli

    def write_to_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_info", write_to_a_closed_pipe)
    with open(tmp_path / "stdout", "w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert main(["info", str(tmp_path / "x")]) == cli.EXIT_BROKEN_PIPE == 141
    assert capsys.readouterr().err == ""


def test_a_closed_pipe_ends_a_block_buffered_command_quietly(adapters, tmp_path):
    """`info --adapters | head` with Python's default block-buffered stdout (no PYTHONUNBUFFERED): the
    output was written at interpreter exit, outside main, which printed "Exception ignored ...
    BrokenPipeError" and exited 120. The reader here is gone before the command writes anything."""
    lib = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, adapters), "-o", str(lib), "-q"]) == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "lag_triton", "info", str(lib), "--adapters"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (run.returncode, run.stderr) == (141, "")


def test_module_entry_point_exit_codes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lag_triton", "--help"], capture_output=True, text=True, check=True)
    assert "build" in out.stdout and "demo" in out.stdout
    run = subprocess.run([sys.executable, "-m", "lag_triton", "info", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == EXIT_FAILED and run.stderr.count("\n") == 1 and "is a directory" in run.stderr


# -- add / remove / info sizes (issue 13) ------------------------------------------------------------
def test_build_add_remove_info_sizes(adapters, tmp_path, capsys):
    lib, scratch = tmp_path / "lib.safetensors", tmp_path / "scratch.safetensors"
    assert main(["build", *map(str, adapters), "-o", str(scratch), "--workers", "0", "-q"]) == 0
    assert main(["build", str(adapters[0]), "-o", str(lib), "-q"]) == 0
    assert main(["add", str(lib), *map(str, adapters[1:]), "-q"]) == 0
    assert "3 adapters" in capsys.readouterr().out
    assert lib.read_bytes() == scratch.read_bytes()
    assert main(["info", str(lib), "--check"]) == 0
    text = capsys.readouterr().out
    up = Library.load(lib).modules["model.layers.1.mlp.up_proj"]
    size = sum(getattr(up, f).nbytes for f in ("a_star", "b_star", "prototypes", "adapter_ids", "ranks"))
    assert f"model.layers.1.mlp.up_proj: 3 adapters, 48 -> 80, ranks [2, 3, 4], {size / 1024:.1f} KiB" in text
    assert "values      checked" in text
    assert main(["remove", str(lib), "doc1", "-o", str(tmp_path / "small.safetensors")]) == 0
    assert Library.load(tmp_path / "small.safetensors").names == ["doc0", "doc2"]
    assert main(["info", str(tmp_path / "small.safetensors")]) == 0
    assert "factors not read (--check reads them all)" in capsys.readouterr().out


def test_add_and_remove_errors_are_one_line(adapters, tmp_path, capsys, monkeypatch):
    lib = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, adapters[:2]), "-o", str(lib), "-q"]) == 0
    before = lib.read_bytes()
    capsys.readouterr()
    assert main(["add", str(lib), str(adapters[1]), "-q"]) == EXIT_FAILED
    _one_line_error(capsys, "already has adapters named ['doc1']")
    assert main(["remove", str(lib), "doc7"]) == EXIT_FAILED
    _one_line_error(capsys, "has no adapters named ['doc7']")
    _fail_if_aligning(monkeypatch)
    assert main(["add", str(lib), str(adapters[2]), "--names", "a", "b", "-q"]) == EXIT_USAGE
    _one_line_error(capsys, "--names gives 2 names for 1 adapter folders")
    assert main(["build", str(adapters[2]), "-o", str(tmp_path / "x"), "--workers", "-1", "-q"]) == EXIT_USAGE
    _one_line_error(capsys, "--workers must be >= 0")
    assert main(["add", str(lib), str(adapters[2]), "-o", str(tmp_path / "no" / "x"), "-q"]) == EXIT_USAGE
    _one_line_error(capsys, "does not exist")
    assert lib.read_bytes() == before


def test_adapter_and_name_lists_from_files(adapters, tmp_path, capsys, monkeypatch):
    """--adapters-from / --names-from: for more adapters than a command line holds."""
    import io

    scratch, lib = tmp_path / "scratch.safetensors", tmp_path / "lib.safetensors"
    assert main(["build", *map(str, adapters), "-o", str(scratch), "-q", "--names", "x", "y", "z"]) == 0
    listed = tmp_path / "adapters.txt"
    listed.write_text(f"# one per line\n{adapters[0]}\tx\n\n  {adapters[1]}\ty  \n{adapters[2]}\tz\n")
    assert main(["build", "--adapters-from", str(listed), "-o", str(lib), "-q"]) == 0
    assert lib.read_bytes() == scratch.read_bytes()
    # without names, after the command line's adapters; '-' reads standard input
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{adapters[1]}\n{adapters[2]}\n"))
    assert main(["build", str(adapters[0]), "--adapters-from", "-", "-o", str(lib), "-q"]) == 0
    assert Library.load(lib).names == ["doc0", "doc1", "doc2"]
    (tmp_path / "drop.txt").write_text("doc1\n# keep doc2\n")
    assert main(["remove", str(lib), "doc0", "--names-from", str(tmp_path / "drop.txt")]) == 0
    assert Library.load(lib).names == ["doc2"]
    (tmp_path / "more.txt").write_text(f"{adapters[0]}\n{adapters[1]}\n")
    assert main(["add", str(lib), "--adapters-from", str(tmp_path / "more.txt"), "-q"]) == 0
    assert Library.load(lib).names == ["doc2", "doc0", "doc1"]
    capsys.readouterr()

    _fail_if_aligning(monkeypatch)
    out = ["-o", str(tmp_path / "never.safetensors"), "-q"]
    for text, needle in [
        (
            f"{adapters[0]}\tx\n{adapters[1]}\n",
            "names adapters (line 1): then every line must name its adapter (line 2",
        ),
        (f"{adapters[0]}\tx\ty\n", "line 1: expected a folder or Hub path, optionally a tab and the adapter's name"),
        (f"{adapters[0]}\t\n", "line 1: expected a folder or Hub path"),
        (f"\t{adapters[0]}\n", "line 1: expected a folder or Hub path"),
        ("# nothing\n\n", "no adapters: give PEFT folders (or Hub paths), or --adapters-from FILE"),
    ]:
        listed.write_text(text)
        assert main(["build", "--adapters-from", str(listed), *out]) == EXIT_USAGE
        _one_line_error(capsys, needle)
    listed.write_text(f"{adapters[0]}\tx\n")
    assert main(["build", str(adapters[1]), "--adapters-from", str(listed), *out]) == EXIT_USAGE
    _one_line_error(capsys, "no adapter or --names may come from the command line")
    assert main(["build", "--adapters-from", str(tmp_path / "missing.txt"), *out]) == EXIT_USAGE
    _one_line_error(capsys, "--adapters-from", "missing.txt", "No such file or directory")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    assert main(["build", "--adapters-from", str(tmp_path / "binary.txt"), *out]) == EXIT_USAGE
    _one_line_error(capsys, "is not UTF-8 text")
    assert main(["remove", str(lib)]) == EXIT_USAGE
    _one_line_error(capsys, "no adapters to remove: give their names, or --names-from FILE")
    assert not (tmp_path / "never.safetensors").exists()


def test_list_files_split_at_newlines_only_and_skip_a_byte_order_mark(adapters, tmp_path):
    """A list file from a Windows editor (a UTF-8 byte order mark, CRLF) and folder names holding
    characters str.splitlines() breaks at (U+2028, form feed, U+0085): each line is one folder."""
    import shutil

    odd = tmp_path / "doc\u2028v2\x0cx\x85"
    shutil.copytree(adapters[1], odd)
    listed = tmp_path / "adapters.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + f"{adapters[0]}\r\n{odd}\r\n".encode())
    lib = tmp_path / "lib.safetensors"
    assert main(["build", "--adapters-from", str(listed), "-o", str(lib), "-q"]) == 0
    assert Library.load(lib).names == ["doc0", odd.name]
    (tmp_path / "drop.txt").write_bytes(b"\xef\xbb\xbf" + f"{odd.name}\r\n".encode())
    assert main(["remove", str(lib), "--names-from", str(tmp_path / "drop.txt")]) == 0
    assert Library.load(lib).names == ["doc0"]


def test_standard_input_lists_closed_or_not_utf8_are_usage_errors(adapters, tmp_path, capsys, monkeypatch):
    """`--names-from -` with standard input closed (`<&-`: sys.stdin is None) raised AttributeError;
    bytes that are not UTF-8 were decoded with the locale's error handler instead of refused."""
    import io

    lib = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, adapters[:2]), "-o", str(lib), "-q"]) == 0
    before = lib.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["remove", str(lib), "--names-from", "-"]) == EXIT_USAGE
    _one_line_error(capsys, "--names-from '-': standard input is closed")
    for command in (["remove", str(lib), "--names-from", "-"], ["add", str(lib), "--adapters-from", "-", "-q"]):
        stdin = io.TextIOWrapper(io.BytesIO(b"doc0\n\xff\n"), encoding="utf-8", errors="surrogateescape")
        monkeypatch.setattr(sys, "stdin", stdin)
        assert main(command) == EXIT_USAGE
        _one_line_error(capsys, "'-' is not UTF-8 text")
    assert lib.read_bytes() == before


def test_repeated_names_and_a_folder_as_library_are_named_as_given(adapters, tmp_path, capsys, monkeypatch):
    lib = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, adapters[:2]), "-o", str(lib), "-q"]) == 0
    before = lib.read_bytes()
    capsys.readouterr()
    _fail_if_aligning(monkeypatch)
    assert main(["remove", str(lib), "doc0", "doc0"]) == EXIT_USAGE
    _one_line_error(capsys, "the names of the adapters to remove repeat: ['doc0']")
    out = ["-o", str(tmp_path / "never.safetensors"), "-q"]
    assert main(["build", *map(str, adapters[:2]), "--names", "a", "a", *out]) == EXIT_USAGE
    _one_line_error(capsys, "--names gives the same name to several adapters: ['a']")
    listed = tmp_path / "adapters.txt"
    listed.write_text(f"{adapters[0]}\tx\n{adapters[1]}\tx\n")
    assert main(["build", "--adapters-from", str(listed), *out]) == EXIT_USAGE
    _one_line_error(capsys, "adapters.txt' gives the same name to several adapters: ['x']")
    # the library argument is a folder and no -o: the error is the library's, as `info` gives it
    assert main(["add", str(adapters[0]), str(adapters[1]), "-q"]) == EXIT_FAILED
    line = _one_line_error(capsys, str(adapters[0]), "is a directory, not a library file")
    assert "-o/--output" not in line
    assert main(["remove", str(tmp_path), "doc0"]) == EXIT_FAILED
    _one_line_error(capsys, "is a directory, not a library file")
    assert lib.read_bytes() == before and not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("case", ["weights", "config", "general", "list_file", "add", "add_in_place", "compact"])
def test_an_output_that_is_an_input_is_a_usage_error(adapters, tmp_path, capsys, monkeypatch, case):
    import shutil

    a0, a1 = (shutil.copytree(a, tmp_path / a.name) for a in adapters[:2])
    listed = tmp_path / "list.txt"
    listed.write_text(f"{a1}\n")
    lib = tmp_path / "lib.safetensors"
    assert main(["build", str(a1), "-o", str(lib), "-q"]) == 0
    if case == "compact":
        folder = tmp_path / "folder"
        assert main(["assemble", str(folder), str(lib)]) == 0
        part = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
        part.unlink()
        part.symlink_to(lib)  # a part linked to a file outside the folder
    saved = {f: f.read_bytes() for d in (a0, a1) for f in d.iterdir()} | {lib: lib.read_bytes()}
    weights, config = str(a0 / "adapter_model.safetensors"), str(a0 / "adapter_config.json")
    argv, hit = {
        "weights": (["build", str(a0), str(a1), "-o", weights], weights),
        "config": (["build", str(a0), "-o", config], config),
        "general": (["build", str(a1), "-o", weights, "--general", str(a0)], weights),
        "list_file": (["build", "--adapters-from", str(listed), "-o", str(listed)], str(listed)),
        "add": (["add", str(lib), str(a0), "-o", weights], weights),
        "add_in_place": (["add", weights, str(a0)], weights),
        "compact": (["compact", str(tmp_path / "folder"), "-o", str(lib)], None),
    }[case]
    saved[listed] = listed.read_bytes()
    _fail_if_aligning(monkeypatch)
    capsys.readouterr()
    assert main([*argv, "-q"] if case != "compact" else argv) == EXIT_USAGE
    _one_line_error(capsys, "would overwrite the input", *([hit] if hit else []))
    assert all(f.read_bytes() == data for f, data in saved.items())


def test_info_on_something_that_is_not_a_regular_file(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (os.devnull, str(fifo)):
        assert main(["info", path]) == EXIT_FAILED
        _one_line_error(capsys, path, "is not a regular file")


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_name_in_names_is_a_usage_error(adapters, tmp_path, capsys, monkeypatch, blank):
    _fail_if_aligning(monkeypatch)
    argv = ["build", *map(str, adapters[:2]), "-o", str(tmp_path / "x"), "--names", blank, "n2", "-q"]
    assert main(argv) == EXIT_USAGE
    _one_line_error(capsys, "--names", "is empty")


@pytest.mark.parametrize("command", ["build", "assemble"])
def test_a_non_empty_folder_that_is_no_library_folder_is_a_usage_error(
    adapters, tmp_path, capsys, monkeypatch, command
):
    lib = tmp_path / "lib.safetensors"
    assert main(["build", str(adapters[0]), "-o", str(lib), "-q"]) == 0
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    _fail_if_aligning(monkeypatch)
    capsys.readouterr()
    argv = {
        "build": ["build", str(adapters[1]), "--folder", "-o", str(folder), "-q"],
        "assemble": ["assemble", str(folder), str(lib)],
    }[command]
    assert main(argv) == EXIT_USAGE
    _one_line_error(capsys, str(folder), "not empty and not a library folder")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_folders_of_one_name_are_a_usage_error(adapters, tmp_path, capsys, monkeypatch):
    """Adapters are named by their folders: two folders of one name (checkpoints of two runs) are a
    command-line problem like a name repeated in --names (exit 2, before any work), not a failure."""
    for run in ("r1", "r2"):
        shutil.copytree(adapters[0], tmp_path / run / "ckpt-500")
    _fail_if_aligning(monkeypatch)
    argv = ["build", str(tmp_path / "r1" / "ckpt-500"), str(tmp_path / "r2" / "ckpt-500"), "-o", str(tmp_path / "x")]
    assert main([*argv, "-q"]) == EXIT_USAGE
    _one_line_error(capsys, "2 folders are named 'ckpt-500'", "--names")
    monkeypatch.undo()  # aligning allowed again
    assert main([*argv, "-q", "--names", "a", "b"]) == 0


def test_a_folder_build_that_failed_is_resumed_or_rerun_from_the_command_line(adapters, tmp_path, capsys, monkeypatch):
    """A first ``build --folder`` that fails leaves the lock and its kept temp file and journal (no
    library.json): ``--resume``, which its message recommends, and a plain rerun take that folder;
    a file of anything else in it still makes it another folder."""
    from factories import count_alignments

    folder = tmp_path / "lib"
    argv = ["build", *map(str, adapters), "-o", str(folder), "--folder", "--workers", "0", "-q"]
    count_alignments(monkeypatch, fail_after=2)
    assert main(argv) == 130 and "--resume" in capsys.readouterr().err
    assert not (folder / "library.json").exists() and {p.name for p in folder.iterdir()} >= {".lock"}
    (folder / "notes.txt").write_text("mine")
    assert main([*argv, "--resume"]) == EXIT_USAGE
    _one_line_error(capsys, str(folder), "not empty and not a library folder")
    (folder / "notes.txt").unlink()
    aligned = count_alignments(monkeypatch)
    assert main([*argv, "--resume"]) == 0 and aligned == ["doc2"]
    assert Library.load(folder).names == ["doc0", "doc1", "doc2"]
    assert main(argv) == 0 and Library.load(folder).names == ["doc0", "doc1", "doc2"]

"""Library files: atomic, deterministic saves and a precise error for every damaged file (issue 11, items 3, 8, 9)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

import lag_triton
from lag_triton import Library, LibraryFormatError, ModuleWeights
from lag_triton.library import safetensors_io

from factories import library_info, make_adapter, read_raw, replace_tensor, set_library_info, tiny_model, write_raw

UP = "model.layers.0.mlp.up_proj"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lib")
    model = tiny_model("llama")
    return Library.from_peft(
        [make_adapter(model, tmp / f"a{i}", seed=i, r=2 + i, targets=["up_proj", "v_proj"]) for i in range(3)],
        progress=False,
    )


@pytest.fixture
def saved(library, tmp_path):
    path = tmp_path / "lib.safetensors"
    library.save(path)
    return path


def _assert_equal(a: Library, b: Library) -> None:
    assert a.names == b.names and a.base_model == b.base_model and list(a.modules) == list(b.modules)
    for name, m in a.modules.items():
        for f in ("a_star", "b_star", "prototypes", "adapter_ids", "ranks"):
            x, y = getattr(m, f), getattr(b.modules[name], f)
            assert x.dtype == y.dtype and torch.equal(x, y), (name, f)


# -- 3. saving -----------------------------------------------------------------------------------------
def test_equal_libraries_save_to_equal_bytes(library, tmp_path):
    library.save(tmp_path / "one")
    library.save(tmp_path / "two")
    reordered = Library(
        list(library.names), dict(reversed(list(library.modules.items()))), base_model=library.base_model
    )
    reordered.save(tmp_path / "three")
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes() == (tmp_path / "three").read_bytes()
    Library.load(tmp_path / "one").save(tmp_path / "four")  # a loaded (memory-mapped) library too
    assert (tmp_path / "four").read_bytes() == (tmp_path / "one").read_bytes()


def test_saved_file_is_standard_safetensors(library, saved):
    with safe_open(str(saved), framework="pt") as f:
        assert f.metadata()["format"] == "lag_triton.library"
        for name, m in library.modules.items():
            for field in ("a_star", "b_star", "prototypes", "adapter_ids", "ranks"):
                assert torch.equal(f.get_tensor(f"{name}::{field}"), getattr(m, field))
    _assert_equal(Library.load(saved), library)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp(library, saved, monkeypatch, error):
    before = saved.read_bytes()
    calls = []

    def fail_on_second(fh, t):
        calls.append(1)
        if len(calls) == 2:
            raise error
        fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    monkeypatch.setattr(safetensors_io, "_write_tensor", fail_on_second)
    other = library.to(dtype=torch.float16)
    with pytest.raises(type(error)):
        other.save(saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


_KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    import torch
    from lag_triton import Library
    from lag_triton.library import safetensors_io as sio

    lib = Library.load(sys.argv[1]).to(dtype=torch.float16)
    point = sys.argv[3]
    if point == "mid-write":
        real = sio._write_tensor
        state = {"n": 0}
        def slow(fh, t):
            real(fh, t)
            state["n"] += 1
            if state["n"] == 2:
                fh.flush()
                print("ready", flush=True)
                time.sleep(60)
        sio._write_tensor = slow
    else:
        def slow_replace(src, dst):
            print("ready", flush=True)
            time.sleep(60)
        sio.os.replace = slow_replace
    lib.save(sys.argv[2])
""")


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_save_killed_with_sigkill_leaves_the_old_library_intact(saved, tmp_path, point):
    before = saved.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVE, str(saved), str(saved), point], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        temps = [p for p in saved.parent.iterdir() if p.name != saved.name]
        assert len(temps) == 1 and temps[0].stat().st_size > 0  # the new data went to a temp file
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert saved.read_bytes() == before
    Library.load(saved)
    # the next save to the same path removes the dead process's temp file
    Library.load(saved).save(saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    assert saved.read_bytes() == before


@pytest.mark.parametrize(
    "target,error,needle",
    [
        ("missing/lib.safetensors", FileNotFoundError, "does not exist"),
        (".", IsADirectoryError, "is a directory"),
    ],
)
def test_save_to_an_impossible_path_names_it(library, tmp_path, target, error, needle):
    with pytest.raises(error, match=needle) as info:
        library.save(tmp_path / target)
    assert str(tmp_path) in str(info.value)


# -- 8 / 9. load checks everything it uses ------------------------------------------------------------------
def _entry(header, field, module=UP):
    return header[f"{module}::{field}"]


def _mutate_info(**changes):
    def mutate(header, data):
        info = library_info(header)
        for k, v in changes.items():
            if v is _DROP:
                info.pop(k)
            else:
                info[k] = v
        return set_library_info(header, info), data

    return mutate


_DROP = object()


def _set_ids(values, dtype="I64", field="adapter_ids"):
    def mutate(header, data):
        t = torch.tensor(values, dtype={"I64": torch.int64, "F64": torch.float64}[dtype])
        return replace_tensor(header, data, f"{UP}::{field}", t.numpy().tobytes(), dtype=dtype, shape=[len(values)])

    return mutate


def _nan_factor(header, data):
    e = _entry(header, "b_star")
    begin = e["data_offsets"][0]
    data = bytearray(data)
    data[begin : begin + 4] = torch.tensor([float("nan")], dtype=torch.float32).numpy().tobytes()
    return header, bytes(data)


def _overlap(header, data):
    a, b = _entry(header, "prototypes"), _entry(header, "prototypes", "model.layers.1.mlp.up_proj")
    b["data_offsets"] = list(a["data_offsets"])
    return header, data


def _set_entry(field, **changes):
    def mutate(header, data):
        e = _entry(header, field)
        for k, v in changes.items():
            if v is _DROP:
                e.pop(k)
            else:
                e[k] = v(e) if callable(v) else v
        return header, data

    return mutate


def _set_meta(**changes):
    def mutate(header, data):
        for k, v in changes.items():
            if v is _DROP:
                header["__metadata__"].pop(k)
            else:
                header["__metadata__"][k] = v
        return header, data

    return mutate


def _whole_header(value):
    return lambda header, data: (value, data)


CORRUPTIONS = {
    # item 8: contents the loader used to trust
    "negative id": (_set_ids([0, 1, -1]), "adapter_ids holds -1, outside [0, 3)"),
    "id past names": (_set_ids([0, 1, 3]), "adapter_ids holds 3, outside [0, 3)"),
    "repeated id": (_set_ids([0, 1, 1]), "adapter_ids repeats an adapter"),
    "F64 ids": (_set_ids([0.0, 1.0, 2.0], "F64"), "tensor 'adapter_ids' has dtype F64"),
    "short names": (_mutate_info(names=["a0", "a1"]), "adapter_ids holds 2, outside [0, 2)"),
    "empty names": (_mutate_info(names=[]), "adapter_ids holds 0, outside [0, 0)"),
    "string names": (_mutate_info(names="a0a1a2"), "'names': adapter names must be a list of strings, got str"),
    "repeated names": (_mutate_info(names=["a", "b", "a"]), "'names': adapter names must be unique"),
    "number names": (_mutate_info(names=["a", 1, "c"]), "'names': adapter names must be strings"),
    "rank past int32": (_set_ids([2, 3, 2**32 + 2], field="ranks"), "ranks must lie in [1, r=4]"),
    "overlapping offsets": (_overlap, "overlap"),
    "appended bytes": (lambda header, data: (header, data + b"\0" * 8), "8 data bytes after the last tensor"),
    "tensor entry removed": (
        lambda header, data: (header, data) if header.pop(f"{UP}::a_star") else None,
        "belong to no tensor",
    ),
    "NaN factor": (_nan_factor, "b_star holds NaN or inf"),
    # item 9: malformed headers
    "no data_offsets": (_set_entry("a_star", data_offsets=_DROP), "header entry has no 'data_offsets'"),
    "no dtype": (_set_entry("a_star", dtype=_DROP), "header entry has no 'dtype'"),
    "F32 relabelled F16": (_set_entry("b_star", dtype="F16"), "needs"),
    "shape lie": (_set_entry("a_star", shape=lambda e: [e["shape"][0], e["shape"][1], e["shape"][2] + 1]), "needs"),
    "2-D a_star": (
        _set_entry("a_star", shape=lambda e: [e["shape"][0] * e["shape"][1], e["shape"][2]]),
        "a_star must be [N, r, d_in]",
    ),
    "I32 factor": (_set_entry("prototypes", dtype="I32"), "tensor 'prototypes' has dtype I32"),
    "bad offsets": (_set_entry("ranks", data_offsets=[5]), "'data_offsets' must be [begin, end]"),
    "no library": (_set_meta(library=_DROP), "metadata has no 'library' field"),
    "no names": (_mutate_info(names=_DROP), "has no 'names'"),
    "no modules": (_mutate_info(modules=_DROP), "has no 'modules'"),
    "module listed twice": (_mutate_info(modules=[UP, UP]), "'modules' must be a non-empty list of distinct"),
    "unlisted module": (_mutate_info(modules=[UP]), "belongs to no module listed in 'modules'"),
    "listed module without tensors": (
        _mutate_info(
            modules=[
                UP,
                "x.y",
                "model.layers.1.mlp.up_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.v_proj",
            ]
        ),
        "module 'x.y' lacks tensors",
    ),
    "header is a list": (_whole_header([1, 2]), "its header is a JSON list"),
    "header is null": (_whole_header(None), "its header is a JSON null"),
    "metadata is a list": (_set_meta(), None),  # replaced below: __metadata__ = []
    "format_version abc": (_set_meta(format_version="abc"), "'format_version' must be a positive integer, got 'abc'"),
    "format_version not ASCII": (_set_meta(format_version="\u00b2"), "'format_version' must be a positive integer"),
    "newer format": (_set_meta(format_version="7"), "upgrade lag_triton"),
    "library not JSON": (_set_meta(library="{names"), "metadata field 'library' is not JSON"),
    "library is a list": (_set_meta(library="[1]"), "'library' must be a JSON object"),
    "not a library": (_set_meta(format="something"), "not a lag_triton library"),
    "base_models not one per adapter": (
        _mutate_info(base_models=["org/A"]),
        "'base_models' must list, for each of the 3 adapters, its base model",
    ),
    "empty base model": (_mutate_info(base_models=["", None, None]), "'base_models' must list"),
    "base_models disagree with base_model": (
        _mutate_info(base_model=None, base_models=["org/A", None, "org/A"]),
        "'base_models' (the base model each adapter declares) give base model 'org/A', but 'base_model' is None",
    ),
}


def _metadata_list(header, data):
    header["__metadata__"] = ["format", "lag_triton.library"]
    return header, data


CORRUPTIONS["metadata is a list"] = (_metadata_list, "'__metadata__' must be an object of strings")


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_damaged_library_files_raise_library_format_error_naming_file_and_field(saved, tmp_path, case, capsys):
    mutate, needle = CORRUPTIONS[case]
    header, data = read_raw(saved)
    header, data = mutate(copy.deepcopy(header), data)
    bad = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(LibraryFormatError) as info:
        Library.load(bad)
    assert str(bad) in str(info.value) and needle in str(info.value), str(info.value)
    from lag_triton.__main__ import main

    assert main(["info", "--check", str(bad)]) == 1  # --check: plain info does not read factor values
    assert capsys.readouterr().err.count("\n") == 1


VALUE_CORRUPTIONS = (
    "negative id",
    "id past names",
    "repeated id",
    "short names",
    "empty names",
    "rank past int32",
    "NaN factor",
)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_load_without_value_checks_leaves_values_to_patch(saved, tmp_path, case):
    """``check_values=False`` still refuses every damaged structure; bad values load, and ``patch``
    refuses them on the copies it keeps — naming file, module and field, the model untouched — as it
    does when given the path."""
    mutate, needle = CORRUPTIONS[case]
    header, data = read_raw(saved)
    bad = write_raw(tmp_path / "bad.safetensors", *mutate(copy.deepcopy(header), data))
    if case not in VALUE_CORRUPTIONS:
        with pytest.raises(LibraryFormatError) as info:
            Library.load(bad, check_values=False)
        assert str(bad) in str(info.value) and needle in str(info.value), str(info.value)
        return
    lib = Library.load(bad, check_values=False)
    for target in (lib, bad):
        model = tiny_model("llama")
        with pytest.raises(ValueError) as info:
            lag_triton.patch(model, target)
        assert str(bad) in str(info.value) and "module " in str(info.value), str(info.value)
        assert needle in str(info.value), str(info.value)
        assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())


def test_unparsable_prefixes(tmp_path):
    cases = {
        "short": b"abc",
        "huge header": (2**40).to_bytes(8, "little") + b"{}",
        "not json": (4).to_bytes(8, "little") + b"{{{{",
        "not utf8": (2).to_bytes(8, "little") + b"\xff\xfe",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(LibraryFormatError, match="safetensors") as info:
            Library.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def test_load_of_a_directory_or_a_non_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        Library.load(tmp_path)
    with pytest.raises(TypeError, match="str or os.PathLike"):
        Library.load(3)


def test_libraries_in_memory_are_checked_on_construction(library):
    m = library.modules[UP]
    with pytest.raises(TypeError, match="adapter names must be a list of strings, got str"):
        Library("abc", library.modules)
    with pytest.raises(ValueError, match="at least one module"):
        Library(library.names, {})
    with pytest.raises(TypeError, match="str -> ModuleWeights"):
        Library(library.names, {UP: (m.a_star, m.b_star)})
    with pytest.raises(ValueError, match=r"b_star has shape .* expected \(3, 'd_out', 4\)"):
        ModuleWeights(m.a_star, m.b_star[:, :, :2], m.prototypes, m.adapter_ids)
    with pytest.raises(ValueError, match=r"library .*module 'model.layers.0.mlp.up_proj': adapter_ids holds 5"):
        Library(library.names, {UP: ModuleWeights(m.a_star, m.b_star, m.prototypes, torch.tensor([0, 1, 5]))}).check()
    with pytest.raises(ValueError, match="2 adapter_base_models for 3 adapter names"):
        Library(library.names, library.modules, adapter_base_models=["org/A", None])
    with pytest.raises(TypeError, match="adapter 'a1' has ''"):
        Library(library.names, library.modules, adapter_base_models=[None, "", None])
    with pytest.raises(ValueError, match="give base model None .* but base_model is 'org/A'"):
        Library(library.names, library.modules, base_model="org/A", adapter_base_models=["org/A", "org/B", None])
    mixed = Library(library.names, library.modules, base_model="org/A", adapter_base_models=["org/A", None, None])
    assert Library(library.names, library.modules, base_model="org/A").adapter_base_models == ["org/A"] * 3
    assert mixed.to(dtype=torch.float64).adapter_base_models == ["org/A", None, None]


def test_memory_map_is_private(saved):
    """Writing into a loaded library's tensors never changes the file."""
    before = saved.read_bytes()
    lib = Library.load(saved)
    lib.modules[UP].a_star.zero_()
    assert saved.read_bytes() == before
    assert os.path.getsize(saved) == len(before)

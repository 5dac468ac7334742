"""Growing and shrinking a library file in place (issue 13, item 2): ``add`` gives the bytes of a
build from scratch without re-aligning the old adapters, ``remove`` likewise; duplicates, shape
mismatches and bad names are refused with the file untouched."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lag_triton import AdapterError, Library
from lag_triton.library import add_adapters, build, build_library, remove_adapters

from factories import make_adapter, tiny_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """a0-a4; a3 has the largest rank (6) and a4 the only q_proj, so adding them grows r_max and the
    module set, and removing them shrinks both."""
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    specs = [
        dict(r=4, targets=["up_proj", "down_proj"]),
        dict(r=2, targets=["up_proj", "down_proj"]),
        dict(r=3, targets=["up_proj", "v_proj"]),
        dict(r=6, targets=["down_proj"]),
        dict(r=2, targets=["q_proj", "up_proj"]),
    ]
    return [make_adapter(model, tmp / f"a{i}", seed=i, **s) for i, s in enumerate(specs)]


def _build(paths, path, **kw):
    build_library(paths, path, dtype=torch.bfloat16, workers=0, progress=False, **kw)
    return path.read_bytes()


def _no_temp_files(folder, *names):
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(names)


@pytest.mark.parametrize("split", [2, 3, 4])
def test_add_gives_the_bytes_of_a_build_from_scratch(adapters, tmp_path, split):
    scratch = _build(adapters, tmp_path / "scratch.safetensors")
    lib = tmp_path / "lib.safetensors"
    _build(adapters[:split], lib)
    report = add_adapters(lib, adapters[split:], workers=0, progress=False)
    assert lib.read_bytes() == scratch
    assert (report.adapters, report.aligned) == (5, 5 - split)
    _no_temp_files(tmp_path, "lib.safetensors", "scratch.safetensors")


def test_add_never_realigns_the_old_adapters_and_adds_in_steps(adapters, tmp_path, monkeypatch):
    scratch = _build(adapters, tmp_path / "scratch.safetensors")
    lib = tmp_path / "lib.safetensors"
    _build(adapters[:1], lib)
    aligned = []
    real = build.align_and_write
    monkeypatch.setattr(
        build,
        "align_and_write",
        lambda target, job, *general: (aligned.append(job[0].name), real(target, job, *general)),
    )
    for step in (adapters[1:3], adapters[3:4], adapters[4:]):
        add_adapters(lib, step, workers=0, progress=False)
    assert aligned == ["a1", "a2", "a3", "a4"] and lib.read_bytes() == scratch


def test_an_interrupted_add_leaves_the_library_and_resumes_with_only_the_rest(adapters, tmp_path, monkeypatch, capsys):
    from lag_triton.__main__ import main

    scratch = _build(adapters, tmp_path / "scratch.safetensors")
    lib = tmp_path / "lib.safetensors"
    before = _build(adapters[:1], lib)
    real, aligned = build.align_and_write, []

    def interrupted_after_two(target, job, *general):
        if len(aligned) == 2:
            raise KeyboardInterrupt
        real(target, job, *general)
        aligned.append(job[0].name)

    monkeypatch.setattr(build, "align_and_write", interrupted_after_two)
    assert main(["add", str(lib), *map(str, adapters[1:]), "--workers", "0", "-q"]) == 130
    assert lib.read_bytes() == before and aligned == ["a1", "a2"]  # the library is as it was
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".lag-tmp")]) == 2  # temp file + journal
    err = capsys.readouterr().err
    assert "2 of 4 adapters are written to" in err or sys.version_info < (3, 11)  # exception notes: 3.11+
    aligned.clear()
    assert main(["add", str(lib), *map(str, adapters[1:]), "--workers", "0", "-q", "--resume"]) == 0
    assert "2 aligned, 2 kept from a killed build, 1 copied" in capsys.readouterr().out and aligned == ["a3", "a4"]
    assert lib.read_bytes() == scratch
    _no_temp_files(tmp_path, "lib.safetensors", "scratch.safetensors")


def test_add_without_copy_file_range_and_to_another_file(adapters, tmp_path, monkeypatch):
    scratch = _build(adapters, tmp_path / "scratch.safetensors")
    lib = tmp_path / "lib.safetensors"
    old = _build(adapters[:3], lib)

    def unsupported(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    add_adapters(lib, adapters[3:], output=tmp_path / "grown.safetensors", workers=0, progress=False)
    assert (tmp_path / "grown.safetensors").read_bytes() == scratch and lib.read_bytes() == old


def test_add_refuses_duplicates_and_shape_mismatches_leaving_the_file_untouched(adapters, tmp_path):
    lib = tmp_path / "lib.safetensors"
    old = _build(adapters[:3], lib)
    with pytest.raises(ValueError, match=r"already has adapters named \['a1'\]"):
        add_adapters(lib, [adapters[1]], progress=False)
    with pytest.raises(ValueError, match=r"repeated: \['x'\]"):
        add_adapters(lib, adapters[3:], names=["x", "x"], progress=False)
    other = tiny_model("llama")
    other.model.layers[1].mlp.up_proj = torch.nn.Linear(48, 96, bias=False)
    wrong = make_adapter(other, tmp_path / "adapters" / "wrong", seed=9, targets=["up_proj"])
    with pytest.raises(
        AdapterError,
        match=r"wrong'.*'model.layers.1.mlp.up_proj' has d_in x d_out = 48 x 96 .*but "
        r"the library has 48 x 80",
    ):
        add_adapters(lib, [adapters[3], wrong], progress=False)
    assert lib.read_bytes() == old
    _no_temp_files(tmp_path, "lib.safetensors")


def test_add_keeps_the_library_dtype(adapters, tmp_path):
    lib = tmp_path / "lib.safetensors"
    build_library(adapters[:2], lib, dtype=torch.float32, workers=0, progress=False)
    add_adapters(lib, adapters[2:], workers=0, progress=False)
    build_library(adapters, tmp_path / "scratch.safetensors", dtype=torch.float32, workers=0, progress=False)
    assert lib.read_bytes() == (tmp_path / "scratch.safetensors").read_bytes()
    assert Library.load(lib).dtype == torch.float32


@pytest.mark.parametrize("drop", [["a3"], ["a4", "a0"], ["a1", "a2", "a3"]])
def test_remove_gives_the_bytes_of_a_build_of_the_rest(adapters, tmp_path, drop):
    lib = tmp_path / "lib.safetensors"
    _build(adapters, lib)
    rest = [p for p in adapters if p.name not in drop]
    report = remove_adapters(lib, drop)
    assert lib.read_bytes() == _build(rest, tmp_path / "scratch.safetensors")
    assert report.adapters == len(rest) and report.aligned == 0
    back = Library.load(lib)
    assert back.names == [p.name for p in rest]
    if "a3" in drop:
        assert back.r_max == 4  # the rank padding shrank with the only rank-6 adapter
    if "a4" in drop:
        assert not any("q_proj" in m for m in back.modules)  # no adapter targets q_proj any more


def test_remove_refuses_unknown_names_and_emptying_the_library(adapters, tmp_path):
    lib = tmp_path / "lib.safetensors"
    old = _build(adapters[:2], lib)
    with pytest.raises(ValueError, match=r"has no adapters named \['nope'\]"):
        remove_adapters(lib, ["a0", "nope"])
    with pytest.raises(ValueError, match="would leave library file .* empty"):
        remove_adapters(lib, ["a0", "a1"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        remove_adapters(tmp_path / "missing.safetensors", ["a0"])
    assert lib.read_bytes() == old
    _no_temp_files(tmp_path, "lib.safetensors")


def test_add_then_remove_round_trips(adapters, tmp_path):
    lib = tmp_path / "lib.safetensors"
    old = _build(adapters[:2], lib)
    add_adapters(lib, adapters[2:], workers=0, progress=False)
    remove_adapters(lib, [p.name for p in adapters[2:]])
    assert lib.read_bytes() == old

"""Growing and shrinking a library file in place (issue 13, item 2): ``add`` gives the bytes of a
build from scratch without re-aligning the old adapters, ``remove`` likewise; duplicates, shape
mismatches and bad names are refused with the file untouched."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys

import pytest
import torch

from lag_triton import AdapterError, Library
from lag_triton.library import add_adapters, build_library, remove_adapters

from factories import count_alignments, library_info, make_adapter, read_raw, tiny_model


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
    aligned = count_alignments(monkeypatch)
    for step in (adapters[1:3], adapters[3:4], adapters[4:]):
        add_adapters(lib, step, workers=0, progress=False)
    assert aligned == ["a1", "a2", "a3", "a4"] and lib.read_bytes() == scratch


def test_an_interrupted_add_leaves_the_library_and_resumes_with_only_the_rest(adapters, tmp_path, monkeypatch, capsys):
    from lag_triton.__main__ import main

    scratch = _build(adapters, tmp_path / "scratch.safetensors")
    lib = tmp_path / "lib.safetensors"
    before = _build(adapters[:1], lib)
    aligned = count_alignments(monkeypatch, fail_after=2)
    assert main(["add", str(lib), *map(str, adapters[1:]), "--workers", "0", "-q"]) == 130
    assert lib.read_bytes() == before and aligned == ["a1", "a2"]  # the library is as it was
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".lag-tmp")]) == 2  # temp file + journal
    err = capsys.readouterr().err
    assert "2 of 4 adapters are written to" in err or sys.version_info < (3, 11)  # exception notes: 3.11+
    aligned = count_alignments(monkeypatch)
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


@pytest.fixture(scope="module")
def declaring(adapters, tmp_path_factory):
    """Copies of a0-a3 whose configs declare base models "org/A", "org/B", "org/A" and none."""
    tmp = tmp_path_factory.mktemp("declaring")
    out = []
    for folder, base in zip(adapters, ["org/A", "org/B", "org/A", None]):
        copy = shutil.copytree(folder, tmp / folder.name)
        config = json.loads((copy / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (copy / "adapter_config.json").write_text(json.dumps(config))
        out.append(copy)
    return out


def _info(path) -> dict:
    return library_info(read_raw(path)[0])


def test_add_and_remove_decide_the_base_model_as_a_build_of_their_adapters(declaring, tmp_path):
    """A build names the base model its adapters' configs agree on (None when they disagree or none
    names one); add and remove give the same bytes as that build, though the grown library's
    base_model alone cannot tell "none named" from "they disagreed" or which adapters named it."""
    for order in ([0, 1, 2, 3], [3, 0, 1, 2], [1, 3, 2, 0]):
        paths = [declaring[i] for i in order]
        scratch = _build(paths, tmp_path / "scratch.safetensors")
        for split in (1, 2, 3):
            lib = tmp_path / "lib.safetensors"
            _build(paths[:split], lib)
            add_adapters(lib, paths[split:], workers=0, progress=False)
            assert lib.read_bytes() == scratch, (order, split)
    full = tmp_path / "full.safetensors"
    _build(declaring, full)
    assert _info(full)["base_model"] is None
    for drop in itertools.chain.from_iterable(itertools.combinations(range(4), n) for n in (1, 2, 3)):
        rest = [p for i, p in enumerate(declaring) if i not in drop]
        remove_adapters(full, [declaring[i].name for i in drop], output=tmp_path / "rest.safetensors")
        assert (tmp_path / "rest.safetensors").read_bytes() == _build(rest, tmp_path / "scratch.safetensors"), drop
        want = {0: "org/A", 1: "org/B", 2: "org/A"}
        named = {want[i] for i in range(3) if i not in drop}
        assert Library.load(tmp_path / "rest.safetensors").base_model == (named.pop() if len(named) == 1 else None)


def test_only_libraries_whose_adapters_differ_record_each_adapter_s_base_model(adapters, declaring, tmp_path):
    """Adapters that all name one base model, or none, give the file they always gave (format
    version 1, no 'base_models'); others list each adapter's, read back by load and saved again."""
    for paths, base_model in (([declaring[0], declaring[2]], "org/A"), (adapters[:3], None)):
        _build(paths, tmp_path / "lib.safetensors")
        info = _info(tmp_path / "lib.safetensors")
        assert info["base_model"] == base_model and "base_models" not in info
    mixed = [declaring[0], declaring[3], declaring[2]]
    lib = tmp_path / "mixed.safetensors"
    _build(mixed, lib)
    header, _ = read_raw(lib)
    assert header["__metadata__"]["format_version"] == "1"
    assert library_info(header)["base_models"] == ["org/A", None, "org/A"]
    loaded = Library.load(lib)
    assert loaded.base_model == "org/A" and loaded.adapter_base_models == ["org/A", None, "org/A"]
    loaded.save(tmp_path / "saved.safetensors")
    Library.from_peft(mixed, dtype=torch.bfloat16, progress=False).save(tmp_path / "memory.safetensors")
    assert (tmp_path / "saved.safetensors").read_bytes() == lib.read_bytes()
    assert (tmp_path / "memory.safetensors").read_bytes() == lib.read_bytes()
    assert loaded.to(dtype=torch.float32).adapter_base_models == loaded.adapter_base_models


@pytest.mark.parametrize("how", ["api", "cli"])
def test_in_place_add_and_remove_through_a_symlink_replace_the_library_it_points_to(adapters, tmp_path, how):
    from lag_triton.__main__ import main

    real, link = tmp_path / "real" / "lib.safetensors", tmp_path / "link.safetensors"
    real.parent.mkdir()
    _build(adapters[:1], real)
    link.symlink_to(real)
    if how == "api":
        add_adapters(link, adapters[1:2], workers=0, progress=False)
    else:
        assert main(["add", str(link), str(adapters[1]), "--workers", "0", "-q"]) == 0
    assert link.is_symlink() and Library.load(real).names == ["a0", "a1"]
    if how == "api":
        remove_adapters(link, ["a0"])
    else:
        assert main(["remove", str(link), "a0"]) == 0
    assert link.is_symlink() and Library.load(real).names == ["a1"]

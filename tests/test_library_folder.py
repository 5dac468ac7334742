"""Library folders (a library stored as part files listed by library.json): ``add`` writes only the
new adapters and leaves the other parts' bytes alone, ``remove`` rewrites only the parts that hold
removed adapters, and the folder reads as the library a single-file build of the same adapters
gives, byte for byte once saved, output for output once patched. Bad folders are refused naming
the folder and the part; a writer that fails leaves the library as it was."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch

import lag_triton
from lag_triton import Library, LibraryFormatError
from lag_triton.library import add_adapters, build_library, remove_adapters
from lag_triton.library.folder import MANIFEST
from lag_triton.library.stacked import StackedModuleWeights
from lag_triton.library.weights import ModuleWeights

from factories import count_alignments, make_adapter, tiny_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """a0-a5: ranks 4, 2, 3, 6, 2, 5 over overlapping module sets (a3 alone has rank 6, a4 alone
    targets q_proj), so parts pad to different ranks and hold different modules."""
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    specs = [
        dict(r=4, targets=["up_proj", "down_proj"]),
        dict(r=2, targets=["up_proj", "down_proj"]),
        dict(r=3, targets=["up_proj", "v_proj"]),
        dict(r=6, targets=["down_proj"]),
        dict(r=2, targets=["q_proj", "up_proj"]),
        dict(r=5, targets=["up_proj", "v_proj"]),
    ]
    return [make_adapter(model, tmp / f"a{i}", seed=i, **s) for i, s in enumerate(specs)]


def _file(paths, path, **kw):
    build_library(paths, path, dtype=torch.bfloat16, workers=0, progress=False, **kw)
    return path.read_bytes()


def _folder(paths, path, **kw):
    build_library(paths, path, dtype=torch.bfloat16, workers=0, progress=False, folder=True, **kw)
    return path


def _as_file(folder, path):
    Library.load(folder).save(path)
    return path.read_bytes()


def _parts(folder) -> list[str]:
    return json.loads((folder / MANIFEST).read_text())["parts"]


def _entries(folder) -> list[str]:
    """The folder's files but its writers' lock file (which stays, empty: removing a lock file races)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock")


@pytest.mark.parametrize("steps", [[2], [3], [1, 3, 4], [1, 2, 3, 4, 5]])
def test_a_folder_grown_by_add_reads_as_a_build_from_scratch(adapters, tmp_path, steps):
    scratch = _file(adapters, tmp_path / "scratch.safetensors")
    folder = _folder(adapters[: steps[0]], tmp_path / "lib")
    bounds = steps + [len(adapters)]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        before = {p: (folder / p).read_bytes() for p in _parts(folder)}
        report = add_adapters(folder, adapters[lo:hi], workers=0, progress=False)
        assert (report.adapters, report.aligned, report.untouched) == (hi, hi - lo, lo)
        assert f"{hi - lo} aligned, {lo} left in place" in str(report)
        assert all((folder / p).read_bytes() == b for p, b in before.items())  # old parts not rewritten
        assert len(_parts(folder)) == i + 2
    assert _entries(folder) == sorted([MANIFEST, *_parts(folder)])  # no temp files left
    assert _as_file(folder, tmp_path / "saved.safetensors") == scratch
    lib = Library.load(folder)
    assert lib.names == [p.name for p in adapters] and lib.r_max == 6 and lib.source == str(folder)
    assert any(isinstance(m, StackedModuleWeights) for m in lib.modules.values())


def test_a_patched_model_routes_a_folder_as_the_file(adapters, tmp_path):
    _file(adapters, tmp_path / "lib.safetensors")
    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:4], workers=0, progress=False)
    add_adapters(folder, adapters[4:], workers=0, progress=False)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for lib in (tmp_path / "lib.safetensors", folder):
        patched = lag_triton.patch(copy.deepcopy(model), lib, k=3, backend="torch")
        with torch.no_grad(), lag_triton.trace(patched) as tr:
            logits.append(patched(ids).logits)
        logits.append(tr.selections)
    assert torch.equal(logits[0], logits[2])
    assert logits[1].keys() == logits[3].keys()
    assert all(torch.equal(logits[1][m], logits[3][m]) for m in logits[1])


def test_remove_rewrites_only_the_parts_that_hold_removed_adapters(adapters, tmp_path):
    folder = _folder(adapters[:2], tmp_path / "lib")
    for lo, hi in ((2, 4), (4, 6)):
        add_adapters(folder, adapters[lo:hi], workers=0, progress=False)
    first, second, third = _parts(folder)
    kept = (folder / third).read_bytes()
    report = remove_adapters(folder, ["a1", "a2", "a3"])  # a1 from the first part, the whole second part
    parts = _parts(folder)
    assert len(parts) == 2 and parts[1] == third and (folder / third).read_bytes() == kept
    assert parts[0] not in (first, second) and _entries(folder) == sorted([MANIFEST, *parts])
    assert (report.adapters, report.aligned, report.untouched) == (3, 0, 2) and "1 copied" in str(report)
    rest = [p for p in adapters if p.name not in ("a1", "a2", "a3")]
    assert _as_file(folder, tmp_path / "saved.safetensors") == _file(rest, tmp_path / "rest.safetensors")


def test_remove_refuses_unknown_names_and_emptying_the_folder(adapters, tmp_path):
    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:3], workers=0, progress=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=r"library folder .*lib' has no adapters named \['nope'\]"):
        remove_adapters(folder, ["a0", "nope"])
    with pytest.raises(ValueError, match="would leave library folder .* empty"):
        remove_adapters(folder, ["a0", "a1", "a2"])
    with pytest.raises(ValueError, match="rewrites its parts in place; output= .* is for library files"):
        remove_adapters(folder, ["a0"], output=tmp_path / "other.safetensors")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_add_refuses_taken_names_and_shape_mismatches_leaving_the_folder_untouched(adapters, tmp_path):
    folder = _folder(adapters[:3], tmp_path / "lib")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=r"already has adapters named \['a1'\]"):
        add_adapters(folder, [adapters[1]], progress=False)
    other = tiny_model("llama")
    other.model.layers[1].mlp.up_proj = torch.nn.Linear(48, 96, bias=False)
    wrong = make_adapter(other, tmp_path / "adapters" / "wrong", seed=9, targets=["up_proj"])
    with pytest.raises(lag_triton.AdapterError, match=r"'model.layers.1.mlp.up_proj' has d_in x d_out = 48 x 96"):
        add_adapters(folder, [adapters[3], wrong], progress=False)
    with pytest.raises(ValueError, match="output= .* is for library files"):
        add_adapters(folder, adapters[3:4], output=tmp_path / "x.safetensors", progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_an_interrupted_add_leaves_the_folder_and_resumes(adapters, tmp_path, monkeypatch):
    scratch = _file(adapters, tmp_path / "scratch.safetensors")
    folder = _folder(adapters[:2], tmp_path / "lib")
    before = {p: (folder / p).read_bytes() for p in [MANIFEST, *_parts(folder)]}
    count_alignments(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        add_adapters(folder, adapters[2:], workers=0, progress=False)
    assert {p: (folder / p).read_bytes() for p in before} == before and _parts(folder) == list(before)[1:]
    assert Library.load(folder).names == ["a0", "a1"]
    aligned = count_alignments(monkeypatch)
    report = add_adapters(folder, adapters[2:], workers=0, progress=False, resume=True)
    assert aligned == ["a4", "a5"] and (report.aligned, report.resumed, report.untouched) == (2, 2, 2)
    assert _entries(folder) == sorted([MANIFEST, *_parts(folder)])
    assert _as_file(folder, tmp_path / "saved.safetensors") == scratch


def test_building_into_a_folder_replaces_it_whole_and_refuses_other_folders(adapters, tmp_path):
    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:4], workers=0, progress=False)
    build_library(adapters[3:], folder, dtype=torch.bfloat16, workers=0, progress=False)  # a folder stays one
    (part,) = _parts(folder)
    assert _entries(folder) == [MANIFEST, part] and Library.load(folder).names == ["a3", "a4", "a5"]
    assert (folder / part).read_bytes() == _file(adapters[3:], tmp_path / "rest.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\] and no library.json"):
        _folder(adapters[:1], other)
    with pytest.raises(NotADirectoryError, match="is a file"):
        _folder(adapters[:1], tmp_path / "rest.safetensors")
    assert _entries(other) == ["notes.txt"]
    with pytest.raises(ValueError, match="folder=True writes a library folder: give output="):
        Library.from_peft(adapters[:1], folder=True, progress=False)


def test_general_knowledge_folders_grow_as_files_do(adapters, tmp_path):
    """GKS needs the general adapters' ranks: four rank-3 adapters over parts of their modules."""
    model = tiny_model("llama")
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    general = [make_adapter(model, tmp_path / f"g{i}", seed=20 + i, r=3, targets=targets) for i in range(2)]
    paths = [make_adapter(model, tmp_path / f"k{i}", seed=30 + i, r=3, targets=targets[i:]) for i in range(4)]
    scratch = _file(paths, tmp_path / "scratch.safetensors", general_adapters=general)
    folder = _folder(paths[:1], tmp_path / "lib", general_adapters=general)
    add_adapters(folder, paths[1:3], workers=0, progress=False)
    add_adapters(folder, paths[3:], workers=0, progress=False)
    assert _as_file(folder, tmp_path / "saved.safetensors") == scratch
    plain = _folder(adapters[1:2], tmp_path / "plain")
    shutil.copy(plain / _parts(plain)[0], folder / "part-000009.lag.safetensors")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["parts"].append("part-000009.lag.safetensors")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LibraryFormatError, match="part 'part-000009.lag.safetensors' subtracts other general"):
        Library.load(folder)


def _manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "is not a lag_triton library folder manifest"),
        ({"format_version": 2}, "folder format version 2; this lag_triton reads up to 1"),
        ({"format_version": "1"}, "'format_version' must be a positive integer"),
        ({"parts": []}, "'parts' must be a non-empty list of file names"),
        ({"parts": ["../lib.safetensors"]}, r"part '../lib.safetensors' is not a plain file name"),
        ({"parts": ["part-000000.lag.safetensors"] * 2}, "lists a part twice"),
        ({"parts": ["part-000000.lag.safetensors", "gone.safetensors"]}, "part 'gone.safetensors', listed in"),
    ],
)
def test_bad_manifests_are_refused_naming_the_folder(adapters, tmp_path, change, message):
    folder = _folder(adapters[:1], tmp_path / "lib")
    _manifest(folder, **change)
    with pytest.raises(LibraryFormatError, match=f"library folder '.*lib': .*{message}"):
        Library.load(folder)


def test_parts_that_disagree_are_refused_naming_both(adapters, tmp_path):
    folder = _folder(adapters[:2], tmp_path / "lib")
    (first,) = _parts(folder)
    shutil.copy(folder / first, folder / "copy.safetensors")
    _manifest(folder, parts=[first, "copy.safetensors"])
    with pytest.raises(LibraryFormatError, match=rf"adapter 'a0' is in both '{first}' and 'copy.safetensors'"):
        Library.load(folder)
    build_library(adapters[2:3], folder / "fp32.safetensors", dtype=torch.float32, workers=0, progress=False)
    _manifest(folder, parts=[first, "fp32.safetensors"])
    with pytest.raises(
        LibraryFormatError,
        match=r"module '.*up_proj' is 48 -> 80, float32 factors in 'fp32.safetensors' but 48 -> 80, bfloat16 "
        r"factors in 'part-000000.lag.safetensors'",
    ):
        Library.load(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(LibraryFormatError, match="library.json is not JSON"):
        Library.load(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(IsADirectoryError, match="nor a library folder: it has no library.json"):
        Library.load(folder)


def _stacked_parts(dtype=torch.float32):
    """Three parts of one module (d_in 7, d_out 5) padded to ranks 3, 1, 2 (the last without a
    ranks tensor), 4, 1 and 3 adapters, and their rows concatenated by hand at rank 4."""
    g = torch.Generator().manual_seed(0)
    parts, whole = [], {"a_star": [], "b_star": [], "prototypes": []}
    for n, r, ranks in ((4, 3, [3, 1, 2, 3]), (1, 1, [1]), (3, 2, None)):
        a = torch.randn(n, r, 7, generator=g, dtype=dtype)
        b = torch.randn(n, 5, r, generator=g, dtype=dtype)
        ranks_t = None if ranks is None else torch.tensor(ranks, dtype=torch.int32)
        parts.append(ModuleWeights(a, b, a[:, 0].clone(), torch.arange(n) * 2, ranks_t))  # ids 0, 2, ...
        whole["a_star"].append(torch.nn.functional.pad(a, (0, 0, 0, 4 - r)))
        whole["b_star"].append(torch.nn.functional.pad(b, (0, 4 - r)))
        whole["prototypes"].append(a[:, 0])
    return parts, {f: torch.cat(t) for f, t in whole.items()}


def test_stacked_module_rows_equal_the_concatenated_parts_for_every_range():
    parts, whole = _stacked_parts()
    stacked = StackedModuleWeights(parts, [0, 8, 10], rank=4)
    assert stacked.adapter_ids.tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert stacked.ranks.tolist() == [3, 1, 2, 3, 1, 2, 2, 2] and stacked.ranks.dtype == torch.int32
    for lo in range(9):
        for hi in range(lo, 9):
            rows = stacked.copy_rows(lo, hi, dtype=torch.bfloat16)
            for f, t in whole.items():
                assert torch.equal(rows[f], t[lo:hi].to(torch.bfloat16)), (f, lo, hi)
    held = stacked.to(dtype=torch.float64)
    assert all(torch.equal(getattr(held, f), t.double()) for f, t in whole.items())
    assert stacked.nbytes(torch.float64) == held.nbytes() and stacked.nbytes() == stacked.to().nbytes()
    assert torch.equal(stacked.prototypes, whole["prototypes"]) and stacked.dtype == torch.float32
    stacked.check_values(15)
    with pytest.raises(ValueError, match=r"adapter_ids holds 14, outside \[0, 14\)"):
        stacked.check_values(14)
    with pytest.raises(IndexError, match=r"rows \[3, 9\) of a module with 8 adapters"):
        stacked.copy_rows(3, 9)


def test_stacked_module_checks_name_the_part():
    parts, _ = _stacked_parts()
    parts[1].a_star[0, 0, 3] = float("nan")
    stacked = StackedModuleWeights(parts, [0, 8, 10], rank=4, labels=["p0", "p1", "p2"])
    with pytest.raises(ValueError, match="p1: a_star holds NaN or inf"):
        stacked.check_values(15)
    with pytest.raises(ValueError, match="p2 has rank 2, above the module's rank 1"):
        StackedModuleWeights(parts[1:], [8, 10], rank=1, labels=["p1", "p2"])
    with pytest.raises(ValueError, match=r"p1 holds \[torch.float64.*, p0 \[torch.float32"):
        StackedModuleWeights([parts[0], parts[1].to(dtype=torch.float64)], [0, 8], rank=4, labels=["p0", "p1"])
    with pytest.raises(ValueError, match=r"adapter_ids must increase from row to row"):
        StackedModuleWeights(parts[:2], [8, 0], rank=4).check_maps(20)


def test_the_command_line_builds_grows_shrinks_and_describes_folders(adapters, tmp_path, capsys):
    from lag_triton.__main__ import main

    folder = tmp_path / "lib"
    args = ["--workers", "0", "-q"]
    assert main(["build", *map(str, adapters[:2]), "-o", str(folder), "--folder", "--dtype", "bfloat16", *args]) == 0
    assert main(["add", str(folder), *map(str, adapters[2:]), *args]) == 0
    assert "4 aligned, 2 left in place" in capsys.readouterr().out
    assert main(["add", str(folder), str(adapters[0]), "-o", str(tmp_path / "x.safetensors"), *args]) == 2
    assert "is a library folder, grown or shrunk in place" in capsys.readouterr().err
    assert main(["remove", str(folder), "a5"]) == 0
    assert "0 aligned, 3 copied, 2 left in place" in capsys.readouterr().out
    assert main(["info", str(folder), "--check"]) == 0
    out = capsys.readouterr().out
    assert "(a folder of 2 parts)" in out and "adapters    5  (r_max 6, dtype bfloat16)" in out
    assert "model.layers.0.mlp.up_proj: 4 adapters, 48 -> 80, ranks [2, 3, 4]" in out
    assert out.count(".lag.safetensors: ") == 2
    assert main(["build", str(adapters[0]), "-o", str(tmp_path / "file"), *args]) == 0
    assert main(["build", str(adapters[0]), "-o", str(tmp_path / "file"), "--folder", *args]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert _as_file(folder, tmp_path / "saved.safetensors") == _file(adapters[:5], tmp_path / "s.safetensors")


def test_assemble_links_files_built_apart_into_one_folder(adapters, tmp_path, monkeypatch, capsys):
    """Libraries built apart (e.g. on several machines) become parts without a copy: the folder reads
    as one build of all their adapters, a later add to an original leaves its part alone, and where
    hard links fail the files are copied."""
    from lag_triton.__main__ import main
    from lag_triton.library import assemble_folder

    files = [tmp_path / f"shard{i}.safetensors" for i in range(3)]
    for f, (lo, hi) in zip(files, ((0, 2), (2, 3), (3, 5))):
        _file(adapters[lo:hi], f)
    folder = tmp_path / "lib"
    report = assemble_folder(folder, files[:2])
    assert (report.adapters, report.nbytes, report.untouched, report.linked) == (3, 0, 0, 3)
    assert re.search(r"0 bytes \(0 aligned, 3 hard-linked, in [\d.]+ s\)$", str(report))  # it said "3 copied"
    assert all((folder / p).stat().st_ino == f.stat().st_ino for p, f in zip(_parts(folder), files))
    monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    assert main(["assemble", str(folder), str(files[2])]) == 0
    out = capsys.readouterr().out
    assert "5 adapters" in out and "KiB copied" in out and "hard-linked" not in out
    assert (folder / _parts(folder)[2]).stat().st_ino != files[2].stat().st_ino
    add_adapters(files[0], adapters[5:], workers=0, progress=False)  # replaces shard0 by a rename
    assert Library.load(folder).names == [f"a{i}" for i in range(5)]
    assert _as_file(folder, tmp_path / "saved.safetensors") == _file(adapters[:5], tmp_path / "s.safetensors")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(
        LibraryFormatError, match=r"adapter 'a2' is in both 'part-000001.lag.safetensors' and '.*shard1.safetensors'"
    ):
        assemble_folder(folder, [files[1]])
    with pytest.raises(ValueError, match="given twice"):
        assemble_folder(tmp_path / "new", [files[1], files[1]])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        assemble_folder(folder, [tmp_path / "missing.safetensors"])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_remove_between_an_interrupted_add_and_its_resume_keeps_the_add_s_rows(adapters, tmp_path, monkeypatch):
    """remove numbers its parts after the temp file a failed add left, so the resume still finds it."""
    folder = _folder(adapters[:2], tmp_path / "lib")
    count_alignments(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        add_adapters(folder, adapters[2:], workers=0, progress=False)
    remove_adapters(folder, ["a1"])
    aligned = count_alignments(monkeypatch)
    report = add_adapters(folder, adapters[2:], workers=0, progress=False, resume=True)
    assert aligned == ["a4", "a5"] and report.resumed == 2
    rest = [adapters[0], *adapters[2:]]
    assert _as_file(folder, tmp_path / "saved.safetensors") == _file(rest, tmp_path / "rest.safetensors")
    assert _entries(folder) == sorted([MANIFEST, *_parts(folder)])


def test_a_folder_whose_writer_died_can_be_built_again(adapters, tmp_path):
    """A first build killed while it wrote library.json leaves its temp file; a build whose folder
    lost a part replaces the broken folder (a build replaces a folder whole)."""
    import subprocess

    from lag_triton.library import safetensors_io as sio

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process has now
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "part-000000.lag.safetensors").write_bytes(b"partial")
    sio._temp_name(folder / MANIFEST, str(dead.pid)).write_text("{")  # what the killed writer left
    _folder(adapters[:2], folder)
    assert Library.load(folder).names == ["a0", "a1"] and _entries(folder) == sorted([MANIFEST, *_parts(folder)])
    (folder / _parts(folder)[0]).unlink()
    with pytest.raises(LibraryFormatError, match="is not a file in the folder"):
        Library.load(folder)
    with pytest.raises(LibraryFormatError, match="is not a file in the folder"):
        add_adapters(folder, adapters[2:3], workers=0, progress=False)
    _folder(adapters[2:4], folder)
    assert Library.load(folder).names == ["a2", "a3"] and _entries(folder) == sorted([MANIFEST, *_parts(folder)])


def test_a_load_that_races_a_commit_reads_the_new_parts(adapters, tmp_path, monkeypatch):
    """remove deletes the parts it replaced once it commits; a load that read the old manifest reads again."""
    from lag_triton.library import library as library_module

    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:4], workers=0, progress=False)
    real, calls = library_module._load, []

    def load_after_a_commit(path, check_values=True, stored=None):
        if not calls:
            remove_adapters(folder, ["a0"])
        calls.append(path.name)
        return real(path, check_values, stored)

    monkeypatch.setattr(library_module, "_load", load_after_a_commit)
    assert Library.load(folder).names == ["a1", "a2", "a3"] and len(calls) == 3


def test_a_general_knowledge_folder_loads_without_joining_its_parts(tmp_path):
    model = tiny_model("llama")
    targets = ["up_proj", "down_proj"]
    general = [make_adapter(model, tmp_path / f"g{i}", seed=20 + i, r=3, targets=targets) for i in range(2)]
    paths = [make_adapter(model, tmp_path / f"k{i}", seed=30 + i, r=3, targets=targets) for i in range(3)]
    folder = _folder(paths[:1], tmp_path / "lib", general_adapters=general)
    add_adapters(folder, paths[1:], workers=0, progress=False)
    lib = Library.load(folder, check_values=False)
    stacked = [m for m in lib.modules.values() if isinstance(m, StackedModuleWeights)]
    assert stacked and not any("_whole" in vars(m) for m in stacked)  # no host copy of the joined rows
    from lag_triton.experiment.evaluate import factors_read_per_token

    lib.nbytes, lib.dtype, repr(lib), factors_read_per_token(lib, "lag", 2)
    assert not any("_whole" in vars(m) for m in stacked)


def test_compact_merges_the_parts_into_the_bytes_of_one_build(adapters, tmp_path, capsys):
    """Rows are copied (re-padded where a part's rank is below the folder's), never re-aligned."""
    from lag_triton.__main__ import main
    from lag_triton.library import compact_folder

    scratch = _file(adapters, tmp_path / "scratch.safetensors")
    folder = _folder(adapters[:2], tmp_path / "lib")
    for lo, hi in ((2, 3), (3, 5), (5, 6)):
        add_adapters(folder, adapters[lo:hi], workers=0, progress=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["compact", str(folder), "-o", str(tmp_path / "one.safetensors")]) == 0
    assert "6 adapters, 8 modules" in capsys.readouterr().out
    assert (tmp_path / "one.safetensors").read_bytes() == scratch
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # -o leaves the folder
    with pytest.raises(ValueError, match="write the merged library file outside library folder"):
        compact_folder(folder, folder / _parts(folder)[0])
    report = compact_folder(folder)
    (part,) = _parts(folder)
    assert (folder / part).read_bytes() == scratch and _entries(folder) == [MANIFEST, part]
    assert (report.adapters, report.aligned) == (6, 0)
    again = compact_folder(folder)  # one part already: nothing written
    assert (again.nbytes, again.untouched) == (0, 6) and _parts(folder) == [part]
    assert main(["compact", str(tmp_path / "scratch.safetensors")]) == 1
    assert "has no library.json: not a library folder" in capsys.readouterr().err


def test_a_load_that_races_a_commit_while_reading_headers_reads_again(adapters, tmp_path, monkeypatch):
    from lag_triton.library import folder as folder_module

    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:4], workers=0, progress=False)
    real, calls = folder_module.read_stored, []

    def commit_while_reading(path):
        calls.append(path.name)
        if len(calls) == 1:
            remove_adapters(folder, ["a0"])  # deletes the part whose header this load has just read
        return real(path)

    monkeypatch.setattr(folder_module, "read_stored", commit_while_reading)
    assert Library.load(folder).names == ["a1", "a2", "a3"]
    (folder / _parts(folder)[0]).unlink()  # no commit: a missing part is an error, not retried
    with pytest.raises(LibraryFormatError, match="is not a file in the folder"):
        Library.load(folder)


def _kill_while_writing(operation, *args) -> None:
    """Run ``operation(*args)`` in a forked child that is killed (SIGKILL) as its rows are complete."""
    import multiprocessing
    import os
    import signal

    def child():
        from lag_triton.library import writer

        writer.StreamingFile.commit = lambda self: os.kill(os.getpid(), signal.SIGKILL)
        operation(*args)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL


def test_writers_killed_or_failed_leave_only_what_a_resume_needs(adapters, tmp_path, monkeypatch):
    """A killed compact leaves a temp file nothing can resume: the next commit removes it, and it
    never takes the part of a failed add, which an add of other adapters leaves alone as well."""
    import warnings

    from lag_triton.library import compact_folder

    folder = _folder(adapters[:1], tmp_path / "lib")
    add_adapters(folder, adapters[1:2], workers=0, progress=False)
    count_alignments(monkeypatch, fail_after=1)
    with pytest.raises(KeyboardInterrupt):  # a2 written and kept, with its journal
        add_adapters(folder, adapters[2:5], workers=0, progress=False)
    kept = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    _kill_while_writing(compact_folder, folder)
    assert len([p for p in folder.iterdir() if p.name.startswith(".")]) == len(kept) + 1
    assert Library.load(folder).names == ["a0", "a1"]
    count_alignments(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "starting over, and removing what a killed run left"
        add_adapters(folder, adapters[5:], workers=0, progress=False)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == kept  # compact's is gone
    aligned = count_alignments(monkeypatch)
    report = add_adapters(folder, adapters[2:5], workers=0, progress=False, resume=True)
    assert aligned == ["a3", "a4"] and report.resumed == 1
    assert _entries(folder) == sorted([MANIFEST, *_parts(folder)])
    order = [adapters[i] for i in (0, 1, 5, 2, 3, 4)]  # the manifest's order
    assert Library.load(folder).names == [p.name for p in order]
    assert _as_file(folder, tmp_path / "saved.safetensors") == _file(order, tmp_path / "ordered.safetensors")


def test_assemble_checks_everything_before_the_folder_exists(adapters, tmp_path, monkeypatch, capsys):
    from lag_triton.__main__ import main
    from lag_triton.library import assemble_folder

    bf16, fp32 = tmp_path / "bf16.safetensors", tmp_path / "fp32.safetensors"
    _file(adapters[3:4], bf16)  # down_proj only
    build_library(adapters[4:5], fp32, dtype=torch.float32, workers=0, progress=False)  # q_proj, up_proj
    with pytest.raises(ValueError, match=r"mixes factor dtypes \['torch.bfloat16', 'torch.float32'\]; a folder needs"):
        assemble_folder(tmp_path / "new", [bf16, fp32])
    other = _folder(adapters[:1], tmp_path / "other")
    with pytest.raises(ValueError, match="is a library folder; assemble takes library files"):
        assemble_folder(tmp_path / "new", [bf16, other])
    assert not (tmp_path / "new").exists()
    assert main(["assemble", str(tmp_path / "new"), str(bf16), str(bf16)]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["compact", str(other), "-o", str(other / "merged.safetensors")]) == 2
    assert "outside the folder" in capsys.readouterr().err
    synced = []
    monkeypatch.setattr("os.link", lambda *a: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    real_fsync = os.fsync
    monkeypatch.setattr("os.fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    assemble_folder(tmp_path / "new", [bf16])
    part = _parts(tmp_path / "new")[0]
    assert any(f".{part}." in s for s in synced)  # the copy was synced before the manifest listed it


def test_a_second_writer_fails_at_once_while_one_holds_the_folder(adapters, tmp_path, capsys):
    """Two writers at once would each commit a manifest without the other's part (and delete it as
    unlisted): the second fails instead, naming the folder, and the folder is as the first left it."""
    import fcntl

    from lag_triton.__main__ import main
    from lag_triton.library import assemble_folder, compact_folder
    from lag_triton.library.folder import FolderBusy

    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:3], workers=0, progress=False)
    _file(adapters[4:5], tmp_path / "other.safetensors")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with open(folder / ".lock") as held:  # what a writer in another process holds
        fcntl.flock(held, fcntl.LOCK_EX)
        writers = [
            lambda: add_adapters(folder, adapters[3:4], workers=0, progress=False),
            lambda: remove_adapters(folder, ["a0"]),
            lambda: compact_folder(folder),
            lambda: assemble_folder(folder, [tmp_path / "other.safetensors"]),
            lambda: _folder(adapters[3:4], folder),
        ]
        for writer in writers:
            with pytest.raises(FolderBusy, match=r"library folder '.*lib': another writer .* one writer at a time"):
                writer()
        assert main(["remove", str(folder), "a0"]) == 1 and "another writer" in capsys.readouterr().err
        compact_folder(folder, tmp_path / "merged.safetensors")  # -o only reads the folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    remove_adapters(folder, ["a0"])  # the lock is free again
    assert Library.load(folder).names == ["a1", "a2"]


@pytest.mark.parametrize(
    "ids, message",
    [([0, 5], r"adapter_ids holds 5, outside \[0, 2\)"), ([1, 0], "adapter_ids must increase from row to row")],
)
def test_assemble_refuses_a_file_whose_index_maps_a_load_refuses(adapters, tmp_path, capsys, ids, message):
    """A header says nothing of a module's adapter_ids: assemble reads them before the folder
    changes, so that it never links a part that breaks the folder's load (and info, add, remove
    refuse what a load refuses: ids must increase, not only be in range)."""
    from lag_triton.__main__ import main
    from lag_triton.library import assemble_folder
    from lag_triton.library.stored import read_stored

    from factories import read_raw, replace_tensor, write_raw

    folder = _folder(adapters[4:5], tmp_path / "lib")
    good = tmp_path / "good.safetensors"
    _file(adapters[:2], good)
    _file([adapters[2], adapters[5]], tmp_path / "other.safetensors")  # both target up_proj and v_proj
    header, data = read_raw(tmp_path / "other.safetensors")
    module = "model.layers.0.mlp.up_proj"
    header, data = replace_tensor(header, data, f"{module}::adapter_ids", torch.tensor(ids).numpy().tobytes())
    bad = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(LibraryFormatError, match=rf"library file '.*bad.safetensors': module '{module}': {message}"):
        Library.load(bad)
    with pytest.raises(LibraryFormatError, match=rf"library file '.*bad.safetensors': module '{module}': {message}"):
        read_stored(bad).index_maps(module)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(LibraryFormatError, match=rf"library file '.*bad.safetensors': module '{module}': {message}"):
        assemble_folder(folder, [good, bad])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert main(["assemble", str(tmp_path / "new"), str(bad)]) == 1 and "bad.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["info", str(bad)]) == 1 and message.replace("\\", "") in capsys.readouterr().err
    assemble_folder(folder, [good])
    assert Library.load(folder).names == ["a4", "a0", "a1"]


def test_every_member_of_a_group_that_shares_a_folder_can_take_its_lock(adapters, tmp_path, monkeypatch):
    """In a folder a group shares (umask 002) the lock file is as group-writable as the parts and the
    manifest; and a writer that may only read it (made by another user under another umask, or in a
    sticky folder where O_CREAT on another user's file fails: fs.protected_regular) still takes it,
    as flock needs no write access."""
    import errno
    import stat

    umask = os.umask(0o002)
    try:
        folder = _folder(adapters[:1], tmp_path / "lib")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {0o664}, modes
    real_open = os.open

    def as_another_member(file, flags, *args, **kwargs):
        if os.path.basename(file) == ".lock" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", as_another_member)
    add_adapters(folder, adapters[1:2], workers=0, progress=False)
    remove_adapters(folder, ["a0"])
    assert Library.load(folder).names == ["a1"]


def test_a_build_that_replaces_a_folder_removes_what_dead_builds_left(adapters, tmp_path, monkeypatch):
    """An interrupted build or add keeps its temp file and journal for a resume; a build of other
    adapters replaces the folder whole, so nothing can resume them any more: it removes them (as a
    library file's build removes what dead builds to its path left), saying what is thrown away."""
    folder = tmp_path / "lib"
    count_alignments(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _folder(adapters[:4], folder)
    assert not (folder / MANIFEST).exists() and _entries(folder)  # the kept temp file and journal
    count_alignments(monkeypatch)
    with pytest.warns(UserWarning, match=r"removing what a killed run to this folder left \(2 adapters written"):
        _folder(adapters[4:], folder)
    assert _entries(folder) == sorted([MANIFEST, *_parts(folder)]) and Library.load(folder).names == ["a4", "a5"]
    count_alignments(monkeypatch, fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        add_adapters(folder, adapters[:3], workers=0, progress=False)
    assert len(_entries(folder)) == 4  # the add's temp file and journal too
    count_alignments(monkeypatch)
    with pytest.warns(UserWarning, match=r"removing what a killed run to this folder left \(1 adapters written"):
        _folder(adapters[:2], folder)
    assert _entries(folder) == sorted([MANIFEST, *_parts(folder)]) and Library.load(folder).names == ["a0", "a1"]


def test_compact_to_a_file_that_races_a_commit_reads_the_folder_again(adapters, tmp_path, monkeypatch):
    """compact -o reads the folder as a load does, without the lock: a writer that commits meanwhile
    deletes the parts it replaced, so it reads the new manifest's parts; and a part it cannot open
    leaves no other part open."""
    from lag_triton.library import compact_folder, writer
    from lag_triton.library import folder as folder_module

    folder = _folder(adapters[:2], tmp_path / "lib")
    add_adapters(folder, adapters[2:4], workers=0, progress=False)
    real_plans, calls = folder_module.stored_module_plans, []

    def racing(stored):  # another process removes a3 (rewriting its part) as compact reads the first part
        if not calls:
            remove_adapters(folder, ["a3"])
        calls.append(stored.path.name)
        return real_plans(stored)

    monkeypatch.setattr(folder_module, "stored_module_plans", racing)
    report = compact_folder(folder, tmp_path / "merged.safetensors")
    assert report.adapters == 3 and len(calls) > 2  # read again
    merged = (tmp_path / "merged.safetensors").read_bytes()
    assert merged == _file(adapters[:3], tmp_path / "scratch.safetensors")
    monkeypatch.undo()
    real_init, opened = writer.RowSource.__init__, []

    def second_fails(self, stored):
        if opened:
            raise PermissionError(13, "Permission denied", str(stored.path))
        real_init(self, stored)
        opened.append(self.fd)

    monkeypatch.setattr(writer.RowSource, "__init__", second_fails)
    with pytest.raises(PermissionError):
        compact_folder(folder, tmp_path / "again.safetensors")
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in opened if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in held if f.startswith(str(folder))]  # the part opened first was closed
    assert not (tmp_path / "again.safetensors").exists()

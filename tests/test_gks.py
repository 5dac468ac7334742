"""General knowledge subtraction (GKS): PEFT's Arrow ``use_gks`` reproduced, the means kept in the
file and subtracted again by ``add``, and every mismatch refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lag_triton
from lag_triton import AdapterError, Library, LibraryFormatError
from lag_triton.__main__ import main
from lag_triton.library import GeneralKnowledge, add_adapters, build_library, remove_adapters

from factories import (
    VOCAB,
    library_info,
    make_adapter,
    peft_arrow_logits,
    read_raw,
    replace_tensor,
    set_library_info,
    tiny_model,
    write_raw,
)

SCALING = 8.0 / 4  # make_adapter's alpha / r


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Five task adapters and two general ones, rank 4 on the same modules of a tiny Llama."""
    tmp = tmp_path_factory.mktemp("gks")
    model = tiny_model("llama")
    tasks = [make_adapter(model, tmp / f"task{i}", seed=60 + i) for i in range(5)]
    general = [make_adapter(model, tmp / f"general{i}", seed=90 + i) for i in range(2)]
    return model, tasks, general


def _factors(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (lora_A, lora_B) in float64, read straight from the adapter file."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = (a.double(), tensors[key.replace("lora_A", "lora_B")].double())
    return out


def test_gks_library_reproduces_peft_arrow_with_gks(folders):
    """PEFT's create_arrow_model(use_gks=True) subtracts the general adapters' mean lora_A and lora_B
    from every task adapter; a library built with general_adapters= routes to PEFT's logits."""
    model, tasks, general = folders
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    library = Library.from_peft(tasks, general_adapters=general, progress=False)
    want = peft_arrow_logits(model, library, tasks, ids, top_k=3, temperature=0.5, general_paths=general)

    plain = Library.from_peft(tasks, progress=False)
    lag_triton.patch(model, plain, router="arrow", k=3, top_m=3, temperature=0.5)
    with torch.no_grad():
        without = model(input_ids=ids).logits
    lag_triton.unpatch(model)
    assert (without - want).abs().max() > 1e-3  # the subtraction matters here

    lag_triton.patch(model, library, router="arrow", k=3, top_m=3, temperature=0.5)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    lag_triton.unpatch(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gks_aligns_the_factor_wise_difference(folders):
    """Checked against dense matrices from the files: every adapter's B*A* is s (B - B̄)(A - Ā) and its
    prototype the top right singular vector of that update; the library keeps Ā, B̄ in float32."""
    _, tasks, general = folders
    library = Library.from_peft(tasks, general_adapters=general, progress=False)
    means = {}
    for module, (a, b) in _factors(general[0]).items():
        a1, b1 = _factors(general[1])[module]
        means[module] = ((a + a1) / 2, (b + b1) / 2)
    assert library.general.names == ["general0", "general1"]
    assert set(library.general.means) == set(means)
    for module, (a_mean, b_mean) in means.items():
        stored = library.general.means[module]
        assert stored[0].dtype == torch.float32
        torch.testing.assert_close(stored[0], a_mean.float(), rtol=0, atol=0)
        torch.testing.assert_close(stored[1], b_mean.float(), rtol=0, atol=0)
    for i, folder in enumerate(tasks):
        for module, (a, b) in _factors(folder).items():
            a_mean, b_mean = (t.double() for t in library.general.means[module])
            delta = SCALING * (b - b_mean) @ (a - a_mean)
            m = library.modules[module]
            row = int((m.adapter_ids == i).nonzero())
            torch.testing.assert_close(m.b_star[row].double() @ m.a_star[row].double(), delta, rtol=1e-5, atol=1e-6)
            top = torch.linalg.svd(delta).Vh[0]
            assert torch.dot(top, m.prototypes[row].double()).abs() > 1 - 1e-6, (module, i)


def _bytes(path) -> bytes:
    return path.read_bytes()


def test_gks_file_round_trip_and_every_build_path_agree(folders, tmp_path):
    _, tasks, general = folders
    memory = Library.from_peft(tasks, general_adapters=general, progress=False)
    memory.save(tmp_path / "memory.safetensors")
    build_library(tasks, tmp_path / "streamed.safetensors", general_adapters=general, workers=0, progress=False)
    build_library(tasks, tmp_path / "workers.safetensors", general_adapters=general, workers=2, progress=False)
    assert _bytes(tmp_path / "memory.safetensors") == _bytes(tmp_path / "streamed.safetensors")
    assert _bytes(tmp_path / "memory.safetensors") == _bytes(tmp_path / "workers.safetensors")
    Library.from_peft(tasks, general_adapters=general, progress=False, workers=2).save(tmp_path / "sent.safetensors")
    assert _bytes(tmp_path / "memory.safetensors") == _bytes(tmp_path / "sent.safetensors")

    header, _ = read_raw(tmp_path / "memory.safetensors")
    assert header["__metadata__"]["format_version"] == "2"
    assert library_info(header)["general"] == {"names": ["general0", "general1"], "modules": sorted(memory.modules)}
    loaded = Library.load(tmp_path / "memory.safetensors")
    assert loaded.general.names == memory.general.names and "GKS over 2 general adapters" in repr(loaded)
    for module, (a, b) in memory.general.means.items():
        assert torch.equal(loaded.general.means[module][0], a) and torch.equal(loaded.general.means[module][1], b)
    assert loaded.to(dtype=torch.bfloat16).general is loaded.general  # the means stay float32

    Library.from_peft(tasks, progress=False).save(tmp_path / "plain.safetensors")
    plain_header, _ = read_raw(tmp_path / "plain.safetensors")
    assert plain_header["__metadata__"]["format_version"] == "1"  # older readers still read plain libraries
    assert "general" not in library_info(plain_header) and not any(k.startswith("general::") for k in plain_header)
    assert Library.load(tmp_path / "plain.safetensors").general is None


def test_add_and_remove_keep_and_reuse_the_means(folders, tmp_path):
    """add subtracts the stored means from the new adapters: a grown library has the bytes of one
    built from scratch with the same general adapters; remove keeps the means."""
    _, tasks, general = folders
    grown = tmp_path / "grown.safetensors"
    build_library(tasks[:3], grown, general_adapters=general, progress=False)
    add_adapters(grown, tasks[3:], progress=False, workers=0)
    build_library(tasks, tmp_path / "scratch.safetensors", general_adapters=general, progress=False)
    assert _bytes(grown) == _bytes(tmp_path / "scratch.safetensors")

    remove_adapters(grown, ["task1"])
    rest = [t for t in tasks if t.name != "task1"]
    build_library(rest, tmp_path / "rest.safetensors", general_adapters=general, progress=False)
    assert _bytes(grown) == _bytes(tmp_path / "rest.safetensors")


def test_mismatched_adapters_are_refused_before_anything_is_written(folders, tmp_path):
    model, tasks, general = folders
    rank2 = make_adapter(model, tmp_path / "rank2", seed=7, r=2)
    attention = make_adapter(model, tmp_path / "attention", seed=8, targets=["q_proj", "k_proj"])
    out = tmp_path / "lib.safetensors"

    with pytest.raises(AdapterError, match=r"rank2.*rank 2.*general adapters' have rank 4"):
        build_library([tasks[0], rank2], out, general_adapters=general, progress=False)
    with pytest.raises(AdapterError, match=r"attention.*targets module .*k_proj.*general adapters \('general0'"):
        Library.from_peft([attention], general_adapters=general, progress=False)
    with pytest.raises(AdapterError, match=r"general adapter .*rank2.: module .* has rank, d_in, d_out = \(2, "):
        Library.from_peft(tasks, general_adapters=[general[0], rank2], progress=False)
    with pytest.raises(AdapterError, match=r"general adapter .*attention.: targets other modules than general adapter"):
        Library.from_peft(tasks, general_adapters=[general[0], attention], progress=False)
    with pytest.raises(ValueError, match="general_adapters is empty"):
        Library.from_peft(tasks, general_adapters=[], progress=False)
    assert not out.exists()

    # a library subtracting general knowledge refuses an adapter the means do not fit, unchanged
    build_library(tasks[:2], out, general_adapters=general, progress=False)
    before = _bytes(out)
    with pytest.raises(AdapterError, match=r"rank2.*rank 2"):
        add_adapters(out, [rank2], progress=False)
    assert _bytes(out) == before


def test_attention_only_adapters_take_the_general_means_of_their_modules(folders, tmp_path):
    """Task adapters may target a subset of the general adapters' modules: the file keeps the means
    of every general module, so a later add may bring the others."""
    model, tasks, general = folders
    attention = make_adapter(model, tmp_path / "attention", seed=9, targets=["q_proj", "v_proj"])
    out = tmp_path / "lib.safetensors"
    build_library([attention], out, general_adapters=general, progress=False)
    lib = Library.load(out)
    assert set(lib.modules) < set(lib.general.means)
    add_adapters(out, tasks[:1], progress=False)
    build_library([attention, tasks[0]], tmp_path / "scratch.safetensors", general_adapters=general, progress=False)
    assert _bytes(out) == _bytes(tmp_path / "scratch.safetensors")


@pytest.fixture
def gks_file(folders, tmp_path):
    _, tasks, general = folders
    path = tmp_path / "gks.safetensors"
    build_library(tasks[:2], path, general_adapters=general, progress=False)
    return path


def _damaged(path, change) -> object:
    header, data = read_raw(path)
    header, data = change(header, data)
    return write_raw(path.with_name("bad.safetensors"), header, data)


def _drop_module_means(header, data):
    info = library_info(header)
    info["general"]["modules"] = info["general"]["modules"][1:]
    return set_library_info(header, info), data


def _float64_mean(header, data):
    name = next(k for k in header if k.startswith("general::"))
    begin, end = header[name]["data_offsets"]
    as_f64 = torch.frombuffer(bytearray(data[begin:end]), dtype=torch.float32).double()
    return replace_tensor(header, data, name, as_f64.numpy().tobytes(), dtype="F64")


def _rank_mismatch(header, data):
    name = next(k for k in header if k.startswith("general::") and k.endswith("::lora_B"))
    d_out, r = header[name]["shape"]
    begin, _ = header[name]["data_offsets"]
    return replace_tensor(header, data, name, data[begin : begin + 4 * d_out * (r - 1)], shape=[d_out, r - 1])


def _nan_mean(header, data):
    name = next(k for k in header if k.startswith("general::"))
    begin, end = header[name]["data_offsets"]
    return header, data[:begin] + torch.full(((end - begin) // 4,), float("nan")).numpy().tobytes() + data[end:]


def _no_names(header, data):
    info = library_info(header)
    info["general"]["names"] = []
    return set_library_info(header, info), data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop_module_means, r"has no general means"),
        (_float64_mean, r"general knowledge: tensor 'general::.*' must be a 2-D torch.float32, got F64"),
        (_rank_mismatch, r"lora_A mean has rank 4, lora_B mean 3"),
        (_no_names, r"'general' must be an object with a non-empty 'names' list"),
        (_nan_mean, r"general knowledge, module .*: the mean factors hold NaN or inf"),
    ],
)
def test_damaged_general_knowledge_is_refused_naming_the_field(gks_file, change, message):
    bad = _damaged(gks_file, change)
    with pytest.raises(LibraryFormatError, match=message):
        Library.load(bad)


def test_library_refuses_general_means_that_do_not_fit_its_modules(folders):
    _, tasks, general = folders
    library = Library.from_peft(tasks[:2], general_adapters=general, progress=False)
    module = next(iter(library.modules))
    wide = dict(library.general.means)
    wide[module] = (torch.zeros(4, 7), wide[module][1])
    with pytest.raises(ValueError, match=rf"module '{module}': the general means are 7 x"):
        Library(library.names, library.modules, general=GeneralKnowledge(library.general.names, wide))
    fewer = {m: v for m, v in library.general.means.items() if m != module}
    with pytest.raises(ValueError, match=rf"no means for module '{module}'"):
        Library(library.names, library.modules, general=GeneralKnowledge(library.general.names, fewer))
    with pytest.raises(TypeError, match="general must be a GeneralKnowledge or None, got dict"):
        Library(library.names, library.modules, general=library.general.means)
    with pytest.raises(ValueError, match="expected \\[r, d_in\\] and \\[d_out, r\\] in torch.float32"):
        GeneralKnowledge(["g"], {module: (wide[module][0].double(), wide[module][1].double())})


def test_cli_build_with_general_then_info_and_add(folders, tmp_path, capsys):
    _, tasks, general = folders
    out = tmp_path / "lib.safetensors"
    assert main(["build", *map(str, tasks[:2]), "-o", str(out), "--general", *map(str, general), "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "mean of 2 general adapters subtracted (GKS): general0, general1" in capsys.readouterr().out
    assert main(["add", str(out), str(tasks[2]), "-q"]) == 0
    scratch = tmp_path / "scratch.safetensors"
    build_library(tasks[:3], scratch, general_adapters=general, progress=False)
    assert _bytes(out) == _bytes(scratch)
    assert json.loads(read_raw(out)[0]["__metadata__"]["library"])["general"]["names"] == ["general0", "general1"]

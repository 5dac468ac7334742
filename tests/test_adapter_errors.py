"""Malformed PEFT adapter folders raise AdapterError naming the folder, file and field (issue 11, item 10)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lag_triton import AdapterError, Library

from factories import make_adapter, read_raw, replace_tensor, tiny_model, write_raw

UP_A = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_adapter(
        tiny_model("llama"), tmp_path_factory.mktemp("good") / "a0", seed=0, targets=["q_proj", "up_proj"]
    )


@pytest.fixture
def adapter(good, tmp_path):
    import shutil

    return shutil.copytree(good, tmp_path / "a0")


def _config(path):
    return json.loads((path / "adapter_config.json").read_text())


def _raises(path, *needles):
    with pytest.raises(AdapterError) as info:
        Library.from_peft([path], progress=False)
    message = str(info.value)
    assert str(path) in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[]", "must hold a JSON object, got a JSON list"),
        ("null", "got a JSON null"),
        ('"x"', "got a JSON string"),
        ("3", "got a JSON number"),
        ("{", "is not valid JSON"),
    ],
)
def test_config_that_is_not_an_object(adapter, text, needle):
    (adapter / "adapter_config.json").write_text(text)
    _raises(adapter, "adapter_config.json", needle)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"lora_alpha": float("nan")}, "field lora_alpha=nan must be a finite non-zero number"),
        ({"lora_alpha": float("inf")}, "field lora_alpha=inf must be a finite non-zero number"),
        ({"lora_alpha": True}, "field lora_alpha=True"),
        ({"lora_alpha": 0}, "field lora_alpha=0 must be a finite non-zero number"),
        ({"arrow_config": {"top_k": 2}}, "field arrow_config="),
        ({"alpha_pattern": {"q_proj": float("nan")}}, "field alpha_pattern="),
        ({"alpha_pattern": {"q_proj": "x"}}, "maps 'q_proj' to 'x'; expected a finite non-zero number"),
        ({"r": 4.0}, "field r=4.0 must be a positive integer"),
        ({"r": "4"}, "field r='4' must be a positive integer"),
        ({"rank_pattern": {"q_proj(": 4}}, "has key 'q_proj(', which is not a valid regular expression"),
        ({"rank_pattern": [1, 2]}, "field rank_pattern=[1, 2] must be an object"),
        ({"rank_pattern": {"q_proj": 2.5}}, "maps 'q_proj' to 2.5; expected a positive integer"),
        ({"use_rslora": "yes"}, "field use_rslora='yes' must be true or false"),
        ({"use_dora": {"a": 1}}, "field use_dora={'a': 1} is refused"),
        ({"peft_type": ["LORA"]}, "field peft_type=['LORA'] is refused"),
    ],
)
def test_config_fields_of_the_wrong_type_or_value(adapter, changes, needle):
    cfg = _config(adapter)
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))  # json writes NaN / Infinity as Python does
    _raises(adapter, "adapter_config.json", needle)


def test_base_model_that_is_not_a_string_is_ignored(adapter):
    cfg = _config(adapter)
    cfg["base_model_name_or_path"] = ["a", "b"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert Library.from_peft([adapter], progress=False).base_model is None


@pytest.mark.parametrize(
    "content,needle",
    [
        ("list", "holds a list; expected a dict of tensor name -> tensor"),
        ("tensor", "holds a Tensor"),
        ("int value", "is a int, not a tensor"),
        ("int key", "has a key 7 (int); tensor names must be strings"),
        ("nested", "is a dict, not a tensor"),
        ("int tensor", "has dtype torch.int32; LoRA factors must be"),
    ],
)
def test_bin_files_that_are_not_a_dict_of_float_tensors(adapter, content, needle):
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    obj = {
        "list": list(weights.values()),
        "tensor": weights[UP_A],
        "int value": {**weights, UP_A: 3},
        "int key": {**weights, 7: weights[UP_A]},
        "nested": {**weights, UP_A: {"w": weights[UP_A]}},
        "int tensor": {**weights, UP_A: weights[UP_A].to(torch.int32)},
    }[content]
    torch.save(obj, adapter / "adapter_model.bin")
    _raises(adapter, "adapter_model.bin", needle)


@pytest.mark.parametrize("dtype,relabel", [("I32", False), ("BOOL", False), ("U8", False), ("I32", True)])
def test_non_float_lora_tensors_are_refused(adapter, dtype, relabel):
    file = adapter / "adapter_model.safetensors"
    header, data = read_raw(file)
    entry = header[UP_A]
    if relabel:  # the same 4-byte words, read as integers
        entry["dtype"] = dtype
    else:
        torch_dtype = {"I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}[dtype]
        raw = torch.ones(entry["shape"], dtype=torch_dtype).numpy().tobytes()
        header, data = replace_tensor(header, data, UP_A, raw, dtype=dtype)
    write_raw(file, header, data)
    _raises(adapter, "adapter_model.safetensors", f"tensor {UP_A!r} has dtype {dtype}; LoRA factors must be")


def test_damaged_adapter_safetensors(adapter):
    file = adapter / "adapter_model.safetensors"
    header, data = read_raw(file)
    header[UP_A]["data_offsets"] = [0, 8]
    write_raw(file, header, data)
    _raises(adapter, "adapter_model.safetensors", "needs")
    write_raw(file, None, data, header_bytes=b"[]")
    _raises(adapter, "adapter_model.safetensors", "its header is a JSON list")


def test_a_single_folder_is_one_adapter(adapter):
    one = Library.from_peft(adapter, progress=False)
    listed = Library.from_peft([adapter], progress=False)
    assert one.names == listed.names == ["a0"]
    for name, m in one.modules.items():
        assert torch.equal(m.a_star, listed.modules[name].a_star)


@pytest.mark.parametrize(
    "paths,names,error,needle",
    [
        ([3], None, TypeError, "adapter folders must be paths"),
        (["x"], "x", TypeError, "adapter names must be a list of strings, got str"),
        (["x", "y"], ["a", "a"], ValueError, "adapter names must be unique; repeated: ['a']"),
        (["x"], [1], TypeError, "adapter names must be strings"),
        (["/r1/ckpt-500", "/r2/ckpt-500"], None, ValueError, "2 folders are named 'ckpt-500' (/r1/ckpt-500, /r2/"),
    ],
)
def test_bad_paths_and_names(paths, names, error, needle):
    with pytest.raises(error) as info:
        Library.from_peft(paths, names=names, progress=False)
    assert needle in str(info.value)


def test_update_that_overflows_float16_storage(adapter):
    cfg = _config(adapter)
    cfg["lora_alpha"] = 1e9
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"overflows torch.float16 .*; build in float32") as info:
        Library.from_peft([adapter], dtype=torch.float16, progress=False)
    assert str(adapter) in str(info.value)
    assert Library.from_peft([adapter], progress=False).modules  # float32 holds it

"""Fuzzing library files and adapter folders (issue 11): every mutated input either raises the
documented error naming the file, or gives exactly what an independent reading of the input says.

    library header / data  -> LibraryFormatError naming the file, or a Library whose tensors equal a
                              plain decode of the file's bytes (and which patches and runs a model)
    adapter config / file  -> AdapterError naming the folder, or a Library whose every update
                              B*A* equals s * B A with r and s derived by PEFT's own pattern rules

Hypothesis runs derandomized (same examples on every run, no example database), with bounded
example counts so the whole file takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import lag_triton
from lag_triton import AdapterError, Library, LibraryFormatError

from factories import VOCAB, make_adapter, read_raw, tiny_model, write_raw

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="lag_fuzz_") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def adapter_dir(workdir, model):
    return make_adapter(model, workdir / "adapter", seed=0, r=3, targets=["q_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def library_file(workdir, model):
    paths = [make_adapter(model, workdir / f"a{i}", seed=i, r=2 + i, targets=["up_proj", "v_proj"]) for i in range(3)]
    path = workdir / "lib.safetensors"
    Library.from_peft(paths, progress=False).save(path)
    return path


# -- library files ----------------------------------------------------------------------------------
def _decode(header: dict, data: bytes) -> dict[str, torch.Tensor]:
    """The file's tensors read the plain way: the bytes its header points at, as its dtype and shape."""
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        raw = bytearray(data[begin:end])
        dtype = DTYPES[e["dtype"]]
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(e["shape"])
    return out


def _check_against_reference(path: Path, header, data, model) -> None:
    try:
        lib = Library.load(path)
    except LibraryFormatError as e:
        assert str(path) in str(e), str(e)
        event("refused")
        return
    event("loaded")
    info = json.loads(header["__metadata__"]["library"])
    assert lib.names == info["names"] and lib.base_model == info.get("base_model")
    assert list(lib.modules) == info["modules"]
    tensors = _decode(header, data)
    for module, m in lib.modules.items():
        for field in ("a_star", "b_star", "prototypes", "adapter_ids", "ranks"):
            got, want = getattr(m, field), tensors.get(f"{module}::{field}")
            if want is None:
                assert field == "ranks" and got is None
                continue
            assert got.shape == want.shape and torch.equal(got, want.to(got.dtype)), (module, field)
        ids = m.adapter_ids
        assert ((ids >= 0) & (ids < len(lib.names))).all() and ids.unique().numel() == ids.numel()
        assert all(torch.isfinite(getattr(m, f)).all() for f in ("a_star", "b_star", "prototypes"))
    try:
        lag_triton.patch(model, lib, k=2)
    except (ValueError, TypeError) as e:  # a module name or shape the model does not have
        assert "module" in str(e)
        return
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.arange(6)[None] % VOCAB).logits
        assert logits.shape == (1, 6, VOCAB) and torch.isfinite(logits).all()
    finally:
        lag_triton.unpatch(model)


def _paths(header: dict) -> list[tuple]:
    """Every place in a library header a mutation can hit (library metadata parsed as JSON)."""
    out = [("meta", k) for k in header["__metadata__"]]
    info = json.loads(header["__metadata__"]["library"])
    out += [("info", k) for k in info]
    out += [("info", k, i) for k in ("names", "modules") for i in range(len(info[k]))]
    for name, e in header.items():
        if name != "__metadata__":
            out += [("tensor", name, f) for f in e]
            out += [("tensor", name, f, i) for f in ("shape", "data_offsets") for i in range(len(e[f]))]
    return out


def _near_misses(value):
    """Values close to a valid one: the mutations most likely to be wrongly accepted."""
    if isinstance(value, bool) or value is None:
        return [None, not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2, -value, float(value), str(value), 0]
    if isinstance(value, str):
        return [
            "",
            value[:-1],
            value + "x",
            "F16",
            "BF16",
            "I32",
            "F64",
            "U8",
            "abc",
            "2",
            "0",
            "model.layers.1.mlp.up_proj",
            "lag_triton.library",
        ]
    if isinstance(value, list):
        return [value[:-1], value + value[-1:], value[::-1], [], {}]
    return [None]


def _get(container, keys):
    for k in keys:
        container = container[k]
    return container


@st.composite
def header_mutations(draw, header):
    header = copy.deepcopy(header)
    info = json.loads(header["__metadata__"]["library"])
    path = draw(st.sampled_from(_paths(header)))
    kind, keys = path[0], path[1:]
    root = {"meta": header["__metadata__"], "info": info, "tensor": header}[kind]
    parent, key = _get(root, keys[:-1]), keys[-1]
    op = draw(st.sampled_from(["near", "near", "json", "delete"]))
    if op == "delete":
        del parent[key]
    elif op == "near":
        parent[key] = draw(st.sampled_from(_near_misses(parent[key])))
    else:
        parent[key] = draw(JSON)
    if not (kind == "meta" and key == "library"):
        header["__metadata__"]["library"] = json.dumps(info)
    return header


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_fuzz_library_headers(library_file, workdir, model, data):
    header, raw = read_raw(library_file)
    mutated = data.draw(header_mutations(header))
    path = write_raw(workdir / "fuzz_header.safetensors", mutated, raw)
    _check_against_reference(path, mutated, raw, model)


@settings(FUZZ, max_examples=120)
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_library_data_bytes(library_file, workdir, model, flips):
    header, data = read_raw(library_file)
    data = bytearray(data)
    for where, value in flips:
        data[int(where * len(data))] = value
    path = write_raw(workdir / "fuzz_data.safetensors", header, bytes(data))
    _check_against_reference(path, header, bytes(data), model)


@settings(FUZZ, max_examples=100)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_fuzz_truncated_library_files(library_file, workdir, cut):
    raw = library_file.read_bytes()
    path = workdir / "fuzz_cut.safetensors"
    path.write_bytes(raw[: int(cut * len(raw))])
    with pytest.raises(LibraryFormatError) as info:
        Library.load(path)
    assert str(path) in str(info.value)


# -- adapter folders -----------------------------------------------------------------------------------
MODULE_PATTERNS = [
    "q_proj",
    "up_proj",
    "down_proj",
    "layers.0.mlp.up_proj",
    "layers.1.*",
    ".*",
    "mlp\\..*",
    "(",
    "q_proj(",
    "[a-",
    "model.layers.0.self_attn.q_proj",
]
CONFIG_FIELDS = {
    "r": st.sampled_from([3, 2, 4, 0, -3, 3.0, "3", True, None, 2**70]),
    "lora_alpha": st.sampled_from([8, 8.0, 0.5, 1e300, 0, -2, float("nan"), float("inf"), "8", None, True]),
    "use_rslora": st.sampled_from([True, False, None, 1, "yes"]),
    "rank_pattern": st.none()
    | st.dictionaries(st.sampled_from(MODULE_PATTERNS), st.sampled_from([3, 2, 4, 1, 0, 3.0, "3"]), max_size=3),
    "alpha_pattern": st.none()
    | st.dictionaries(
        st.sampled_from(MODULE_PATTERNS), st.sampled_from([1, 2.5, 16, 0, -1, float("nan"), "x"]), max_size=3
    ),
    "use_dora": st.sampled_from([False, None, True, 0, "false"]),
    "bias": st.sampled_from(["none", "all", "lora_only", None, 0]),
    "modules_to_save": st.sampled_from([None, [], ["lm_head"], "lm_head"]),
    "peft_type": st.sampled_from(["LORA", "IA3", "lora", None]),
    "fan_in_fan_out": st.sampled_from([False, True, None]),
    "target_modules": JSON,
    "base_model_name_or_path": JSON,
}


def _expected_update(cfg: dict, module: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s * B A with PEFT's own pattern lookup (peft.utils.other.get_pattern_key)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg["lora_alpha"])
    assert r == a.shape[0], (module, r, a.shape)
    s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return s * b.double() @ a.double()


def _check_adapter(folder: Path) -> None:
    try:
        lib = Library.from_peft([folder], dtype=torch.float64, progress=False)
    except AdapterError as e:
        assert str(folder) in str(e), str(e)
        event("refused")
        return
    event("built")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    for module, m in lib.modules.items():
        a = weights[f"base_model.model.{module}.lora_A.weight"]
        b = weights[f"base_model.model.{module}.lora_B.weight"]
        want = _expected_update(cfg, module, a, b)
        got = m.b_star[0] @ m.a_star[0]
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item()), module


@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_fuzz_adapter_configs(adapter_dir, workdir, data):
    folder = workdir / "fuzz_cfg"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapter_dir, folder)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    for name in data.draw(st.lists(st.sampled_from(sorted(CONFIG_FIELDS)), min_size=1, max_size=3, unique=True)):
        if data.draw(st.integers(0, 4), label=f"delete {name}?") == 0:
            cfg.pop(name, None)
        else:
            cfg[name] = data.draw(CONFIG_FIELDS[name], label=name)
    if data.draw(st.integers(0, 9)) == 0:
        cfg = data.draw(JSON)  # not an object at all
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    _check_adapter(folder)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_adapter_tensors(adapter_dir, workdir, data):
    folder = workdir / "fuzz_tensors"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapter_dir, folder)
    file = folder / "adapter_model.safetensors"
    header, raw = read_raw(file)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "bytes", "drop", "rename"]))
    if field == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(sorted(DTYPES)))
    elif field in ("shape", "data_offsets"):
        value = list(entry[field])
        i = data.draw(st.integers(0, len(value) - 1))
        value[i] = data.draw(st.sampled_from([value[i] + 1, value[i] - 1, value[i] * 2, 0, -1]))
        entry[field] = value
    elif field == "bytes":
        raw = bytearray(raw)
        begin, end = entry["data_offsets"]
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(begin, end - 1))] = data.draw(st.integers(0, 255))
        raw = bytes(raw)
    elif field == "drop":
        del header[name]
    else:
        header[name.replace("lora_A", "lora_X") if "lora_A" in name else name + ".extra"] = header.pop(name)
    write_raw(file, header, raw)
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:  # the reference reader must accept the file
            for k in f.keys():
                f.get_tensor(k)
    except Exception:  # noqa: BLE001 - unreadable for safetensors too: we must refuse it
        with pytest.raises(AdapterError) as info:
            Library.from_peft([folder], progress=False)
        assert str(folder) in str(info.value)
        event("refused (unreadable for safetensors too)")
        return
    _check_adapter(folder)


# -- JSON that parses but that Python's reader refuses ------------------------------------------------
_UNREADABLE_JSON = {
    "huge_int": '{"r": ' + "9" * 5000 + "}",  # ValueError: over sys.get_int_max_str_digits()
    "deep": "[" * 100_000 + "]" * 100_000,  # RecursionError
}


@pytest.mark.parametrize("kind", sorted(_UNREADABLE_JSON))
@pytest.mark.parametrize("where", ["adapter_config", "header", "library_metadata", "folder_manifest", "journal"])
def test_json_python_cannot_read_is_the_documented_error(adapter_dir, library_file, workdir, kind, where):
    from lag_triton.library.folder import MANIFEST, read_folder

    text = _UNREADABLE_JSON[kind]
    case = workdir / f"unreadable_{where}_{kind}"
    if where == "adapter_config":
        shutil.copytree(adapter_dir, case)
        (case / "adapter_config.json").write_text(text)
        with pytest.raises(AdapterError, match=f"{case.name}.*adapter_config.json is not valid JSON"):
            Library.from_peft([case], progress=False)
    elif where == "journal":
        from lag_triton.library.resume import journal_lines

        case.write_text(text + "\n" + json.dumps({"index": 0, "folder": "a", "stamp": 1}) + "\n")
        assert [entry[:3] for entry in journal_lines(case)] == [(0, "a", 1)]
    elif where == "folder_manifest":
        case.mkdir()
        (case / MANIFEST).write_text(text)
        with pytest.raises(LibraryFormatError, match=f"{case.name}.*{MANIFEST} is not JSON"):
            read_folder(case)
    else:
        header, data = read_raw(library_file)
        path = case.with_suffix(".safetensors")
        if where == "header":
            write_raw(path, None, data, header_bytes=text.encode() + b" " * (-len(text) % 8))
        else:
            header["__metadata__"]["library"] = text
            write_raw(path, header, data)
        with pytest.raises(LibraryFormatError, match=f"{path.name}.*not JSON"):
            Library.load(path)

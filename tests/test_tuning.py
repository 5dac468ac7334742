"""Per-GPU launch tables (lag_triton/kernels/triton/tuning.py): what a table may say, how an entry
is found, and that every configuration a table may choose computes the reference's answer."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from lag_triton.kernels import reference, resolve_backend

try:
    resolve_backend("triton", "cuda" if torch.cuda.is_available() else "cpu")
except RuntimeError as exc:  # pragma: no cover - triton is part of the test extra
    pytest.skip(f"triton backend unavailable: {exc}", allow_module_level=True)

tuning = importlib.import_module("lag_triton.kernels.triton.tuning")
arrow = importlib.import_module("lag_triton.kernels.triton.arrow_topk")
apply = importlib.import_module("lag_triton.kernels.triton.lora_apply")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ENTRIES = [
    {"op": "arrow_select", "k_pad": 32, "t": [1, 1], "n": [1, 3162], "config": {"BLOCK": 256, "CAP": 256}},
    {"op": "arrow_select", "k_pad": 32, "t": [1, 1 << 30], "config": {"BLOCK": 512, "CAP": 1024}},
    {
        "op": "lora_apply",
        "t": [64, 1 << 30],
        "d_out": [8192, 8192],
        "config": {"BLOCK_T": 16, "num_warps": 8},
        "measured": {"ms": 0.1, "default_ms": 0.2},
    },
]


def test_lookup_takes_the_first_matching_entry():
    assert tuning.lookup(ENTRIES, "arrow_select", k_pad=32, t=1, n=1000) == {"BLOCK": 256, "CAP": 256}
    assert tuning.lookup(ENTRIES, "arrow_select", k_pad=32, t=1, n=5000) == {"BLOCK": 512, "CAP": 1024}
    assert tuning.lookup(ENTRIES, "arrow_select", k_pad=64, t=1, n=1000) is None  # exact key differs
    assert tuning.lookup(ENTRIES, "lora_apply", t=2048, d_out=8192, r=6) == {"BLOCK_T": 16, "num_warps": 8}
    assert tuning.lookup(ENTRIES, "lora_apply", t=32, d_out=8192, r=6) is None
    assert tuning.lookup(ENTRIES, "lora_apply", t=2048, d_out=3072, r=6) is None


@pytest.mark.parametrize(
    "entry,needle",
    [
        ({"op": "arrow_select", "config": {"BLOCK": 100}}, "BLOCK=100 must be a positive power of two"),
        ({"op": "arrow_select", "config": {"BLOCKS": 64}}, "unknown keys \\['BLOCKS'\\]"),
        ({"op": "gemm", "config": {}}, "unknown tuned op 'gemm'"),
        ({"op": "lora_apply", "t": [5, 1], "config": {}}, "range t=\\[5, 1\\]"),
        ({"op": "lora_apply", "t": "small", "config": {}}, "key t='small'"),
        ({"op": "lora_apply", "config": {"num_warps": 32}}, "num_warps=32 must be <= 16"),
        # loaded, these failed at launch (CAP under the default's) or never matched (a key no launcher passes)
        ({"op": "arrow_select", "config": {"BLOCK": 4096}}, "gives BLOCK and CAP together"),
        ({"op": "arrow_select", "config": {"BLOCK": 128, "CAP": 64}}, "CAP=64 must be >= BLOCK=128"),
        ({"op": "arrow_select", "N": [1, 5], "config": {}}, "looked up by \\['k_pad', 'n', 't'\\], not 'N'"),
        ({"op": "lora_apply", "config": {"BLOCK_O": 1 << 30}}, "BLOCK_O=1073741824 must be <= 65536"),
    ],
)
def test_a_bad_table_names_the_file_and_the_entry(tmp_path, entry, needle):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"card": "X", "entries": [ENTRIES[0], entry]}))
    with pytest.raises(ValueError, match=f"tuning table {path}, entry 1: .*{needle}"):
        tuning.load_table(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="expected an object with 'card'"):
        tuning.load_table(path)


def _int_data(*shape, seed):
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float().to(DEVICE)


@pytest.mark.parametrize(
    "config",
    [{"BLOCK": 64, "CAP": 64}, {"BLOCK": 128, "CAP": 256, "num_warps": 2}, {"BLOCK": 32, "CAP": 64, "num_warps": 8}],
)
def test_every_select_config_a_table_may_choose_is_exact(config):
    x, p = _int_data(6, 24, seed=1), _int_data(700, 24, seed=2)
    with tuning.forced("arrow_select", config):
        idx, scores = arrow.arrow_topk(x, p, 20)
    ref_idx, ref_scores = reference.arrow_topk(x, p, 20)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)


def test_a_select_config_whose_buffer_cannot_hold_a_block_is_refused():
    with pytest.raises(ValueError, match="CAP=64 must be >= BLOCK=128"):
        with tuning.forced("arrow_select", {"BLOCK": 128, "CAP": 64}):
            pass


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_T": 1, "BLOCK_O": 32, "num_warps": 1},
        {"BLOCK_T": 16, "BLOCK_O": 64, "num_warps": 8},
        {"BLOCK_T": 4, "BLOCK_O": 512, "num_warps": 2},
    ],
)
def test_every_apply_config_a_table_may_choose_is_exact(config):
    t, n, d_out, r = 70, 9, 100, 6  # t >= SORT_MIN_T: the sorted path too
    b = apply.prepare_b_star(_int_data(n, d_out, r, seed=5))
    sel = torch.randint(0, n, (t, 2), generator=torch.Generator().manual_seed(6)).to(torch.int32).to(DEVICE)
    w, z = torch.full((t, 2), 0.5, device=DEVICE), _int_data(t, 2, r, seed=7)
    y0 = _int_data(t, d_out, seed=8)
    with tuning.forced("lora_apply", config):
        y = apply.lora_apply(y0.clone(), b, sel, w, z)
    torch.testing.assert_close(y, reference.lora_apply(y0.clone(), b, sel, w, z), atol=0, rtol=0)


def test_an_entry_that_sets_some_keys_launches_over_the_defaults():
    """A table entry may give only some of an op's keys (as ENTRIES' do): the launch takes the rest
    from the default config (it took the entry alone: a KeyError for the missing block size)."""
    x, p = _int_data(4, 16, seed=9), _int_data(300, 16, seed=10)
    with tuning.forced("arrow_select", {"num_warps": 2}):
        assert torch.equal(arrow.arrow_topk(x, p, 7)[0], reference.arrow_topk(x, p, 7)[0])
    t, n, d_out, r = 70, 9, 100, 6
    b = apply.prepare_b_star(_int_data(n, d_out, r, seed=11))
    sel = torch.randint(0, n, (t, 1), generator=torch.Generator().manual_seed(12)).to(torch.int32).to(DEVICE)
    w, z, y0 = torch.ones(t, 1, device=DEVICE), _int_data(t, 1, r, seed=13), _int_data(t, d_out, seed=14)
    with tuning.forced("lora_apply", ENTRIES[2]["config"]):  # BLOCK_T and num_warps, no BLOCK_O
        y = apply.lora_apply(y0.clone(), b, sel, w, z)
    torch.testing.assert_close(y, reference.lora_apply(y0.clone(), b, sel, w, z), atol=0, rtol=0)

"""Building, aligning, saving and loading libraries; every refused PEFT feature."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lag_triton
from lag_triton import AdapterError, Library, LibraryFormatError
from lag_triton.library.align import align_lora

from factories import VOCAB, from_peft, make_adapter, peft_logits, tiny_model


# -- alignment ---------------------------------------------------------------------------------
@pytest.mark.parametrize("r,d_in,d_out", [(1, 7, 5), (6, 33, 20), (16, 40, 64), (9, 5, 12), (9, 12, 1), (8, 4, 4)])
def test_alignment_reproduces_the_update_and_its_svd(r, d_in, d_out):
    """The last three: a rank above the layer's size, aligned to k = min(r, d_in, d_out) rows."""
    g = torch.Generator().manual_seed(r)
    a = torch.randn(3, r, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(3, d_out, r, generator=g, dtype=torch.float64)
    s = torch.tensor([2.0, 0.25, 1.0], dtype=torch.float64)
    a_star, b_star = align_lora(a, b, s)
    k = min(r, d_in, d_out)
    assert a_star.shape == (3, k, d_in) and b_star.shape == (3, d_out, k)
    dense = s[:, None, None] * b @ a
    torch.testing.assert_close(b_star @ a_star, dense, rtol=0, atol=1e-10 * dense.abs().max().item())
    torch.testing.assert_close(
        a_star @ a_star.transpose(1, 2), torch.eye(k, dtype=torch.float64).expand(3, k, k), rtol=0, atol=1e-12
    )
    _, sigma, vh = torch.linalg.svd(dense)
    top = vh[:, 0]
    assert torch.minimum((a_star[:, 0] - top).abs().amax(-1), (a_star[:, 0] + top).abs().amax(-1)).max() < 1e-10
    torch.testing.assert_close(b_star.norm(dim=1), sigma[:, :k], rtol=1e-10, atol=1e-10)  # sigma descending
    a2, b2 = align_lora(a, b, s)
    assert torch.equal(a_star, a2) and torch.equal(b_star, b2)


@pytest.mark.parametrize("case", ["zero_b", "rank_deficient_a", "ill_conditioned", "kahan_a"])
def test_alignment_of_degenerate_factors_falls_back_to_householder(case):
    """Factors Cholesky-QR would orthogonalise badly take Householder QR; A* stays orthonormal. The
    Kahan-like A (unit diagonal, -1 above: cond 1.5e9 at r = 28, a balanced Cholesky diagonal)
    passed the old test and gave A* rows 1.97 off orthonormal."""
    g = torch.Generator().manual_seed(7)
    r = 28 if case == "kahan_a" else 4
    a = torch.randn(2, r, 50, generator=g, dtype=torch.float64)
    b = torch.randn(2, 40, r, generator=g, dtype=torch.float64)
    if case == "zero_b":
        b[1] = 0  # PEFT's default initialisation
    elif case == "rank_deficient_a":
        a[0, 3] = a[0, 0] - 2 * a[0, 1]
    elif case == "ill_conditioned":
        a[1, 2] = a[1, 1] + 1e-6 * a[1, 2]
    else:
        kahan = torch.eye(r, dtype=torch.float64) - torch.triu(torch.ones(r, r, dtype=torch.float64), 1)
        a[1] = (torch.linalg.qr(torch.randn(50, r, generator=g, dtype=torch.float64))[0] @ kahan).T
    s = torch.ones(2, dtype=torch.float64)
    a_star, b_star = align_lora(a, b, s)
    torch.testing.assert_close(b_star @ a_star, b @ a, rtol=0, atol=1e-10 * (b @ a).abs().max().item())
    torch.testing.assert_close(
        a_star @ a_star.transpose(1, 2), torch.eye(r, dtype=torch.float64).expand(2, r, r), rtol=0, atol=1e-10
    )


def test_alignment_is_invariant_to_the_factorisation():
    """B A = (B M)(M^-1 A): same dW, so the same aligned factors (the sign convention is fixed)."""
    a = torch.randn(1, 4, 30, dtype=torch.float64)
    b = torch.randn(1, 25, 4, dtype=torch.float64)
    mix = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    s = torch.ones(1, dtype=torch.float64)
    a1, b1 = align_lora(a, b, s)
    a2, b2 = align_lora(torch.linalg.solve(mix, a[0])[None], (b[0] @ mix)[None], s)
    torch.testing.assert_close(a1, a2, rtol=0, atol=1e-9)
    torch.testing.assert_close(b1, b2, rtol=0, atol=1e-9)


# -- from_peft -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _dense_update(adapter_dir, module):
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    w = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = w[f"base_model.model.{module}.lora_A.weight"].double()
    b = w[f"base_model.model.{module}.lora_B.weight"].double()
    return cfg, b @ a


def test_from_peft_mixed_ranks_patterns_and_subsets(llama, tmp_path):
    p0 = make_adapter(llama, tmp_path / "a0", seed=0, r=4, alpha=8)
    p1 = make_adapter(llama, tmp_path / "a1", seed=1, r=2, alpha=3, use_rslora=True, targets=["up_proj", "down_proj"])
    p2 = make_adapter(
        llama,
        tmp_path / "a2",
        seed=2,
        r=3,
        alpha=5,
        targets=["up_proj", "q_proj"],
        rank_pattern={"layers.1.mlp.up_proj": 6},
        alpha_pattern={"q_proj": 11},
    )
    lib = Library.from_peft([p0, p1, p2], dtype=torch.float64, progress=False)
    assert lib.names == ["a0", "a1", "a2"] and lib.r_max == 6
    up1 = lib.modules["model.layers.1.mlp.up_proj"]
    assert up1.adapter_ids.tolist() == [0, 1, 2] and up1.ranks.tolist() == [4, 2, 6]
    assert lib.modules["model.layers.0.self_attn.v_proj"].adapter_ids.tolist() == [0]
    assert lib.modules["model.layers.0.self_attn.q_proj"].adapter_ids.tolist() == [0, 2]
    expected_scaling = {
        ("a0", "model.layers.1.mlp.up_proj"): 8 / 4,
        ("a1", "model.layers.1.mlp.up_proj"): 3 / 2**0.5,
        ("a2", "model.layers.1.mlp.up_proj"): 5 / 6,
        ("a2", "model.layers.0.self_attn.q_proj"): 11 / 3,
    }
    for (name, module), s in expected_scaling.items():
        m = lib.modules[module]
        row = m.adapter_ids.tolist().index(lib.names.index(name))
        _, dense = _dense_update(tmp_path / name, module)
        torch.testing.assert_close(m.b_star[row] @ m.a_star[row], s * dense, rtol=0, atol=1e-10)
        rank = int(m.ranks[row])
        assert m.a_star[row, rank:].abs().sum() == 0 and m.b_star[row, :, rank:].abs().sum() == 0
        assert torch.equal(m.prototypes[row], m.a_star[row, 0])


def test_gpt2_conv1d_adapters_keep_linear_shapes(tmp_path):
    gpt2 = tiny_model("gpt2")
    lib = Library.from_peft([make_adapter(gpt2, tmp_path / "g", seed=0, arch="gpt2")], progress=False)
    c_attn = lib.modules["transformer.h.0.attn.c_attn"]
    assert (c_attn.d_in, c_attn.d_out) == (48, 144)


def test_save_load_round_trip_is_bit_exact(llama, tmp_path):
    lib = Library.from_peft(
        [make_adapter(llama, tmp_path / f"a{i}", seed=i) for i in range(3)], dtype=torch.bfloat16, progress=False
    )
    lib.save(tmp_path / "lib.safetensors")
    back = Library.load(tmp_path / "lib.safetensors")
    assert back.names == lib.names and back.base_model == lib.base_model and set(back.modules) == set(lib.modules)
    for name, m in lib.modules.items():
        for field in ("a_star", "b_star", "prototypes", "adapter_ids", "ranks"):
            got, want = getattr(back.modules[name], field), getattr(m, field)
            assert got.dtype == want.dtype and torch.equal(got, want), (name, field)
    moved = back.to(dtype=torch.float32)
    assert moved.dtype == torch.float32 and moved.modules[name].adapter_ids.dtype == torch.int64


def test_build_does_not_depend_on_folder_order_for_each_adapter(llama, tmp_path):
    paths = [make_adapter(llama, tmp_path / f"a{i}", seed=i) for i in range(2)]
    one = Library.from_peft(paths, progress=False)
    two = Library.from_peft(paths[::-1], progress=False)
    for name, m in one.modules.items():
        torch.testing.assert_close(m.a_star, two.modules[name].a_star.flip(0), rtol=0, atol=0)


# -- refused input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("use_dora", True, "use_dora"),
        ("lora_bias", True, "lora_bias"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("peft_type", "IA3", "peft_type"),
        ("r", 0, "r=0"),
        ("init_lora_weights", "pissa", r"init_lora_weights='pissa' is refused: this init replaces the base"),
        ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
        ("init_lora_weights", "olora", "init_lora_weights='olora'"),
        ("init_lora_weights", "corda", "init_lora_weights='corda'"),
        ("init_lora_weights", "loftq", "LoftQ adapters cannot be converted"),
        ("init_lora_weights", "lora_ga", "init_lora_weights='lora_ga'"),
        ("init_lora_weights", "astra", "init_lora_weights='astra' is refused: this init replaces the base"),
        ("init_lora_weights", "next_release_init", "not an init known to leave the base weight as it is"),
        ("kasa_config", {"beta": 1e-4}, "KaSA truncates the base weight"),
        ("monteclora_config", {"num_samples": 2}, "MonteCLoRA samples its factors"),
        ("use_bdlora", {"nblocks": 0}, "use_bdlora={'nblocks': 0} must be an object with a positive integer nblocks"),
        ("use_bdlora", {"target_modules_bd_a": "q_proj"}, "must give target_modules_bd_a as a list of strings"),
    ],
)
def test_refused_config_fields_name_adapter_and_field(llama, tmp_path, field, value, needle):
    path = make_adapter(llama, tmp_path / "bad", seed=0)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=needle) as info:
        Library.from_peft([path], progress=False)
    assert str(path) in str(info.value)


def test_a_bdlora_adapter_is_the_lora_of_its_block_diagonal_factors(tmp_path):
    """BD-LoRA (block-diagonal A on some modules, B on others, stored as the blocks side by side)
    reproduces PEFT's forward; a file whose blocks do not fit the config is refused by module."""
    from peft import LoraConfig, get_peft_model

    BdLoraConfig = from_peft("BdLoraConfig", "peft.tuners.lora.config")
    model = tiny_model("llama")
    bd = BdLoraConfig(target_modules_bd_a=["q_proj", "up_proj"], target_modules_bd_b=["down_proj"], nblocks=2)
    config = LoraConfig(r=4, target_modules=["q_proj", "up_proj", "down_proj"], init_lora_weights=False, use_bdlora=bd)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # BD-LoRA starts its block-diagonal B at zero
    peft_model.save_pretrained(str(tmp_path / "bd"))
    peft_model.unload()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(8))
    want = peft_logits(model, tmp_path / "bd", ids)
    library = Library.from_peft([tmp_path / "bd"], progress=False)
    lag_triton.patch(model, library, k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    cfg = json.loads((tmp_path / "bd" / "adapter_config.json").read_text())
    cfg["use_bdlora"]["nblocks"] = 4  # the stored blocks are halves, not quarters
    (tmp_path / "bd" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        AdapterError,
        match=r"down_proj': lora_A \(4, 80\) and lora_B \(48, 2\) .* \(BD-LoRA: lora_B block-diagonal, 4 blocks\)",
    ):
        Library.from_peft([tmp_path / "bd"], progress=False)


def test_a_velora_adapter_is_its_lora(tmp_path):
    """VeLoRA changes only the backward; its saved projection is skipped and the forward is PEFT's."""
    VeloraConfig = from_peft("VeloraConfig", "peft.tuners.lora.config")
    model = tiny_model("llama")
    path = make_adapter(model, tmp_path / "velora", seed=3, targets=["q_proj", "up_proj"], velora_config=VeloraConfig())
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(7))
    want = peft_logits(model, path, ids)
    lag_triton.patch(model, Library.from_peft([path], progress=False), k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")  # PEFT's, saving unconverted
def test_a_base_changing_adapter_converted_by_peft_is_read_as_the_lora_it_became(init, tmp_path):
    """PiSSA / OLoRA adapters are deltas on a residual base (refused above); PEFT's conversion makes
    them a rank-2r LoRA of the original base, which reproduces the trained adapter exactly."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=init)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.peft_config["default"].init_lora_weights = True  # how PEFT's docs save the initial adapter
    peft_model.save_pretrained(str(tmp_path / "initial"))
    peft_model.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:  # "training"
                param.add_(0.05 * torch.randn(param.shape, generator=g))
        trained = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(str(tmp_path / "unconverted"))
    with pytest.raises(AdapterError, match=f"init_lora_weights='{init}' is refused"):
        Library.from_peft([tmp_path / "unconverted"], progress=False)
    peft_model.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "initial")
    )
    library = Library.from_peft([tmp_path / "converted"], progress=False)
    assert library.r_max == 8
    lag_triton.patch(model, library, k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
        ("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", "DoRA"),
        ("base_model.model.lm_head.weight", "not a LoRA A/B weight"),
        ("base_model.model.lm_head.base_layer.weight", r"save_pretrained\(\.\.\., save_embedding_layers=False\)"),
    ],
)
def test_refused_tensors(llama, tmp_path, extra, needle):
    path = make_adapter(llama, tmp_path / "bad", seed=0)
    weights = load_file(str(path / "adapter_model.safetensors"))
    weights[extra] = torch.zeros(4, 4)
    save_file(weights, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=needle):
        Library.from_peft([path], progress=False)


def test_embedding_lora_is_refused_as_such_before_the_embedding_copies_saved_with_it(llama, tmp_path):
    """PEFT saves an embedding LoRA with a copy of the embedding (save_embedding_layers): the error
    names the embedding LoRA, not the copy (saving without it would not make the adapter readable)."""
    path = make_adapter(llama, tmp_path / "emb", seed=0)
    weights = load_file(str(path / "adapter_model.safetensors"))
    weights["base_model.model.model.embed_tokens.base_layer.weight"] = torch.zeros(4, 4)
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 4)
    save_file(weights, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lora_embedding_A': embedding LoRA is refused"):
        Library.from_peft([path], progress=False)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_is_refused_where_it_saved_biases(tmp_path, bias):
    """bias="all" / "lora_only" on a model without biases saves LoRA factors only, and PEFT's forward
    is their LoRA (read as such); where it saved a trained bias, the tensor is named and refused."""
    model = tiny_model("llama")
    path = make_adapter(model, tmp_path / "a", seed=2, bias=bias)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    want = peft_logits(model, path, ids)
    library = Library.from_peft([path], progress=False)
    lag_triton.patch(model, library, k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)

    # Qwen2's q/k/v projections have biases: PEFT saves them (bias="lora_only": the adapted layers',
    # as <layer>.base_layer.bias, which is no copy of an embedding to save without)
    qwen2 = tiny_model("qwen2")
    path = make_adapter(qwen2, tmp_path / "b", seed=2, arch="qwen2", bias=bias)
    with pytest.raises(
        AdapterError, match=rf"_proj(.base_layer)?.bias' is a base-model bias trained with .* bias='{bias}'"
    ):
        Library.from_peft([path], progress=False)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            dict(layers_to_transform=[1]),
            r"layers.0.mlp.up_proj' .* \(layers_to_transform=\[1\] does not hold its layer index \(0\)\)",
        ),
        (
            dict(layers_to_transform=1, layers_pattern="layers"),
            r"layers.0.mlp.up_proj' .*layers_to_transform=1 does not",
        ),
        (dict(target_modules=["q_proj"]), r"layers.0.mlp.up_proj' .*target_modules=\['q_proj'\] names neither it"),
        (
            dict(target_modules=r".*\.q_proj"),
            r"layers.0.mlp.up_proj' .*target_modules='\.\*.*q_proj' does not match its whole",
        ),
        (dict(exclude_modules=["up_proj"]), r"layers.0.mlp.up_proj' .*exclude_modules=\['up_proj'\] names it"),
        (
            dict(exclude_modules=r".*layers\.1\..*"),
            r"layers.1.mlp.up_proj' .*exclude_modules='\.\*layers.*' matches it",
        ),
    ],
)
def test_factors_of_a_module_the_config_does_not_select_are_refused(tmp_path, edit, needle):
    """PEFT puts a LoRA only where its config selects (target_modules, layers_to_transform,
    exclude_modules) and loads other saved factors with a warning: such a file is refused, naming the
    module and the field (it was read as adapting them all: logits 0.45 off PEFT's)."""
    model = tiny_model("llama")
    path = make_adapter(model, tmp_path / "a", seed=4, targets=["q_proj", "up_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(AdapterError, match=needle):
        Library.from_peft([path], progress=False)


@pytest.mark.parametrize(
    "edit",
    [
        dict(layers_to_transform=[0, 1]),
        dict(layers_to_transform=[0, 1], layers_pattern=["blocks", "layers"]),
        dict(target_modules=r".*\.(q_proj|up_proj)"),
        dict(target_modules=["self_attn.q_proj", "model.layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]),
        dict(exclude_modules=["k_proj"]),
    ],
)
def test_a_config_selecting_every_saved_module_reads_them_all(tmp_path, edit):
    """What PEFT 0.22 matches: a regex string the whole name, a list entry the name or its last
    components, layers_to_transform the first numbered component (after layers_pattern if given)."""
    model = tiny_model("llama")
    path = make_adapter(model, tmp_path / "a", seed=4, targets=["q_proj", "up_proj"])
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    want = peft_logits(model, path, ids)
    library = Library.from_peft([path], progress=False)
    assert len(library.modules) == 4
    lag_triton.patch(model, library, k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_folder_of_adapter_subfolders_names_them(llama, tmp_path):
    make_adapter(llama, tmp_path / "outer" / "task1", seed=0)
    with pytest.raises(AdapterError, match=r"outer': has no adapter_config.json \(its subfolders \['task1'\] hold"):
        Library.from_peft([tmp_path / "outer"], progress=False)


def test_multihead_attention_lora_is_refused_at_build(tmp_path):
    """PEFT adapts an nn.MultiheadAttention as one LoRA on its packed in_proj (at the attention module)
    and one on its out_proj, saved under the wrapper (``attn.base_layer.out_proj``): not linear layers
    of the model, so the build refuses the adapter, naming the module (patch would refuse the model)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.proj = torch.nn.Linear(16, 16)

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Block(), LoraConfig(r=2, target_modules=["attn", "proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "mha"))
    with pytest.raises(AdapterError, match=r"module 'attn.base_layer.out_proj' lies inside PEFT's wrapper of 'attn'"):
        Library.from_peft([tmp_path / "mha"], progress=False)


def test_rank_that_disagrees_with_config_and_shape_mismatch_across_adapters(llama, tmp_path):
    path = make_adapter(llama, tmp_path / "a", seed=0, r=4)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 5
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"configured rank r=5"):
        Library.from_peft([path], progress=False)
    other = tiny_model("llama")
    other.model.layers[0].mlp.up_proj = torch.nn.Linear(48, 96, bias=False)
    good = make_adapter(llama, tmp_path / "good", seed=0)
    wrong = make_adapter(other, tmp_path / "wrong", seed=1, targets=["up_proj"])
    with pytest.raises(AdapterError, match=r"'model.layers.0.mlp.up_proj' has d_in x d_out = 48 x 96"):
        Library.from_peft([good, wrong], progress=False)


def test_non_finite_factors_are_refused(llama, tmp_path):
    path = make_adapter(llama, tmp_path / "nan", seed=0)
    weights = load_file(str(path / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][3, 1] = float("nan")
    save_file(weights, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"'model.layers.1.mlp.down_proj' has non-finite values"):
        Library.from_peft([path], progress=False)


def test_missing_and_unreadable_adapter_files(llama, tmp_path):
    with pytest.raises(AdapterError, match="is not a directory"):
        Library.from_peft([tmp_path / "nope"], progress=False)
    path = make_adapter(llama, tmp_path / "a", seed=0)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        Library.from_peft([path], progress=False)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no weights file"):
        Library.from_peft([path], progress=False)


def test_pickled_bin_is_loaded_weights_only(llama, tmp_path):
    path = make_adapter(llama, tmp_path / "a", seed=0)
    weights = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(weights, path / "adapter_model.bin")
    lib = Library.from_peft([path], progress=False)
    assert len(lib.modules) == 8

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="weights_only=True"):
        Library.from_peft([path], progress=False)


def test_truncated_and_foreign_library_files(llama, tmp_path):
    lib = Library.from_peft([make_adapter(llama, tmp_path / "a", seed=0)], progress=False)
    lib.save(tmp_path / "lib.safetensors")
    data = (tmp_path / "lib.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LibraryFormatError, match="truncated"):
        Library.load(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(LibraryFormatError, match="too short"):
        Library.load(tmp_path / "tiny.bin")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(LibraryFormatError, match="not a lag_triton library"):
        Library.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Library.load(tmp_path / "missing.safetensors")


def test_patched_arrow_choices_match_independent_prototypes(tmp_path):
    """End to end: a library built from PEFT folders routes (Arrow top-1, through ``patch`` and
    ``trace``) each token of each module to argmax_i |x . v_i|, where v_i is the top right singular
    vector of adapter i's dense update s * B A, computed here from the PEFT files alone (fp64)."""
    import lag_triton

    model = tiny_model("llama")
    n, alpha = 7, 8.0
    folders = [make_adapter(model, tmp_path / f"a{i}", seed=10 + i, r=2 + i % 3, alpha=alpha) for i in range(n)]
    protos = {}  # module -> [N, d_in] fp64, rows in library order
    for i, folder in enumerate(folders):
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            module = key[len("base_model.model.") : -len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            dense = (alpha / a.shape[0]) * b.double() @ a.double()
            protos.setdefault(module, [None] * n)[i] = torch.linalg.svd(dense)[2][0]
    lib = Library.from_peft(folders, progress=False)
    assert sorted(protos) == sorted(lib.modules)

    inputs = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _, args, name=name: inputs.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for name in protos
    ]
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    lag_triton.patch(model, lib, router="arrow", top_m=1, backend="torch")
    try:
        with torch.no_grad(), lag_triton.trace(model) as tr:
            model(input_ids=ids)
    finally:
        lag_triton.unpatch(model)
        for h in hooks:
            h.remove()
    checked = 0
    for module, rows in protos.items():
        scores = (inputs[module].double() @ torch.stack(rows).T).abs()  # [tokens, N]
        top2 = scores.topk(2, dim=1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 1e-4 * top2.values[:, 0]  # skip near-ties (fp32 routing)
        got = tr.selections[module][:, 0]
        assert torch.equal(got[clear], top2.indices[clear, 0]), module
        checked += int(clear.sum())
    assert checked >= 0.9 * sum(inputs[m].shape[0] for m in protos)

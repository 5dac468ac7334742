"""LAG through MoE experts kept as 3-D parameters (lag_triton/moe.py; PEFT's target_parameters).

A one-adapter library reproduces PEFT's forward (the families in test_architectures.py); here: the
unfolded expert module computes what transformers' own does, every (token, expert) pair is routed
through that expert's library module as a naive per-token loop says, the reader's per-expert
factors are PEFT's delta weights, and the refusals name what they refuse.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_backends_model import _require
from test_reference import naive_layer

import lag_triton
from lag_triton import AdapterError, LagLinear, Library
from lag_triton.library.peft_reader import PeftAdapter
from lag_triton.moe import ExpertProjection, LagExperts, unfold
from lag_triton.patching import LagRouter
from lag_triton.routing import RoutingConfig

from factories import VOCAB, make_adapter, peft_logits, tiny_model

MOE = ["qwen3_moe", "mixtral", "gpt_oss"]  # gpt-oss: [E, in, out] experts with biases and its own gate
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["gate_up_proj", "down_proj"]


def _moe(arch: str, seed: int = 0):
    model = tiny_model(arch, seed=seed)
    if not any(p.dim() == 3 for p in model.parameters()):
        pytest.skip(f"this transformers keeps {arch}'s experts as nn.Linear (routed as linear layers)")
    for p in model.parameters():  # larger than the init's: experts and adapters visibly change the logits
        torch.nn.init.normal_(p, std=0.1)
    return model


def _experts(model) -> tuple[str, torch.nn.Module]:
    return next((n, m) for n, m in model.named_modules() if n.endswith("mlp.experts"))


def _router_output(model, experts, tokens: int, seed: int = 0):
    """hidden [T, H], top-k expert indices [T, K] (distinct per token) and weights [T, K]."""
    g = torch.Generator().manual_seed(seed)
    k = model.config.num_experts_per_tok
    index = torch.stack([torch.randperm(experts.num_experts, generator=g)[:k] for _ in range(tokens)])
    hidden = torch.randn(tokens, model.config.hidden_size, generator=g)
    return hidden, index, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_unfolded_expert_module_computes_as_transformers_does(arch, implementation):
    model = _moe(arch)
    model.config._experts_implementation = implementation
    path, experts = _experts(model)
    hidden, index, weights = _router_output(model, experts, tokens=13)
    if arch == "qwen3_moe" and implementation == "eager":
        index[3, 1] = experts.num_experts  # a sentinel (no expert), which Qwen3-MoE's eager loop skips
    with torch.no_grad():
        want = experts(hidden, index, weights)
        got = LagExperts(experts, path)(hidden, index, weights)
    # the same products on the same rows; not bit for bit: a BLAS may round a gathered copy otherwise
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (want - experts(hidden, index, weights.flip(1))).abs().max() > 1e-3


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("routing", [dict(k=2, top_m=1), dict(k=3, top_m=2), dict(router="arrow", top_m=1)])
def test_every_token_expert_pair_routes_through_that_experts_library_module(arch, routing, tmp_path):
    """Each expert's projection LAG-routes the tokens sent to it, among its own library module's
    adapters: checked against a naive loop over (token, expert) pairs of docs/design.md's equations."""
    model = _moe(arch)
    paths = [
        make_adapter(
            model, tmp_path / f"a{i}", seed=i, arch=arch, targets=["q_proj"], target_parameters=EXPERTS, r=2 + i
        )
        for i in range(4)
    ]
    library = Library.from_peft(paths, progress=False)
    path, experts = _experts(model)
    hidden, index, weights = _router_output(model, experts, tokens=11, seed=1)
    cfg = RoutingConfig(**routing)
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"

    def routed(name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        m = library.modules[name]
        delta, _ = naive_layer(x[None], m.a_star, m.b_star, m.prototypes, cfg)
        return base + delta[0].float()

    want = torch.zeros_like(hidden)
    with torch.no_grad():
        for t in range(hidden.shape[0]):
            for slot, e in enumerate(index[t].tolist()):
                x = hidden[t]
                h = routed(f"{path}.{up_name}.{e}", x, ExpertProjection(experts, up_name, e)(x))
                h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
                y = routed(f"{path}.down_proj.{e}", h, ExpertProjection(experts, "down_proj", e)(h))
                want[t] += weights[t, slot] * y
    lag_triton.patch(model, library, **routing)
    with torch.no_grad(), lag_triton.trace(model) as tr:
        got = model.get_submodule(path)(hidden, index, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for e in range(experts.num_experts):  # each expert's layers saw exactly the tokens sent to it
        assert tr.selections[f"{path}.down_proj.{e}"].shape[0] == int((index == e).sum())


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT's; it applies them
def test_reader_gives_each_expert_peft_s_delta_weight(arch, tmp_path):
    """rank_pattern / alpha_pattern keyed by the parameter (as PEFT's all-linear sets for gate_up_proj)."""
    model = _moe(arch)
    patterns = dict(rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3.0})
    path = make_adapter(
        model, tmp_path / "a", seed=5, arch=arch, targets=["q_proj"], target_parameters=EXPERTS, **patterns
    )
    from peft import PeftModel

    transposed = {n: m.is_transposed for n, m in model.named_modules() if n.endswith("experts")}
    peft_model = PeftModel.from_pretrained(model, str(path))
    adapter = PeftAdapter.open(path)
    factors = adapter.load_factors()
    checked = 0
    for name, module in peft_model.named_modules():
        if type(module).__name__ != "ParamWrapper":
            continue
        experts = name.removeprefix("base_model.model.").replace(".base_layer", "")
        delta = module.get_delta_weight("default")  # [E, out, in], or [E, in, out] as the parameter
        for e in range(delta.shape[0]):
            key = f"{experts}.{module.parameter_name}.{e}"
            a, b = factors[key]
            want = delta[e].T if transposed[experts] else delta[e]
            torch.testing.assert_close(adapter.modules[key].scaling * b @ a, want)
            checked += 1
    assert checked == 2 * 2 * 4  # layers x parameters x experts
    assert {f.rank for n, f in adapter.modules.items() if ".down_proj." in n} == {2}
    peft_model.unload()


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_one_targeted_expert_parameter_reproduces_peft(arch, tmp_path):
    model = _moe(arch)
    path = make_adapter(model, tmp_path / "a", seed=7, arch=arch, targets=["q_proj"], target_parameters=["down_proj"])
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want = peft_logits(model, path, ids)
    lag_triton.patch(model, Library.from_peft([path], progress=False), k=1)
    routed = {n for n, m in model.named_modules() if isinstance(m, LagLinear)}
    assert {n.rpartition(".")[0].rpartition(".")[2] for n in routed if "experts" in n} == {"down_proj"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_experts_route_alike_on_every_backend(backend, tmp_path, monkeypatch):
    """The kernels see an expert's tokens as any layer's (Triton under the interpreter, CUDA emulated on CPU)."""
    _require(backend, monkeypatch)
    model = _moe("gpt_oss")
    paths = [
        make_adapter(model, tmp_path / f"a{i}", seed=i, arch="gpt_oss", targets=["q_proj"], target_parameters=EXPERTS)
        for i in range(3)
    ]
    library = Library.from_peft(paths, progress=False)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    logits = {}
    for be in ("torch", backend):
        lag_triton.patch(model, library, k=2, backend=be)
        with torch.no_grad(), lag_triton.trace(model) as tr:
            logits[be] = (model(input_ids=ids).logits, tr.selections)
        lag_triton.unpatch(model)
    (want, want_sel), (got, got_sel) = logits["torch"], logits[backend]
    assert got_sel.keys() == want_sel.keys() and all(torch.equal(got_sel[k], v) for k, v in want_sel.items())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::lag_triton.LibraryNotSavedWarning")
def test_patched_moe_keeps_state_copies_and_unpatches(tmp_path):
    model = _moe("qwen3_moe")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    original = _experts(model)[1]
    paths = [
        make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe", target_parameters=EXPERTS, targets=["q_proj"])
        for i in range(3)
    ]
    lag_triton.patch(model, Library.from_peft(paths, progress=False), k=2)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    patched = model.state_dict()  # the base model's keys and values, as unpatched
    assert patched.keys() == state.keys() and all(torch.equal(patched[k], v) for k, v in state.items())
    experts = _experts(model)[1]
    assert isinstance(experts, LagExperts) and experts.num_experts == original.num_experts  # attributes read through
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(1.0) if "experts" in name else None
        model.load_state_dict(state)  # a base checkpoint loads into the patched model
        assert torch.equal(model(input_ids=ids).logits, want)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert torch.equal(clone(input_ids=ids).logits, want)
    lag_triton.unpatch(model)
    assert _experts(model)[1] is original
    assert not any(isinstance(m, (LagLinear, LagExperts, ExpertProjection)) for m in model.modules())


def test_experts_refuse_sharding(tmp_path):
    model = _moe("qwen3_moe")
    path = make_adapter(model, tmp_path / "a", seed=1, arch="qwen3_moe", targets=["q_proj"], target_parameters=EXPERTS)
    library = Library.from_peft([path], progress=False)
    from lag_triton.sharding import _plan

    with pytest.raises(ValueError, match=r"experts\.(gate_up|down)_proj\.0'.*an expert of an MoE layer"):
        _plan(model, [library], "torch", {}, 0)


def test_a_scope_keeps_each_token_of_an_moe_layers_experts_to_its_rows_set(tmp_path):
    """Each expert is fed a gather of the batch's tokens, whose rows no shape tells (scopes were
    refused): LagExperts tells the scope which tokens they are. Row b, scoped to adapter b, gives
    what the model patched with adapter b alone gives that row, in a forward and in a cached
    generate (a row per token at decode)."""
    model = _moe("qwen3_moe")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe") for i in range(3)]  # all-linear
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    want = []
    for row, adapter in ((0, 2), (1, 0)):
        lag_triton.patch(model, Library.from_peft([paths[adapter]], progress=False), k=1)
        with torch.no_grad():
            want.append(
                (model(input_ids=ids[row : row + 1]).logits, model.generate(input_ids=ids[row : row + 1], **kw))
            )
        lag_triton.unpatch(model)
    lag_triton.patch(model, Library.from_peft(paths, names=["a0", "a1", "a2"], progress=False), k=2)
    with torch.no_grad(), lag_triton.scope(model, [["a2"], ["a0"]]), lag_triton.trace(model) as tr:
        logits = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids, **kw)
    assert tr.selections["model.layers.1.mlp.experts.down_proj.2"].numel() > 0  # the experts were scoped
    for row, (row_logits, row_generated) in enumerate(want):
        torch.testing.assert_close(logits[row : row + 1], row_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(generated[row : row + 1], row_generated)
    projection = model.model.layers[0].mlp.experts.down_proj[1]  # run on its own: no one says whose tokens
    with lag_triton.scope(model, [["a2"], ["a0"]]), pytest.raises(RuntimeError, match="outside its experts module"):
        projection(torch.randn(4, projection.in_features))


def test_a_scope_refuses_a_batch_whose_rows_only_expert_layers_see(tmp_path):
    """A library of experts alone: no layer input shows the batch rows (a 4-row batch under a 2-row
    scope took row 0's set for row 1), so the model's call is checked."""
    model = _moe("qwen3_moe")
    paths = [
        make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe", targets=["q_proj"], target_parameters=EXPERTS)
        for i in range(2)
    ]
    built = Library.from_peft(paths, names=["a0", "a1"], progress=False)
    library = Library(built.names, {name: w for name, w in built.modules.items() if ".experts." in name})
    lag_triton.patch(model, library, k=1)
    ids = torch.randint(2, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    called = r"given 2 batch rows, but Qwen3MoeForCausalLM was called with input_ids of shape \(4, 5\) \(4 rows\)"
    with pytest.raises(ValueError, match=called + r"\. generate with num_beams"):
        with torch.no_grad(), lag_triton.scope(model, [["a0"], []]):
            model(input_ids=ids)
    with torch.no_grad(), lag_triton.scope(model, [["a0"], [], ["a1"], []]):
        model(input_ids=ids)  # as many rows as the scope


def test_a_scope_refuses_an_moe_block_fed_some_of_the_batchs_tokens(tmp_path):
    """Ernie-4.5-VL runs its text experts on the text tokens only: their rows cannot be told (row 1,
    scoped to no adapter, got row 0's), so the scope refuses them instead."""
    model = tiny_model("ernie4_5_vl_text")
    path = make_adapter(model, tmp_path / "a", seed=5, targets=["q_proj"], target_parameters=EXPERTS)
    lag_triton.patch(model, Library.from_peft([path], names=["a0"], progress=False), k=1)
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    types = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])  # row 0: 2 text tokens, then 4 vision tokens
    with pytest.raises(ValueError, match=r"flattened input of 8 tokens, and the batch has 12 \(2 rows\)"):
        with torch.no_grad(), lag_triton.scope(model, [["a0"], []]):
            model(input_ids=ids, moe_mm_token_type_ids=types)


def test_a_forward_in_another_thread_leaves_a_scoped_experts_tokens_alone(tmp_path):
    """What the scope learns of an expert's gather is per thread: another thread's forward run in the
    middle of an expert (between its two projections) changed it when it was a module attribute, and
    the scoped rows then took adapters outside their sets."""
    import threading

    model = _moe("qwen3_moe")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe") for i in range(3)]
    lag_triton.patch(model, Library.from_peft(paths, names=["a0", "a1", "a2"], progress=False), k=2)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    sets = [["a1"], []]
    with torch.no_grad(), lag_triton.scope(model, sets):
        want = model(input_ids=ids).logits
    other = threading.Thread(target=lambda: model(input_ids=ids[:, :5]))  # the same scope covers it

    def run_other_once(*_):
        if other.ident is None:
            other.start()
            other.join()

    hooks = [p.register_forward_hook(run_other_once) for p in model.model.layers[1].mlp.experts.gate_up_proj]
    with torch.no_grad(), lag_triton.scope(model, sets):
        got = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    assert other.ident is not None  # it ran, inside an expert of the scoped forward
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_expert_modules_lagging_transformers_flags_or_split_over_ranks_are_refused():
    class Experts(torch.nn.Module):  # 3-D parameters, but no use_experts_implementation flags
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 3))

    with pytest.raises(ValueError, match=r"'m\.experts' \(Experts\).*lacks has_gate.*use_experts_implementation"):
        unfold("m.experts", Experts(), ["m.experts.down_proj.0"])
    experts = _experts(_moe("mixtral"))[1]
    with pytest.raises(ValueError, match=r"4 experts with projections gate_up_proj, down_proj"):
        unfold("x", experts, ["x.down_proj.4"])
    with pytest.raises(ValueError, match=r"4 experts with projections gate_up_proj, down_proj"):
        unfold("x", experts, ["x.up_proj.0"])
    experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="expert parallelism"):
        unfold("x", experts, ["x.down_proj.0"])


def test_a_library_for_more_experts_than_the_model_has_is_refused_before_patching(tmp_path):
    wide = _moe("qwen3_moe")
    path = make_adapter(wide, tmp_path / "a", seed=1, arch="qwen3_moe", targets=["q_proj"], target_parameters=EXPERTS)
    library = Library.from_peft([path], progress=False)
    narrow = tiny_model("qwen3_moe")
    narrow.config.num_experts = 2
    for layer in narrow.model.layers:
        layer.mlp.experts = type(layer.mlp.experts)(narrow.config)
    with pytest.raises(ValueError, match=r"experts\.(gate_up|down)_proj\.[23]'.*2 experts"):
        lag_triton.patch(narrow, library)
    assert not any(isinstance(m, (LagLinear, LagExperts)) for m in narrow.modules())  # untouched


def test_all_linear_routes_the_router_and_every_expert(tmp_path):
    """PEFT's "all-linear" on an MoE model adapts the router's weight too (target_parameters
    'gate.weight'): LAG adds the routed update to the router's logits, before it picks experts."""
    model = _moe("qwen3_moe")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe") for i in range(3)]  # "all-linear"
    library = Library.from_peft(paths, progress=False)
    assert (
        "model.layers.0.mlp.gate.weight" in library.modules
        and "model.layers.1.mlp.experts.down_proj.3" in library.modules
    )
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model(input_ids=ids, output_router_logits=True).router_logits
    lag_triton.patch(model, library, k=2)
    assert isinstance(model.model.layers[0].mlp.gate, LagRouter)
    with torch.no_grad(), lag_triton.trace(model) as tr:
        routed = model(input_ids=ids, output_router_logits=True).router_logits
    assert tr.selections["model.layers.0.mlp.gate.weight"].shape[0] == ids.numel()  # every token, once
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(routed, base))  # the logits the router picks from moved
    lag_triton.unpatch(model)  # a router is fed the batch's rows
    paths = [
        make_adapter(
            model, tmp_path / f"g{i}", seed=i, arch="qwen3_moe", targets=["q_proj"], target_parameters=["gate.weight"]
        )
        for i in range(3)
    ]
    lag_triton.patch(model, Library.from_peft(paths, names=["a0", "a1", "a2"], progress=False), k=2)
    with torch.no_grad(), lag_triton.scope(model, [["a1"], ["a2"]]), lag_triton.trace(model) as tr:
        model(input_ids=ids)
    picks = tr.selections["model.layers.1.mlp.gate.weight"].view(2, 7, -1)
    assert picks[0].eq(1).all() and picks[1].eq(2).all()  # the router's tokens are the batch's rows


class _TwiceRouter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) + torch.nn.functional.linear(2 * x, self.weight)


class _ScaledRouter(_TwiceRouter):
    def forward(self, x):
        return torch.nn.functional.linear(x, 2 * self.weight)


class _CachingRouter(_TwiceRouter):
    """Keeps its weight cast to fp64 from its first call (a copy no later call can be told by)."""

    def forward(self, x):
        if "cast" not in self.__dict__:
            self.__dict__["cast"] = self.weight.double()
        return torch.nn.functional.linear(x.double(), self.__dict__["cast"])


@pytest.mark.parametrize(
    "router,message",
    [
        (_TwiceRouter, "2 times"),
        (_ScaledRouter, "0 times.*not otherwise changed"),
        (_CachingRouter, "0 times from its second call on.*nor kept cast from one call to the next"),
    ],
)
def test_a_module_whose_forward_is_not_one_product_with_its_weight_is_refused(router, message):
    from lag_triton.library import ModuleWeights

    model = torch.nn.Sequential(router())
    a = torch.linalg.qr(torch.randn(8, 2))[0].T[None]
    weights = ModuleWeights(a, torch.randn(1, 4, 2), a[:, 0].contiguous(), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"module '0' \({router.__name__}\) was taken for an MoE router.*{message}"):
        lag_triton.patch(model, Library(["a"], {"0": weights}))
    assert isinstance(model[0], router)  # untouched


@pytest.mark.parametrize(
    "targets,message",
    [
        ("down_proj", r"target_parameters.*must be a list of parameter names"),
        (["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.experts.up_proj"], r"names 3 of its parameters"),
    ],
)
def test_reader_refuses_target_parameters_it_cannot_map(targets, message, tmp_path):
    import json

    model = _moe("qwen3_moe")
    path = make_adapter(model, tmp_path / "a", seed=1, arch="qwen3_moe", targets=["q_proj"], target_parameters=EXPERTS)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": targets}))
    with pytest.raises(AdapterError, match=message):
        PeftAdapter.open(path)


def test_a_targeted_2d_weight_is_its_modules_lora(tmp_path):
    """target_parameters naming a linear layer's 2-D weight: PEFT's update is that layer's plain LoRA."""
    model = tiny_model("llama")
    path = make_adapter(model, tmp_path / "a", seed=2, targets=["v_proj"], target_parameters=["q_proj.weight"])
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    want = peft_logits(model, path, ids)
    library = Library.from_peft([path], progress=False)
    assert {n.partition("self_attn.")[2] for n in library.modules} == {"q_proj.weight", "v_proj"}
    lag_triton.patch(model, library, k=1)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_modules", [True, "(", 3, None])
def test_reader_reads_experts_whatever_target_modules_holds(target_modules, tmp_path):
    """target_modules only tells a layer's LoRA from a parameter wrapper: a value PEFT would not
    write there (found by test_fuzz) leaves the saved factors to say what was targeted. A null one is
    PEFT's for target_parameters alone: a layer's own factors are then refused (PEFT skips them)."""
    import json

    model = _moe("qwen3_moe")
    path = make_adapter(model, tmp_path / "a", seed=1, arch="qwen3_moe", targets=["q_proj"], target_parameters=EXPERTS)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": target_modules}))
    if target_modules is None:
        with pytest.raises(AdapterError, match="q_proj' has LoRA factors, .*target_modules is null"):
            PeftAdapter.open(path)
        return
    modules = PeftAdapter.open(path).modules
    assert "model.layers.1.mlp.experts.gate_up_proj.3" in modules and "model.layers.1.self_attn.q_proj" in modules


def _one_adapter(d_in: int, d_out: int, seed: int = 0):
    """A one-adapter library module for a [d_in] -> [d_out] layer, and its update B*A* (dense)."""
    from lag_triton.library import ModuleWeights

    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(d_in, 2, generator=g))[0].T[None]
    b = torch.randn(1, d_out, 2, generator=g)
    return ModuleWeights(a, b, a[:, 0].contiguous(), torch.zeros(1, dtype=torch.long)), b[0] @ a[0]


class _KeywordRouter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.nn.functional.linear(input=x, weight=self.weight).softmax(-1)


class _LinearRouter(torch.nn.Linear):  # Phi-MoE's and Llama-4's routers subclass nn.Linear
    def forward(self, x):
        logits = super().forward(x)
        return logits, logits.topk(2, dim=-1).indices


@pytest.mark.parametrize("router", [_KeywordRouter, _LinearRouter])
def test_routers_add_the_routed_update_to_their_one_product(router):
    """F.linear called with keyword arguments, and an nn.Linear subclass returning a tuple (it was
    wrapped as a linear layer and failed at its first forward)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(router() if router is _KeywordRouter else router(8, 4))
    weights, delta = _one_adapter(8, 4)
    x = torch.randn(5, 8)
    with torch.no_grad():
        model[0].weight += delta
        want = model(x)
        model[0].weight -= delta
    lag_triton.patch(model, Library(["a"], {"0": weights}), k=1)
    assert isinstance(model[0], LagRouter)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want)  # a tuple: the logits, and the experts picked from them


class _Fp32Router(torch.nn.Module):
    """Routers of ~two dozen transformers families take their logits in fp32 (DeepSeek-V3's, GLM-4-MoE's)."""

    def __init__(self, cast):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))
        self.cast = cast

    def forward(self, x):
        return torch.nn.functional.linear(self.cast(x), self.cast(self.weight)).softmax(-1)


_FP32_CASTS = {
    "type": lambda t: t.type(torch.float32),
    "float": lambda t: t.float(),
    "to": lambda t: t.to(dtype=torch.float32),
    "double-float": lambda t: t.double().float(),
    "type_as": lambda t: t.type_as(torch.zeros((), dtype=torch.float32)),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", list(_FP32_CASTS))
def test_a_router_taking_its_product_in_fp32_routes_in_fp32(cast, dtype):
    """It was refused in a 16-bit model (the product's weight was a cast copy, not the parameter):
    now the copy is matched, and the router's library module is held and routed in fp32, the
    dtype its product runs in, so its logits carry the update to fp32 precision."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Fp32Router(_FP32_CASTS[cast])).to(dtype)
    weights, delta = _one_adapter(8, 4)
    x = torch.randn(5, 8).to(dtype)
    want = torch.nn.functional.linear(x.float(), model[0].weight.float() + delta).softmax(-1)
    lag_triton.patch(model, Library(["a"], {"0": weights}), k=1)
    assert isinstance(model[0], LagRouter) and model[0].routes[0].a_star.dtype == torch.float32
    with torch.no_grad():
        got = model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _MatmulRouter(torch.nn.Module):
    """A router that takes its product with the weight transposed: Kolibri1's, on CUDA, runs
    torch.mm(x, self.weight.t(), out_dtype=torch.float32) (fp32 logits from a 16-bit GEMM)."""

    def __init__(self, product):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))
        self.product = product

    def forward(self, x):
        return self.product(x.reshape(-1, 8), self.weight).softmax(-1)


_TRANSPOSED_PRODUCTS = {
    # CUDA-only in torch (no CPU kernel for mm with out_dtype): patched, it runs as the fp32 product
    "mm-out_dtype": lambda x, w: torch.mm(x, w.t(), out_dtype=torch.float32),
    "matmul-T-cast": lambda x, w: x.float() @ w.T.float(),
    "cast-mm-transpose": lambda x, w: x.float().mm(w.float().transpose(0, 1)),
    "matmul-mT": lambda x, w: torch.matmul(x.float(), w.float().mT),
}


@pytest.mark.parametrize("product", list(_TRANSPOSED_PRODUCTS))
def test_a_router_taking_its_product_with_the_weight_transposed_routes_it(product):
    """Such a router was refused at patch (no F.linear with its weight), or on CUDA, patched on CPU,
    raised at its first forward: now its product is the one redirected, in fp32, as PEFT's merged
    weight gives it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_MatmulRouter(_TRANSPOSED_PRODUCTS[product])).to(torch.bfloat16)
    weights, delta = _one_adapter(8, 4)
    x = torch.randn(5, 8).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), model[0].weight.float() + delta).softmax(-1)
    lag_triton.patch(model, Library(["a"], {"0": weights}), k=1)
    assert isinstance(model[0], LagRouter) and model[0].routes[0].a_star.dtype == torch.float32
    with torch.no_grad(), lag_triton.trace(model) as tr:
        got = model(x)
    assert got.dtype == torch.float32 and tr.selections["0"].shape == (5, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
def test_a_routers_fp32_library_stays_fp32_when_the_model_is_cast_after_patch(cast):
    """Its forward casts the weight to fp32 whatever the model's dtype, so the factors keep fp32
    through model.half() / .bfloat16() / .double() (they followed the cast: 16-bit routing, 2.6e-2
    off in bf16, where casting before patch gave fp32), from their values before the cast."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Fp32Router(_FP32_CASTS["type"]))
    weights, delta = _one_adapter(8, 4)
    lag_triton.patch(model, Library(["a"], {"0": weights}), k=1)
    getattr(model, cast)()
    route = model[0].routes[0]
    assert route.a_star.dtype == route.b_star.dtype == route.prototypes.dtype == torch.float32
    torch.testing.assert_close(route.a_star, weights.a_star, rtol=0, atol=0)  # not rounded on the way
    x = torch.randn(64, 8).to(model[0].weight.dtype)
    with torch.no_grad():
        got = model(x)
    want = torch.nn.functional.linear(x.float(), model[0].weight.float() + delta).softmax(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _BiasedRouter(torch.nn.Module):
    """MiniMax-M2's and HY-V3's routers take the expert-score bias from their MoE block."""

    def __init__(self, twice=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))
        self.twice = twice

    def forward(self, x, score_bias):
        logits = torch.nn.functional.linear(x, self.weight)
        if self.twice:
            logits = logits + torch.nn.functional.linear(x, self.weight)
        return logits + score_bias


class _Block(torch.nn.Module):
    def __init__(self, twice=False):
        super().__init__()
        self.gate = _BiasedRouter(twice)
        self.score_bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.gate(x, self.score_bias)


def test_a_router_whose_forward_takes_more_than_the_hidden_states_is_checked_at_each_forward():
    """It cannot be run on a dummy input at patch (it was refused: 'missing 1 required positional
    argument'): it routes in its weight's dtype, and a forward that computes its product other
    than once raises."""
    torch.manual_seed(0)
    weights, delta = _one_adapter(8, 4)
    model = _Block()
    x = torch.randn(5, 8)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, model.gate.weight + delta) + model.score_bias
    lag_triton.patch(model, Library(["a"], {"gate": weights}), k=1)
    assert isinstance(model.gate, LagRouter)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)
    twice = _Block(twice=True)
    lag_triton.patch(twice, Library(["a"], {"gate": weights}), k=1)
    with pytest.raises(RuntimeError, match=r"gate: the router computed F\.linear\(x, weight\) 2 times"):
        twice(x)


def test_a_bf16_models_fp32_router_adds_the_update_to_its_fp32_logits(tmp_path):
    """GLM-4-MoE's router computes F.linear(x.type(torch.float32), self.weight.type(torch.float32)):
    in a bf16 model, all-linear's router module routes in fp32, and each layer's router logits (the
    first of what it returns) are x·(W + ΔW)ᵀ in fp32 for the input it was given."""
    model = _moe("glm4_moe")
    path = make_adapter(model, tmp_path / "a", seed=4, arch="glm4_moe")  # "all-linear"
    library = Library.from_peft([path], progress=False)
    model = model.to(torch.bfloat16)
    lag_triton.patch(model, library, k=1)
    seen = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            assert isinstance(module, LagRouter) and module.routes[0].a_star.dtype == torch.float32
            module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out[0])))
    ids = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
    assert len(seen) == 2
    for name, (x, logits) in seen.items():
        weights = library.modules[name + ".weight"]
        delta = weights.b_star[0].float() @ weights.a_star[0].float()
        want = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]).float(), model.get_submodule(name).weight.float())
        torch.testing.assert_close(logits, want + x.reshape(-1, x.shape[-1]).float() @ delta.T, rtol=1e-5, atol=1e-5)
        assert (logits - want).abs().max() > 1e-2  # the update is there


def test_a_conv1d_weight_or_a_layer_targeted_twice_is_refused_before_patching():
    from transformers.pytorch_utils import Conv1D

    weights, _ = _one_adapter(8, 4)
    for layer, modules, message in (
        (Conv1D(4, 8), {"0.weight": weights}, r"module '0\.weight': a LoRA of a Conv1D's weight"),
        (torch.nn.Linear(8, 4), {"0": weights, "0.weight": weights}, r"'0' is targeted both as '0' and as '0\.weight'"),
    ):
        model = torch.nn.Sequential(layer)
        with pytest.raises(ValueError, match=message):
            lag_triton.patch(model, Library(["a"], modules))
        assert model[0] is layer


def test_hooks_on_an_expert_module_keep_firing_while_it_is_patched(tmp_path):
    model = _moe("qwen3_moe")
    path, experts = _experts(model)
    calls = []
    experts.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    adapter = make_adapter(
        model, tmp_path / "a", seed=1, arch="qwen3_moe", targets=["q_proj"], target_parameters=EXPERTS
    )
    lag_triton.patch(model, Library.from_peft([adapter], progress=False), k=1)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
        assert calls == [torch.Size([14, model.config.hidden_size])]
        lag_triton.unpatch(model)
        model(input_ids=ids)
    assert len(calls) == 2


def test_a_compiled_patched_moe_model_gives_the_eager_output(tmp_path):
    """torch.compile (not fullgraph: the expert loop reads the experts hit on the host) traces the
    router's redirect and the unfolded experts."""
    model = _moe("qwen3_moe")
    paths = [make_adapter(model, tmp_path / f"a{i}", seed=i, arch="qwen3_moe") for i in range(2)]  # "all-linear"
    lag_triton.patch(model, Library.from_peft(paths, progress=False), k=2)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, want)
        torch.testing.assert_close(compiled(input_ids=ids[:, :5]).logits, model(input_ids=ids[:, :5]).logits)

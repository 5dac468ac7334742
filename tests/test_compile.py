"""torch.compile takes a patched model whole: the three ops are opaque custom ops
(lag_triton/kernels/custom_ops.py), so ``fullgraph=True`` finds no graph break, and the compiled
forward equals the eager one.

On CPU the graphs are compiled with the ``aot_eager`` backend (fake-tensor tracing,
functionalisation of the in-place apply, no C++ code generation: seconds, not minutes); on a GPU
with inductor, also under CUDA graphs (``mode="reduce-overhead"``).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from emulated_cuda import install_backend

import lag_triton
from lag_triton.kernels import get_ops

from factories import VOCAB, available_backends, tiny_library, tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return tiny_library(tmp_path_factory.mktemp("adapters"), 7)


@pytest.fixture(scope="module")
def second_library(tmp_path_factory):
    return tiny_library(tmp_path_factory.mktemp("second"), 5, prefix="b", seed=3)


def _backends():
    return available_backends(DEVICE)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("routing", [dict(k=4, top_m=2), dict(router="arrow", top_m=1)], ids=["lag", "arrow"])
def test_compiled_patched_model_fullgraph_equals_eager(library, backend, routing, monkeypatch):
    install_backend(backend, DEVICE, monkeypatch)
    model = tiny_model("llama").to(DEVICE)
    lag_triton.patch(model, library, backend=backend, **routing)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    compiled = torch.compile(
        model, fullgraph=True, dynamic=False, backend="inductor" if DEVICE.type == "cuda" else "aot_eager"
    )
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = compiled(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# The exported graph is the same op calls whatever the backend (its name is an argument); on CPU the
# Triton interpreter's runs would add ~20 s and nothing else.
@pytest.mark.parametrize("backend", [b for b in _backends() if DEVICE.type == "cuda" or b != "triton"])
def test_torch_export_of_a_patched_model_holds_the_three_ops_and_runs(library, backend, monkeypatch):
    """torch.export (deployment without Python's forward): one graph in which each patched layer is
    the three custom ops (exported with gradients on, as here, also the op that carries the routed
    term's gradient); the exported program gives the eager logits."""
    install_backend(backend, DEVICE, monkeypatch)
    model = lag_triton.patch(tiny_model("llama").to(DEVICE), library, backend=backend, k=4, top_m=2)
    ids = _ids(2, 6, seed=5)
    exported = _export(model, ids)
    calls = [str(n.target) for n in exported.graph.nodes if n.op == "call_function" and "lag_triton" in str(n.target)]
    layers = sum(isinstance(m, lag_triton.LagLinear) for m in model.modules())
    ops = ("arrow_topk", "lora_apply", "routed_term_gradient", "spectr_rerank")
    assert sorted(set(calls)) == [f"lag_triton.{op}.default" for op in ops]
    assert len(calls) == len(ops) * layers
    with torch.no_grad():
        want = model(input_ids=ids).logits
    torch.testing.assert_close(exported.module()(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in _backends() if DEVICE.type == "cuda" or b != "triton"])
def test_an_exported_programs_backward_has_the_routed_terms_gradient(library, backend, monkeypatch):
    """The routed term's gradient under tracing was an autograd.Function's, which an exported program
    drops: its input gradient lacked the routed term (83% off). An op with registered autograd
    carries it: the exported program's gradient is the eager model's."""
    install_backend(backend, DEVICE, monkeypatch)
    model = lag_triton.patch(tiny_model("llama").to(DEVICE), library, backend=backend, k=4, top_m=2)
    embeds = model.get_input_embeddings()(_ids(2, 6, seed=7)).detach()
    exported = _export(model, embeds, wrapper=_LogitsOfEmbeddings)
    grads = []
    for forward in (_LogitsOfEmbeddings(model), exported.module()):
        e = embeds.clone().requires_grad_()
        (grad,) = torch.autograd.grad(forward(e).square().sum(), e)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


@pytest.mark.parametrize("backend", [b for b in _backends() if DEVICE.type == "cuda" or b != "triton"])
def test_an_exported_layer_fed_the_programs_input_keeps_its_gradient(backend, monkeypatch):
    """torch.export traces with inputs that need no gradient: a routed layer fed the program's input
    got no gradient op, and the exported program's input gradient lacked its routed term."""
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        pytest.skip("torch 2.4's exporter checks parameters against state_dict keys, which a patched layer renames")
    install_backend(backend, DEVICE, monkeypatch)
    from lag_triton import Library, ModuleWeights

    g = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(4, 16, 2, generator=g))[0].transpose(1, 2).contiguous()
    weights = ModuleWeights(a, torch.randn(4, 16, 2, generator=g), a[:, 0].contiguous(), torch.arange(4))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).to(DEVICE)
    lag_triton.patch(model, Library(list("abcd"), {"0": weights, "2": weights}), backend=backend, k=2, top_m=2)
    x = torch.randn(2, 3, 16, generator=g).to(DEVICE)
    exported = torch.export.export(model, (x,))
    grads = []
    for forward in (model, exported.module()):
        e = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(forward(e).square().sum(), e)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


def test_torch_export_keeps_a_dynamic_sequence_length(library):
    """A patched layer runs its base layer on the flattened tokens, so an exported patched model
    takes any sequence length in its range, as the unpatched one does (reshaping the base layer's
    output to [T, d_out] and viewing it back pinned the length to the example's)."""
    model = lag_triton.patch(tiny_model("llama").to(DEVICE), library, backend="torch", k=4, top_m=2)
    seq = torch.export.Dim("seq", min=2, max=64)
    exported = _export(model, _ids(2, 6, seed=5), dynamic_shapes=({1: seq},))
    for length in (3, 11):
        ids = _ids(2, length, seed=length)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        torch.testing.assert_close(exported.module()(ids), want, rtol=1e-5, atol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


class _LogitsOfEmbeddings(_Logits):
    def forward(self, embeds):
        return self.model(inputs_embeds=embeds, use_cache=False).logits


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _export(model, ids, wrapper=None, **kwargs):
    """torch.export of ``wrapper(model)`` (default: the patched model's logits from ``ids``); skips where
    this torch cannot export the unpatched model with the same arguments either (the failure is not ours)."""
    wrapper = wrapper or _Logits
    try:
        return torch.export.export(wrapper(model), (ids,), **kwargs)
    except Exception as patched_error:
        try:
            torch.export.export(wrapper(tiny_model("llama").to(DEVICE)), (ids,), **kwargs)
        except Exception as base_error:
            pytest.skip(f"torch {torch.__version__} cannot export the unpatched model either: {base_error!r:.300}")
        raise patched_error


def test_patching_an_already_compiled_model_patches_the_model_it_wraps(library):
    """patch / unpatch of ``torch.compile(model)`` swap the wrapped model's layers under their own
    names (the wrapper's are prefixed ``_orig_mod.``), return the wrapper, and its next call
    recompiles: the patched logits, then the base model's again."""
    model = tiny_model("llama").to(DEVICE)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        want = lag_triton.patch(tiny_model("llama").to(DEVICE), library, k=4)(input_ids=ids).logits
        compiled = torch.compile(model, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
        torch.testing.assert_close(compiled(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)
        assert lag_triton.patch(compiled, library, k=4) is compiled
        assert isinstance(model.model.layers[0].mlp.up_proj, lag_triton.LagLinear)
        torch.testing.assert_close(compiled(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        with lag_triton.trace(compiled) as tr:
            compiled(input_ids=ids)
        assert "model.layers.0.mlp.up_proj" in tr.selections
        assert lag_triton.unpatch(compiled) is compiled
        assert not any(isinstance(m, lag_triton.LagLinear) for m in model.modules())
        torch.testing.assert_close(compiled(input_ids=ids).logits, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("libraries", [1, 2])
def test_compiled_backward_equals_eager_reference(library, second_library, backend, libraries, monkeypatch):
    """A compiled forward + backward (fullgraph, gradients on): the input gradient equals the eager
    reference backend's (the kernel backends' backward is written out: routing.routed_term_vjp).
    With two libraries on a module the second's kernels write into the first's output."""
    install_backend(backend, DEVICE, monkeypatch)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = {}
    for name, compile_it in (("torch", False), (backend, True)):
        model = tiny_model("llama").to(DEVICE)
        lag_triton.patch(model, [library, second_library][:libraries], backend=name, k=4, top_m=2)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        forward = lambda e, model=model: model(inputs_embeds=e).logits  # noqa: E731
        if compile_it:
            forward = torch.compile(
                forward, fullgraph=True, dynamic=False, backend="inductor" if DEVICE.type == "cuda" else "aot_eager"
            )
        (grads[compile_it],) = torch.autograd.grad(forward(emb).sum(), emb)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-3, atol=1e-4 * grads[False].abs().max().item())


@pytest.mark.parametrize(
    "backend,compile_it,inside",
    [(b, True, False) for b in _backends()] + [(b, False, True) for b in _backends() if b != "torch"],
)
def test_the_routed_terms_gradient_is_fp32_under_autocast(library, backend, compile_it, inside, monkeypatch):
    """The forward routes with autocast off, and so does the routed term's pullback: it ran in bf16
    when a compiled backward was traced under the call's autocast, or when a kernel backend's
    backward() ran inside the autocast block (6e-3 off; the torch backend's is autograd's own, which
    autocast reaches there too, as it does any layer's). The base weight is 0, so the input gradient
    is the pullback alone; the output gradient is exact in bf16, so the fp32 gradient without
    autocast is the answer."""
    install_backend(backend, DEVICE, monkeypatch)
    model = lag_triton.patch(tiny_model("llama").to(DEVICE), library, backend=backend, k=4, top_m=2)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.base_layer.weight.zero_()
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(6, layer.in_features, generator=g).to(DEVICE)
    grad_out = torch.randn(6, layer.out_features, generator=g).bfloat16().float().to(DEVICE)

    def input_grad(forward, autocast: bool):
        x = x0.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            y = forward(x)
            if inside:
                return torch.autograd.grad(y, x, grad_out.to(y.dtype))[0]
        return torch.autograd.grad(y, x, grad_out.to(y.dtype))[0]

    want = input_grad(layer, autocast=False)
    forward = torch.compile(layer, fullgraph=True, backend="aot_eager") if compile_it else layer
    got = input_grad(forward, autocast=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(
    "backend,fold", [(b, False) for b in _backends() if b != "torch"] + [("triton", True)] * ("triton" in _backends())
)
def test_compiled_decode_step_replays_in_cuda_graphs(library, backend, fold, monkeypatch):
    """Decode steps replayed from CUDA graphs (inductor's reduce-overhead) equal eager; with the
    split reductions folded (LAG_TRITON_FOLD_SPLITS=1) too, whose ticket counters must live outside
    the graphs' memory pool and be zero at every replay."""
    if fold:
        monkeypatch.setenv("LAG_TRITON_FOLD_SPLITS", "1")
    model = tiny_model("llama", dtype=torch.bfloat16).to(DEVICE)
    lag_triton.patch(model, library, backend=backend, k=4, top_m=1)
    mlp = model.model.layers[0].mlp
    step = torch.compile(mlp, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(4):  # warm-up, record, then replays with new inputs
            x = torch.randn(
                1, 48, device=DEVICE, dtype=torch.bfloat16, generator=torch.Generator(DEVICE).manual_seed(seed)
            )
            torch.testing.assert_close(step(x).clone(), mlp(x), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.skipif("triton" not in _backends(), reason="the folded reductions are the Triton backend's")
def test_folded_ops_replay_in_cuda_graphs_as_the_token_count_changes(monkeypatch):
    """The folded kernels' cached ticket counters under inductor's CUDA-graph trees, with the token
    count changing between calls: each new shape warms up eagerly (its allocations routed into the
    graphs' pool) and records its own graph, and the tree checkpoints and restores that pool between
    them, so counters allocated in it could be handed to a graph's outputs. Shapes large enough that
    Arrow decode and the rerank split d_in (tickets taken); with inductor's pool assertions on where
    this torch has them. Every call equals eager."""
    monkeypatch.setenv("LAG_TRITON_FOLD_SPLITS", "1")
    triton_config = torch._inductor.config.triton
    if hasattr(triton_config, "slow_path_cudagraph_asserts"):  # the pool holds only tensors it tracks
        monkeypatch.setattr(triton_config, "slow_path_cudagraph_asserts", True)
    ops = get_ops("triton")
    n, r, d, k = 3000, 6, 4096, 20
    a_star = torch.randn(n, r, d, device=DEVICE, dtype=torch.bfloat16, generator=torch.Generator(DEVICE).manual_seed(0))
    prototypes = a_star[:, 0].contiguous()

    def route(x):
        idx, _ = ops.arrow_topk(x, prototypes, k)
        sel, _, z = ops.spectr_rerank(x, a_star, idx, 1)
        return idx, sel, z

    step = torch.compile(route, fullgraph=True, dynamic=False, mode="reduce-overhead")
    with torch.no_grad():
        for seed, t in enumerate((1, 2, 1, 3, 1, 2, 3, 1)):
            x = torch.randn(
                t, d, device=DEVICE, dtype=torch.bfloat16, generator=torch.Generator(DEVICE).manual_seed(seed)
            )
            got = [v.clone() for v in step(x)]
            want = route(x)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (seed, t)
            torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


# On CPU the reference backend only: the Triton ops go through the compiler as the same custom ops
# (test above), and generating under the interpreter takes 40 s.
@pytest.mark.parametrize("backend", [b for b in _backends() if DEVICE.type == "cuda" or b == "torch"])
def test_generate_with_a_static_cache_compiles_the_patched_forward(library, backend):
    """transformers' own fast path: ``generate(cache_implementation="static")`` compiles the
    forward (on a GPU by default: inductor, ``mode="reduce-overhead"``, so CUDA graphs; on CPU only
    when asked, here with ``aot_eager``). A patched model goes through it whole -- one graph, no
    graph break -- and greedy decoding gives the eager tokens."""
    import transformers
    from torch._dynamo.utils import counters

    if not hasattr(transformers, "CompileConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no CompileConfig: its generate compiles nothing")
    CompileConfig = transformers.CompileConfig

    model = tiny_model("llama").to(DEVICE)
    lag_triton.patch(model, library, backend=backend, k=4, top_m=2)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        want = model.generate(**kwargs)
    config = CompileConfig(fullgraph=True, dynamic=False)
    if DEVICE.type != "cuda":
        config = CompileConfig(fullgraph=True, dynamic=False, backend="aot_eager")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    counters.clear()
    with torch.no_grad():
        got = model.generate(**kwargs, cache_implementation="static", compile_config=config)
    assert counters["stats"]["unique_graphs"] >= 1, "generate did not compile the forward"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(got, want)


def test_fake_implementations_give_the_backends_shapes():
    """The meta functions the compiler traces with agree with what a backend returns."""
    x, p = torch.randn(5, 16), torch.randn(9, 16)
    a, b = torch.randn(9, 3, 16), torch.randn(9, 12, 3)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, fp, fa = mode.from_tensor(x), mode.from_tensor(p), mode.from_tensor(a)
        idx, scores = torch.ops.lag_triton.arrow_topk(fx, fp, 4, None, None, "torch")
        sel, w, z = torch.ops.lag_triton.spectr_rerank(fx, fa, idx, 2, "softmax", 1.0, None, "torch")
    real = get_ops("torch")
    ridx, rscores = real.arrow_topk(x, p, 4)
    rsel, rw, rz = real.spectr_rerank(x, a, ridx, 2)
    for fake_t, real_t in [(idx, ridx), (scores, rscores), (sel, rsel), (w, rw), (z, rz)]:
        assert fake_t.shape == real_t.shape and fake_t.dtype == real_t.dtype
    y = torch.zeros(5, 12)
    torch.ops.lag_triton.lora_apply(y, b, rsel, rw, rz, "torch")
    assert torch.equal(y, real.lora_apply(torch.zeros(5, 12), b, rsel, rw, rz))
    with pytest.raises(ValueError, match="k must be"):
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            torch.ops.lag_triton.arrow_topk(mode.from_tensor(x), mode.from_tensor(p), 10, None, None, "torch")


def test_ops_take_symbolic_k_and_top_m_under_dynamic_compile(library):
    """``dynamic=True`` makes int arguments symbolic (torch 2.4 also a module's int attributes, so a
    patched model's k and top_m): the ops' checks take a SymInt where they take an int."""
    ops = get_ops("torch")
    gen = torch.Generator().manual_seed(2)
    x, p, a = (
        torch.randn(7, 32, generator=gen),
        torch.randn(13, 32, generator=gen),
        torch.randn(13, 4, 32, generator=gen),
    )

    def route(x, p, a, k, top_m):
        idx, _ = ops.arrow_topk(x, p, k)
        return ops.spectr_rerank(x, a, idx, top_m)

    compiled = torch.compile(route, dynamic=True, fullgraph=True, backend="aot_eager")
    for k, top_m in ((5, 2), (6, 3)):
        for got, want in zip(compiled(x, p, a, k, top_m), route(x, p, a, k, top_m), strict=True):
            assert torch.equal(got, want)
    model = tiny_model("llama")
    lag_triton.patch(model, library, backend="torch", k=4, top_m=2)
    compiled_model = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for length in (5, 9):
            ids = torch.randint(0, VOCAB, (2, length), generator=gen)
            torch.testing.assert_close(compiled_model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_ops_handle_pickles_and_copies():
    ops = get_ops("torch")
    assert pickle.loads(pickle.dumps(ops)) == ops == copy.deepcopy(ops)
    with pytest.raises(ValueError, match="unknown backend"):
        get_ops("tpu")

"""A patched tiny model on each kernel backend reproduces the torch reference backend.

On CPU the Triton backend runs under the Triton interpreter (tests/conftest.py) and the cuda
backend's kernels under the CUDA emulator (tests/emulated_cuda.py). On a GPU this also checks
that a patched forward is CUDA-graph capturable.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from emulated_cuda import install_backend

import lag_triton
from lag_triton.kernels import resolve_backend

from factories import VOCAB, tiny_library, tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return tiny_library(tmp_path_factory.mktemp("adapters"), 9, ranks=(2, 3, 4, 5))


def _require(backend: str, mp: pytest.MonkeyPatch) -> None:
    install_backend(backend, DEVICE, mp)
    try:
        resolve_backend(backend, DEVICE)
    except RuntimeError as e:
        pytest.skip(str(e))


def _run(library, backend, dtype, routing, ids):
    model = tiny_model("llama", dtype=dtype).to(DEVICE)
    lag_triton.patch(model, library, backend=backend, **routing)
    with torch.no_grad(), lag_triton.trace(model) as tr:
        logits = model(input_ids=ids).logits
    return logits.float(), tr.selections


DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "routing",
    [
        dict(k=4, top_m=1),
        dict(k=5, top_m=3, combine="softmax"),
        dict(router="arrow", top_m=2),
        dict(router="spectr", top_m=1),
    ],
    ids=["lag", "lag-top3", "arrow", "spectr"],
)
def test_patched_model_matches_reference_backend(library, backend, dtype, routing, monkeypatch):
    _require(backend, monkeypatch)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    want, want_sel = _run(library, "torch", dtype, routing, ids)
    got, got_sel = _run(library, backend, dtype, routing, ids)
    assert got_sel.keys() == want_sel.keys()
    if dtype == torch.float32:
        # fp32 scores differ only in summation order: every routing decision must agree
        for name in want_sel:
            assert torch.equal(got_sel[name], want_sel[name]), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        # low precision: a near-tie may flip a pick; nearly all must agree and logits stay close
        agree = torch.cat([(got_sel[n] == want_sel[n]).flatten() for n in want_sel]).float().mean()
        assert agree > 0.95
        assert (got - want).abs().max() < 0.1 * want.abs().max()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_patched_forward_replays_in_a_cuda_graph(library, backend, monkeypatch):
    _require(backend, monkeypatch)
    model = tiny_model("llama", dtype=torch.bfloat16).to(DEVICE)
    lag_triton.patch(model, library, backend=backend, k=4, top_m=2)
    mlp = model.model.layers[1].mlp  # gate/up/down all patched
    x = torch.randn(5, 48, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(2):  # warm-up compiles kernels outside the capture
            eager = mlp(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mlp(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, mlp(x), rtol=0, atol=0)
        assert not torch.equal(out, eager)


def _input_gradient(library, backend, routing, ids, scoped=False):
    """(logits, d(sum of logits)/d(input embeddings)) of an fp32 tiny model (patched unless
    ``backend`` is None)."""
    model = tiny_model("llama").to(DEVICE)
    if backend is not None:
        lag_triton.patch(model, library, backend=backend, **routing)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    with lag_triton.scope(model, [library.names[:4], None]) if scoped else contextlib.nullcontext():
        logits = model(inputs_embeds=emb).logits
    (grad,) = torch.autograd.grad(logits.sum(), emb)
    return logits.detach(), grad


BACKWARD_ROUTINGS = {  # id: (routing, scoped)
    "lag": (dict(k=4, top_m=1), False),
    "lag-top3-scoped": (dict(k=5, top_m=3, combine="softmax", temperature=0.5), True),
    "lag-uniform": (dict(k=5, top_m=2, combine="uniform"), False),
    "arrow": (dict(router="arrow", top_m=2), False),
    "spectr-scoped": (dict(router="spectr", top_m=2), True),
}
# The backward is the same code for both kernel backends; under the interpreter a triton case costs
# ~15 s, so on CPU triton takes the three that differ most (the emulated cuda, ~0.3 s each, all).
_TRITON_ON_CPU = ("lag-top3-scoped", "arrow", "spectr-scoped")


@pytest.mark.parametrize(
    "backend,routing,scoped",
    [
        pytest.param(backend, routing, scoped, id=f"{name}-{backend}")
        for backend in ("triton", "cuda")
        for name, (routing, scoped) in BACKWARD_ROUTINGS.items()
        if backend == "cuda" or DEVICE.type == "cuda" or name in _TRITON_ON_CPU
    ],
)
def test_backward_matches_reference_backend(library, backend, routing, scoped, monkeypatch):
    """The kernels write the routed term outside autograd; the patched layer's backward adds its
    gradient (routing held fixed), so input gradients equal the differentiable reference
    backend's, for every router, weighting and a scope."""
    _require(backend, monkeypatch)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want_logits, want = _input_gradient(library, "torch", routing, ids, scoped)
    got_logits, got = _input_gradient(library, backend, routing, ids, scoped)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    # fp32 forward values differ in summation order between backends; so do the gradients, a little more
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    _, unpatched = _input_gradient(library, None, {}, ids)
    assert not torch.allclose(got, unpatched, rtol=1e-3, atol=1e-4), "the routed term adds to the gradient"


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_fine_tuning_with_gradient_checkpointing_gets_the_plain_gradients(library, backend, monkeypatch):
    """Training the base model around a patched layer: with gradient checkpointing each layer's
    forward runs again in the backward (routing again, to the same picks), and every parameter
    gradient equals the plain backward's (the library is constant: it gets none)."""
    _require(backend, monkeypatch)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama").to(DEVICE).train()
        lag_triton.patch(model, library, backend=backend, k=4, top_m=2)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    plain, recomputed = grads
    assert all(g is not None for g in plain.values()) and plain.keys() == recomputed.keys()
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(b.requires_grad for b in model.buffers())


def test_backward_through_the_reference_backend_has_the_routed_term(library):
    """backend='torch' is differentiable with the routing held fixed: d(sum of logits)/d(embeddings)
    differs from the unpatched model's, and equals a central finite difference along a direction."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    emb = model.get_input_embeddings()(ids).detach()

    def loss(e):  # the fp64 hidden state (transformers 4.45 cast logits to fp32)
        return model.model(inputs_embeds=e).last_hidden_state.sum()

    e = emb.clone().requires_grad_()
    (g_plain,) = torch.autograd.grad(loss(e), e)
    lag_triton.patch(model, library, k=3, top_m=2, backend="torch")
    e = emb.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(e), e)
    assert not torch.allclose(g, g_plain)
    direction = torch.randn(emb.shape, generator=torch.Generator().manual_seed(3), dtype=emb.dtype)
    # the routed term is computed in fp32 (an fp64 layer routes in fp32): h large enough for its
    # rounding, small enough that no token's routing changes between the two points
    h = 1e-4
    with torch.no_grad():
        fd = (loss(emb + h * direction) - loss(emb - h * direction)) / (2 * h)
    torch.testing.assert_close((g * direction).sum(), fd, rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "routing",
    [dict(k=4, top_m=1), dict(k=5, top_m=3), dict(k=5, top_m=2, combine="uniform"), dict(router="arrow", top_m=2)],
    ids=["lag", "lag-top3", "lag-uniform", "arrow"],
)
def test_routed_term_recomputes_the_forward(routing):
    """routing.routed_term (what the kernel backends' backward differentiates) with the forward's
    picks equals the term route_and_apply added, picks of -1 (a scope) included."""
    from lag_triton.kernels import get_ops
    from lag_triton.routing import RoutingConfig, route, route_and_apply, routed_term

    g = torch.Generator().manual_seed(5)
    n, r, d_in, d_out, t = 30, 4, 24, 20, 9
    a_star, b_star = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    protos, x = a_star[:, 0].clone(), torch.randn(t, d_in, generator=g)
    allowed = torch.rand(2, n, generator=g) < 0.3
    allowed[1] = False  # a row with no adapter: picks -1
    scope = torch.tensor([0, 1] * 4 + [0], dtype=torch.int32)
    config, ops = RoutingConfig(**routing), get_ops("torch")
    y = torch.zeros(t, d_out)
    sel = route_and_apply(x, y, a_star, b_star, protos, config, ops, allowed, scope)
    assert torch.equal(sel, route(x, a_star, protos, config, ops, allowed, scope)[0]) and (sel < 0).any()
    torch.testing.assert_close(routed_term(x, sel, a_star, b_star, protos, config), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "routing",
    [
        dict(k=4, top_m=1),
        dict(k=5, top_m=3, temperature=0.3),
        dict(k=5, top_m=2, combine="uniform"),
        dict(router="arrow", top_m=3, temperature=2.0),
        dict(router="arrow", top_m=1),
    ],
    ids=["lag", "lag-top3", "lag-uniform", "arrow-top3", "arrow"],
)
def test_routed_term_vjp_is_its_gradient(routing, monkeypatch):
    """routing.routed_term_vjp (written out, so a compiled backward can trace it) equals autograd
    through routing.routed_term, with picks of -1 and an all-zero adapter among the picks; in
    chunks of rows too (3 + 3 + 2 here: a long prefill's)."""
    from lag_triton import routing as routing_module
    from lag_triton.routing import RoutingConfig, routed_term, routed_term_vjp

    g = torch.Generator().manual_seed(6)
    n, r, d_in, d_out, t, m = 12, 3, 10, 7, 8, routing["top_m"]
    a_star, b_star = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    a_star[3] = 0  # z = 0: its norm has no direction
    protos = a_star[:, 0].clone()
    sel = torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(t)]).to(torch.int32)
    sel[0, -1], sel[1, 0] = -1, 3
    config = RoutingConfig(**routing)
    x = torch.randn(t, d_in, generator=g, dtype=torch.float32).requires_grad_()
    grad = torch.randn(t, d_out, generator=g)
    (want,) = torch.autograd.grad(routed_term(x, sel, a_star, b_star, protos, config), x, grad)
    got = routed_term_vjp(x.detach(), sel, a_star, b_star, protos, config, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    per_row = m * (r * (d_in + d_out) + d_in) * 4
    monkeypatch.setattr(routing_module, "VJP_CHUNK_BYTES", 3 * per_row + per_row // 2)
    chunked = routed_term_vjp(x.detach(), sel, a_star, b_star, protos, config, grad)
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=1e-6)

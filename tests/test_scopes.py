"""lag_triton.scope: per batch row, the adapters its tokens may be routed to, and no others.

On CPU every test runs the torch reference backend, the Triton kernels under the interpreter
(the masked path of the Arrow select) and the CUDA kernels under the emulator; on a GPU, the
Triton and CUDA backends.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from emulated_cuda import install_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lag_triton

from factories import VOCAB, available_backends, tiny_library, tiny_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_ADAPTERS = 7


def _backends():
    return available_backends(DEVICE)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    docs = tiny_library(tmp, N_ADAPTERS, prefix="doc")
    tasks = tiny_library(tmp, 3, prefix="task", seed=50, targets=["q_proj", "up_proj"])
    return docs, tasks


def _patched(library, backend="torch", **routing):
    model = tiny_model("llama").to(DEVICE)
    lag_triton.patch(model, library, backend=backend, **routing)
    return model


def _ids(rows, length, seed=0):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _routed(model, ids, allowed=None):
    """(logits, trace selections) of one forward, inside a scope when ``allowed`` is given."""
    ctx = lag_triton.scope(model, allowed) if allowed is not None else torch.no_grad()
    with torch.no_grad(), ctx, lag_triton.trace(model) as tr:
        logits = model(input_ids=ids).logits
    return logits, tr.selections


def _assert_within(selections, rows_allowed, length):
    """Every token of row b picked only adapters in rows_allowed[b] (indices), and as many as it could:
    every pick (top_m) finds an adapter unless the set is smaller (each library here targets all of
    its modules with every adapter), so a scope that routed tokens to none would not pass."""
    for module, sel in selections.items():
        per_row = sel.reshape(len(rows_allowed), length, -1)
        for b, allowed in enumerate(rows_allowed):
            picked = set(per_row[b].flatten().tolist()) - {-1}
            assert picked <= set(allowed), (module, b, sorted(picked), sorted(allowed))
            want = min(len(allowed), per_row.shape[-1])
            assert ((per_row[b] >= 0).sum(-1) == want).all(), (module, b, per_row[b].tolist(), want)


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_token_is_routed_outside_its_rows_set(libraries, data):
    """Property: for random routers, k, top_m and per-row sets (empty ones and ones smaller than k
    included), no token of a row uses an adapter outside that row's set."""
    docs, _ = libraries
    backend = data.draw(st.sampled_from(_backends()))
    router = data.draw(st.sampled_from(["lag", "arrow", "spectr"]))
    k = data.draw(st.integers(1, N_ADAPTERS))
    top_m = data.draw(st.integers(1, k if router == "lag" else 3))
    rows = data.draw(st.integers(1, 3))
    sets = [sorted(data.draw(st.sets(st.integers(0, N_ADAPTERS - 1), max_size=N_ADAPTERS))) for _ in range(rows)]
    with pytest.MonkeyPatch.context() as mp:
        install_backend(backend, DEVICE, mp)
        model = _patched(docs, backend, router=router, k=k, top_m=top_m)
        _, selections = _routed(model, _ids(rows, 5, seed=len(sets[0])), sets)
    _assert_within(selections, sets, 5)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("router", ["lag", "arrow", "spectr"])
def test_every_adapter_allowed_is_the_unscoped_model(libraries, backend, router, monkeypatch):
    install_backend(backend, DEVICE, monkeypatch)
    docs, _ = libraries
    model = _patched(docs, backend, router=router, k=3, top_m=2)
    ids = _ids(2, 6)
    want, want_sel = _routed(model, ids)
    everyone = [None, docs.names]
    got, got_sel = _routed(model, ids, everyone)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(got_sel[m], want_sel[m]) for m in want_sel)


@pytest.mark.parametrize("backend", _backends())
def test_an_empty_set_is_the_base_model_for_that_row(libraries, backend, monkeypatch):
    install_backend(backend, DEVICE, monkeypatch)
    docs, _ = libraries
    base = tiny_model("llama").to(DEVICE)
    model = _patched(docs, backend, k=3, top_m=1)
    ids = _ids(2, 7, seed=3)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    logits, sel = _routed(model, ids, [[], ["doc1", "doc4"]])
    torch.testing.assert_close(logits[0], base_logits[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits[1], base_logits[1], atol=1e-3)
    assert all((s.reshape(2, 7, -1)[0] == -1).all() for s in sel.values())


def test_a_mask_and_names_and_indices_are_the_same_scope(libraries):
    docs, _ = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(2, 5, seed=4)
    mask = torch.zeros(2, N_ADAPTERS, dtype=torch.bool)
    mask[0, [1, 2]] = True
    mask[1, 5] = True
    by_mask, _ = _routed(model, ids, mask)
    by_name, _ = _routed(model, ids, [["doc1", "doc2"], ["doc5"]])
    by_index, _ = _routed(model, ids, [[1, 2], [5]])
    by_dict, _ = _routed(model, ids, {0: [{1, 2}, (5,)]})
    for other in (by_name, by_index, by_dict):
        torch.testing.assert_close(other, by_mask, rtol=0, atol=0)
    assert not torch.allclose(by_mask, _routed(model, ids)[0], atol=1e-3)  # it does restrict: not the free model


def test_several_libraries_use_the_names_each_has(libraries):
    docs, tasks = libraries
    model = _patched([docs, tasks], k=2, top_m=1)
    ids = _ids(2, 4, seed=5)
    with torch.no_grad(), lag_triton.scope(model, [["doc3", "task1"], ["doc0"]]), lag_triton.trace(model) as tr:
        model(input_ids=ids)
    for module, sel in tr.library_selections[0].items():
        _assert_within({module: sel}, [[3], [0]], 4)
    for module, sel in tr.library_selections[1].items():  # row 1 names no task adapter: none used
        _assert_within({module: sel}, [[1], []], 4)
    with torch.no_grad(), lag_triton.scope(model, {1: [[0], [2]]}), lag_triton.trace(model) as tr:
        model(input_ids=ids)  # library 0 unrestricted, library 1 by index
    for module, sel in tr.library_selections[1].items():
        _assert_within({module: sel}, [[0], [2]], 4)


def test_generate_with_left_padding_stays_in_scope(libraries):
    """Prefill and cached decode steps alike: every token of a row is routed inside its set."""
    docs, _ = libraries
    model = _patched(docs, k=3, top_m=2)
    ids = _ids(3, 6, seed=6)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    ids[0, :3] = 0
    sets = [[0, 3], [6], [1, 2, 4]]
    with torch.no_grad(), lag_triton.scope(model, sets), lag_triton.trace(model) as tr:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 10)
    # one prefill forward of [3, 6] tokens, then 3 cached steps of [3, 1], row-major within each call
    for module, sel in tr.selections.items():
        assert sel.shape[0] == 3 * 6 + 3 * 3, module
        _assert_within({module: sel[:18]}, sets, 6)
        _assert_within({module: sel[18:].reshape(3, 3, -1).transpose(0, 1)}, sets, 3)  # [step, row] -> rows


def test_beam_search_needs_an_entry_per_beam_and_keeps_each_beam_in_its_rows_set(libraries):
    """generate(num_beams=3) repeats each batch row 3 times: a scope of the unrepeated rows is
    refused saying how to repeat it, and the repeated scope keeps every beam in its row's set."""
    docs, _ = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(2, 5, seed=11)
    rows = [["doc1"], ["doc3", "doc4"]]
    kw = dict(num_beams=3, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"\(6 rows\)\. generate with num_beams .* = 3 repeats each row"):
        with torch.no_grad(), lag_triton.scope(model, rows):
            model.generate(input_ids=ids, **kw)
    with torch.no_grad(), lag_triton.scope(model, [r for r in rows for _ in range(3)]), lag_triton.trace(model) as tr:
        model.generate(input_ids=ids, **kw)
    for module, sel in tr.selections.items():
        prefill = sel[: 6 * 5].reshape(6, 5)  # 6 beams x 5 tokens, then one token per beam per step
        steps = sel[6 * 5 :].reshape(-1, 6).T  # beams are reordered only within their batch row
        assert steps.shape[1] >= 2
        for beam in range(6):
            allowed = {1} if beam < 3 else {3, 4}
            assert set(prefill[beam].tolist()) | set(steps[beam].tolist()) <= allowed, (module, beam)


def test_beam_search_of_an_encoder_decoder_takes_the_repeated_scope_for_its_encoder_too(tmp_path):
    """An encoder-decoder's generate runs the encoder on the batch's own rows and the decoder on them
    repeated per beam: the scope of repeated rows (what the decoder needs) serves the encoder too,
    each input row taking its copies' set (neither form worked); rows whose copies differ are refused."""
    lib = tiny_library(tmp_path, 4, prefix="doc", arch="t5")
    model = tiny_model("t5")
    lag_triton.patch(model, lib, backend="torch", k=2, top_m=1)
    ids = _ids(2, 6, seed=15)
    rows = [["doc0", "doc1"], ["doc2"]]
    with torch.no_grad(), lag_triton.scope(model, [r for r in rows for _ in range(2)]), lag_triton.trace(model) as tr:
        model.generate(input_ids=ids, num_beams=2, max_new_tokens=3, do_sample=False)
    encoder = {m: sel for m, sel in tr.selections.items() if m.startswith("encoder.")}
    assert encoder and all(sel.shape[0] == 2 * 6 for sel in encoder.values())
    _assert_within(encoder, [[0, 1], [2]], 6)
    decoder = {m: sel for m, sel in tr.selections.items() if m.startswith("decoder.") and "DenseReluDense" in m}
    for module, sel in decoder.items():  # a token per beam per step: [steps * 4] -> [4 beams, steps]
        _assert_within({module: sel.reshape(-1, 4).T}, [[0, 1], [0, 1], [2], [2]], sel.shape[0] // 4)
    with pytest.raises(ValueError, match=r"given 4 batch rows, but layer 'encoder\..*\(2 rows\)"):
        with torch.no_grad(), lag_triton.scope(model, [["doc0"], ["doc1"], ["doc2"], ["doc2"]]):
            model.generate(input_ids=ids, num_beams=2, max_new_tokens=2, do_sample=False)


def test_scopes_nest_and_restore(libraries):
    docs, _ = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(1, 5, seed=7)
    free, _ = _routed(model, ids)
    with torch.no_grad(), lag_triton.scope(model, [["doc2"]]):
        outer = model(input_ids=ids).logits
        with lag_triton.scope(model, [["doc5"]]):
            inner = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    torch.testing.assert_close(again, outer, rtol=0, atol=0)
    assert not torch.allclose(inner, outer)
    torch.testing.assert_close(_routed(model, ids)[0], free, rtol=0, atol=0)


def _in_thread(fn):
    """fn() run by another thread: its result, or the exception it raised."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # handed back to the test's thread
            out["value"] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    return out["value"]


def test_a_scope_covers_forwards_of_other_threads_and_only_one_thread_scopes_a_model(libraries):
    """generate() started in a thread beside a streamer runs inside the scope of the thread that
    opened it; a second thread cannot open its own scope on the model meanwhile (each request's
    tokens would be routed by the other's sets): refused, the open scope untouched."""
    docs, _ = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(1, 5, seed=9)
    free, _ = _routed(model, ids)
    scoped, _ = _routed(model, ids, [["doc2"]])
    assert not torch.allclose(scoped, free)

    forward = functools.partial(_logits, model, ids)

    def other_scope():
        with lag_triton.scope(model, [["doc5"]]):
            return forward()

    with lag_triton.scope(model, [["doc2"]]):
        torch.testing.assert_close(_in_thread(forward), scoped, rtol=0, atol=0)
        refused = _in_thread(other_scope)
        assert isinstance(refused, RuntimeError) and "another thread holds a lag_triton.scope" in str(refused)
        torch.testing.assert_close(forward(), scoped, rtol=0, atol=0)
    torch.testing.assert_close(_in_thread(forward), free, rtol=0, atol=0)
    doc5, _ = _routed(model, ids, [["doc5"]])
    torch.testing.assert_close(_in_thread(other_scope), doc5, rtol=0, atol=0)  # free again: any thread


def test_scope_errors_name_what_is_wrong(libraries):
    docs, tasks = libraries
    model = _patched(docs, k=2)
    with pytest.raises(ValueError, match="no attached library has: \\['nope'\\]"):
        with lag_triton.scope(model, [["doc1", "nope"]]):
            pass
    with pytest.raises(
        ValueError, match=r"2 batch rows, but LlamaForCausalLM was called with input_ids of shape \(3, 4\) \(3 rows\)"
    ):
        with torch.no_grad(), lag_triton.scope(model, [["doc1"], ["doc2"]]):
            model(input_ids=_ids(3, 4))
    with pytest.raises(ValueError, match="out of range"):
        with lag_triton.scope(model, [[N_ADAPTERS]]):
            pass
    with pytest.raises(ValueError, match="bool \\[B, N=7\\]"):
        with lag_triton.scope(model, torch.ones(2, 3, dtype=torch.bool)):
            pass
    with pytest.raises(TypeError, match="collection of adapter names"):
        with lag_triton.scope(model, ["doc1"]):  # a row must be a collection, not a bare name
            pass
    with pytest.raises(ValueError, match="no LAG-patched modules"):
        with lag_triton.scope(tiny_model("llama"), [None]):
            pass
    both = _patched([docs, tasks], k=2)
    with pytest.raises(TypeError, match="ambiguous"):
        with lag_triton.scope(both, [[1]]):
            pass


def _scopes_in_force(model):
    from lag_triton.patching import LagLinear

    return {id(m._scope) for m in model.modules() if isinstance(m, LagLinear) and m._scope is not None}


def test_a_second_asyncio_task_cannot_scope_a_model_another_task_holds(libraries):
    """Two requests served by one event loop share a thread: the second task's scope is refused
    (before changing anything) like a second thread's, instead of replacing the first's."""
    import asyncio

    docs, _ = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(1, 5, seed=9)
    free, _ = _routed(model, ids)
    doc2, _ = _routed(model, ids, [["doc2"]])
    got = {}

    forward = functools.partial(_logits, model, ids)

    async def first(second_tried):
        with lag_triton.scope(model, [["doc2"]]):
            await second_tried.wait()
            got["first"] = forward()

    async def second(second_tried):
        try:
            with lag_triton.scope(model, [["doc5"]]):
                got["second"] = forward()
        except RuntimeError as e:
            got["second"] = e
        got["between"] = forward()
        second_tried.set()

    async def main():
        second_tried = asyncio.Event()
        await asyncio.gather(first(second_tried), second(second_tried))

    asyncio.run(main())
    assert isinstance(got["second"], RuntimeError) and "another task" in str(got["second"]), got["second"]
    torch.testing.assert_close(got["between"], doc2, rtol=0, atol=0)  # the first task's scope, untouched
    torch.testing.assert_close(got["first"], doc2, rtol=0, atol=0)
    assert not _scopes_in_force(model)
    torch.testing.assert_close(_routed(model, ids)[0], free, rtol=0, atol=0)


def test_a_task_nests_in_the_scope_it_was_started_under_and_exits_in_any_order(libraries):
    """A task created inside a scope may open one inside it; when the creator's scope closes first,
    the task's stays in force until it closes (exits remove their own scope, restoring nothing)."""
    import asyncio

    docs, _ = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(1, 5, seed=9)
    free, _ = _routed(model, ids)
    doc5, _ = _routed(model, ids, [["doc5"]])
    got = {}

    forward = functools.partial(_logits, model, ids)

    async def child(opened, release):
        with lag_triton.scope(model, [["doc5"]]):
            opened.set()
            await release.wait()
            got["child"] = forward()

    async def main():
        opened, release = asyncio.Event(), asyncio.Event()
        with lag_triton.scope(model, [["doc2"]]):
            task = asyncio.ensure_future(child(opened, release))  # inherits this context
            await opened.wait()
        got["parent closed"] = forward()
        release.set()
        await task
        got["both closed"] = forward()

    asyncio.run(main())
    torch.testing.assert_close(got["parent closed"], doc5, rtol=0, atol=0)
    torch.testing.assert_close(got["child"], doc5, rtol=0, atol=0)
    torch.testing.assert_close(got["both closed"], free, rtol=0, atol=0)
    assert not _scopes_in_force(model)


def _flatten_mlp(model, layer=0):
    """Layer ``layer``'s MLP fed [B*S, d] as Qwen2-MoE's shared expert is (hidden_states.view(-1, d))."""
    mlp = model.model.layers[layer].mlp
    forward = mlp.forward
    mlp.forward = lambda x: forward(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)


def test_a_flattened_input_is_the_batch_row_major(libraries):
    """A layer fed x.view(-1, d) is scoped as the [B, S, d] it came from: same logits, same
    picks, in prefill and in cached decoding (T = B); a flattened input of no whole number of
    tokens per row is refused naming the layer."""
    docs, _ = libraries
    model = _patched(docs, k=3, top_m=2)
    ids = _ids(2, 6, seed=12)
    sets = [["doc1", "doc4"], ["doc2"]]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad(), lag_triton.scope(model, sets), lag_triton.trace(model) as tr:
            logits = model(input_ids=ids).logits
            out = model.generate(input_ids=ids, **kw)
        return logits, out, tr.selections

    want_logits, want_out, want_sel = run()
    _flatten_mlp(model)
    got_logits, got_out, got_sel = run()
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_out, want_out)
    assert all(torch.equal(got_sel[m], want_sel[m]) for m in want_sel)
    up = model.model.layers[0].mlp.up_proj
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj' got a flattened input .* 5 tokens"):
        with torch.no_grad(), lag_triton.scope(model, sets):
            up(torch.randn(5, up.in_features, device=DEVICE))


def test_a_scope_refuses_per_expert_layers_whose_rows_no_shape_tells(libraries):
    """An MoE block feeds each expert's linear layers a gather of its tokens: a scope restricting
    such a layer would route tokens by the wrong row's set, so it is refused, the model untouched."""
    from torch import nn

    docs, _ = libraries
    model = tiny_model("llama").to(DEVICE)
    mlp = model.model.layers[0].mlp
    expert = nn.Module()
    expert.up_proj = mlp._modules.pop("up_proj")
    mlp.experts = nn.ModuleList([expert])
    name = "model.layers.0.mlp.up_proj"
    moved = lag_triton.Library(docs.names, {name.replace("mlp.", "mlp.experts.0."): docs.modules[name]})
    lag_triton.patch(model, moved, backend="torch", k=2)
    with pytest.raises(ValueError, match=r"cannot restrict layer 'model\.layers\.0\.mlp\.experts\.0\.up_proj'"):
        with lag_triton.scope(model, [["doc1"]]):
            pass
    assert not _scopes_in_force(model)


def test_the_dict_form_checks_names_and_an_empty_dict_restricts_nothing(libraries):
    docs, tasks = libraries
    model = _patched([docs, tasks], k=2, top_m=1)
    ids = _ids(2, 4, seed=13)
    with pytest.raises(ValueError, match=r"library 0 does not have: \['typo'\]"):
        with lag_triton.scope(model, {0: [["doc1", "typo"], None]}):
            pass
    with pytest.raises(ValueError, match=r"library 1 does not have: \['doc1'\]"):  # another library's name
        with lag_triton.scope(model, {1: [["doc1"], None]}):
            pass
    assert not _scopes_in_force(model)
    free, free_sel = _routed(model, ids)
    unrestricted, sel = _routed(model, ids, {})
    torch.testing.assert_close(unrestricted, free, rtol=0, atol=0)
    assert all(torch.equal(sel[m], free_sel[m]) for m in free_sel)
    with torch.no_grad(), lag_triton.scope(model, [["doc1"], ["doc2"]]):
        outer = model(input_ids=ids).logits
        with lag_triton.scope(model, {}):  # an inner scope replaces the outer: nothing restricted
            inner = model(input_ids=ids).logits
    assert not torch.allclose(outer, free, atol=1e-3)
    torch.testing.assert_close(inner, free, rtol=0, atol=0)


def test_a_bool_tensor_is_refused_with_several_libraries(libraries):
    """A [B, N] mask indexes one library's names; which one is ambiguous when several are attached."""
    docs, tasks = libraries
    twin = lag_triton.Library([n.replace("task", "twin") for n in tasks.names], tasks.modules)
    model = _patched([tasks, twin], k=2, top_m=1)
    mask = torch.zeros(1, len(tasks.names), dtype=torch.bool)
    mask[0, 1] = True
    with pytest.raises(TypeError, match=r"bool tensor \[B, N\].*ambiguous.*\{library index: mask \[B, N\]\}"):
        with lag_triton.scope(model, mask):
            pass
    with pytest.raises(TypeError, match="bool mask row is ambiguous"):
        with lag_triton.scope(model, [mask[0]]):
            pass
    assert not _scopes_in_force(model)
    ids = _ids(1, 4, seed=14)
    with torch.no_grad(), lag_triton.scope(model, {1: mask}), lag_triton.trace(model) as tr:
        model(input_ids=ids)
    for module, sel in tr.library_selections[1].items():
        _assert_within({module: sel}, [[1]], 4)


def test_numpy_and_tensor_indices_and_masks_are_rows_and_a_generator_is_read_once(libraries):
    import numpy as np

    docs, tasks = libraries
    model = _patched(docs, k=2, top_m=1)
    ids = _ids(2, 5, seed=4)
    want, _ = _routed(model, ids, [[1, 2], [5]])
    row_mask = torch.zeros(N_ADAPTERS, dtype=torch.bool)
    row_mask[[1, 2]] = True
    for allowed in (
        [[np.int64(1), np.int32(2)], [np.uint8(5)]],
        [np.array([1, 2]), np.array([5])],
        [torch.tensor([1, 2]), torch.tensor([5], dtype=torch.int32)],
        [[torch.tensor(1), 2], (torch.tensor(5),)],
        [row_mask, np.arange(N_ADAPTERS) == 5],
        [np.array(["doc1", "doc2"]), ["doc5"]],
        (row for row in [[1, 2], [5]]),
    ):
        torch.testing.assert_close(_routed(model, ids, allowed)[0], want, rtol=0, atol=0, msg=repr(allowed))
    for row, error in (
        (torch.tensor([1.0]), "row 0: adapter indices must be integers"),
        (np.array([[1, 2]]), r"row 0: an array or tensor row must be 1-D"),
        ([True], "row 0: a scope row holds adapter names .* got True"),
        ([1.5], "row 0: a scope row holds adapter names .* got 1.5"),
    ):
        with pytest.raises(TypeError, match=error):
            with lag_triton.scope(model, [row]):
                pass
    with pytest.raises(ValueError, match="row 0: a bool mask row for library 0 needs 7 entries, got 3"):
        with lag_triton.scope(model, [torch.ones(3, dtype=torch.bool)]):
            pass
    both = _patched([docs, tasks], k=2, top_m=1)  # each library reads every row of the generator
    with torch.no_grad(), lag_triton.scope(both, (r for r in [["doc3", "task1"], ["doc0"]])):
        with lag_triton.trace(both) as tr:
            both(input_ids=_ids(2, 4, seed=5))
    for module, sel in tr.library_selections[1].items():
        _assert_within({module: sel}, [[1], []], 4)


def test_a_model_copied_or_pickled_inside_a_scope_is_in_no_scope(libraries):
    """The scope's call checks are hooks on the model: closures, they made pickle and torch.save fail
    inside the block, and a deep copy made there kept checking every call against the closed scope's
    batch size. Copies hold an inert hook now, and route unscoped (as their layers do)."""
    import copy
    import io
    import pickle

    docs, _ = libraries
    model = _patched(docs, k=2)
    unscoped = _logits(model, _ids(3, 5))
    with lag_triton.scope(model, [["doc0"], ["doc1"]]):
        copied = copy.deepcopy(model)
        loaded = pickle.loads(pickle.dumps(model))
        buffer = io.BytesIO()
        torch.save(model, buffer)
        with pytest.raises(ValueError, match="was given 2 batch rows"):
            model(input_ids=_ids(3, 5))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    for twin in (copied, loaded, saved):
        torch.testing.assert_close(_logits(twin, _ids(3, 5)), unscoped, rtol=0, atol=0)


def test_a_scoped_model_compiles_whole(libraries):
    """The scope's hook on the model noted the call's tokens in a context variable, which dynamo
    cannot trace: fullgraph compile of a scoped call failed, and without fullgraph it broke the graph
    three times. A compiled call keeps the batch-size check, and routes each row in its set."""
    docs, _ = libraries
    model = _patched(docs, k=2)
    ids = _ids(2, 6)
    torch._dynamo.reset()  # fullgraph: another test's compiles must not have used up the recompile limit
    with lag_triton.scope(model, [["doc2"], ["doc5"]]):
        want = _logits(model, ids)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            got = compiled(input_ids=ids).logits
        # raised while tracing (which fullgraph would wrap in its own error): without it, as eagerly
        with pytest.raises(ValueError, match="was given 2 batch rows"), torch.no_grad():
            torch.compile(model, backend="aot_eager")(input_ids=_ids(3, 6))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_scoped_layer_fed_flattened_tokens_compiles_whole():
    """A 2-D layer input is read as the batch flattened row-major; its check against the call's token
    count read a context variable that dynamo cannot trace (fullgraph compile of such a layer failed)."""
    from lag_triton.library.weights import ModuleWeights

    gen = torch.Generator().manual_seed(3)
    n, r, d_in, d_out = 5, 3, 8, 6
    a = torch.randn(n, r, d_in, generator=gen)
    weights = ModuleWeights(a, torch.randn(n, d_out, r, generator=gen), a[:, 0].clone(), torch.arange(n))
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    lag_triton.patch(model, lag_triton.Library([f"a{i}" for i in range(n)], {"0": weights}), k=3, top_m=2)
    x = torch.randn(4, d_in, generator=gen)  # 2 batch rows of 2 tokens
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with lag_triton.scope(model, [["a1"], ["a2"]]), torch.no_grad():
        scoped = model(x)
        torch.testing.assert_close(compiled(x), scoped)
    with torch.no_grad():
        assert not torch.allclose(model(x), scoped)  # the scope changed the picks
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"][-1 if DEVICE.type == "cpu" else 0 :])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_under_the_forwards_scope(libraries, backend, reentrant, monkeypatch):
    """Checkpointing runs each layer's forward again inside backward(): inside the scope's block
    that is the forward's routing and gradient. After the block a kernel backend's layers routed
    unscoped there (other picks: silently wrong gradients; the torch backend's saved tensors differ,
    so torch's checkpoint refuses it itself); each scoped forward's output is tagged with its scope,
    and the forward run again under another is refused, whatever ran in between (a forward without
    gradients) or the mode (eval). Reentrant checkpointing's first forward runs without gradients
    (no tag): only the right use is checked there. On CPU one kernel backend (the last: the emulated
    CUDA kernels where they build; the Triton interpreter takes 40 s here)."""
    install_backend(backend, DEVICE, monkeypatch)
    docs, _ = libraries
    ids = _ids(2, 7, seed=8)

    def grads(checkpointing: bool, inside: bool, between: bool = False, train: bool = True, other=None):
        model = tiny_model("llama").to(DEVICE).train(train)
        lag_triton.patch(model, docs, backend=backend, k=4, top_m=2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.train()  # transformers checkpoints in training mode only ...
            if not train:  # ... so eval mode checkpoints by hand
                model.eval()
                model.model.layers[0].forward = functools.partial(
                    torch.utils.checkpoint.checkpoint, model.model.layers[0].forward, use_reentrant=reentrant
                )
        with lag_triton.scope(model, [["doc0", "doc3"], ["doc1"]]):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            if inside:
                loss.backward()
        if between:
            with torch.no_grad():
                model(input_ids=ids)
        if not inside:
            with lag_triton.scope(model, other) if other else contextlib.nullcontext():
                loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    want = grads(checkpointing=False, inside=False)
    got = grads(checkpointing=True, inside=True)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)
    if reentrant:
        return
    ours = r"ran this layer's forward again \(gradient checkpointing\) under another"
    # run again under no scope, the forward's tag is missing from what it saves: torch's checkpoint
    # refuses that itself, before the tag's check could
    theirs = r"A different number of tensors was saved"
    for between, train, other in (
        (False, True, None),
        (True, True, None),
        (False, False, None),
        (True, True, [["doc2"], None]),
    ):
        with pytest.raises(RuntimeError, match=ours if other else f"{ours}|{theirs}"):
            grads(checkpointing=True, inside=False, between=between, train=train, other=other)

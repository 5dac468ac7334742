"""A patched model saves, loads, copies, traces and refuses safely (issue 11, items 1, 2, 4-7, 12)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import os
import pickle
import re
import shutil
import threading
import warnings
import weakref

import numpy as np
import pytest
import torch

import lag_triton
from lag_triton import Library, ModuleWeights
from lag_triton.kernels import backend_unavailable_reason
from lag_triton.patching import LagLinear, LibraryNotSavedWarning

from factories import VOCAB, make_adapter, peft_logits, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _unpatched(model) -> bool:
    return not any(isinstance(m, LagLinear) for m in model.modules())


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    model = tiny_model("llama")
    return [make_adapter(model, tmp / f"a{i}", seed=i, r=2 + i % 3) for i in range(4)]


@pytest.fixture(scope="module")
def library(adapter_dirs):
    return Library.from_peft(adapter_dirs, progress=False)


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


# -- 1. state_dict / save_pretrained carry the base model ------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_of_a_patched_model_loads_into_the_plain_class(arch, tmp_path):
    model = tiny_model(arch)
    lib = Library.from_peft([make_adapter(model, tmp_path / "a", seed=1, arch=arch)], progress=False)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = _logits(model, IDS)
    lag_triton.patch(model, lib, k=1)
    patched = _logits(model, IDS)
    assert (patched - base).abs().max() > 1e-3
    with pytest.warns(LibraryNotSavedWarning, match="Library.save"):
        state = model.state_dict()
    assert list(state) == list(base_state)
    assert all(torch.equal(state[k], base_state[k]) for k in state)
    with pytest.warns(LibraryNotSavedWarning):
        model.save_pretrained(tmp_path / "saved")
    fresh = type(model).from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(_logits(fresh, IDS), base, rtol=0, atol=0)
    lag_triton.patch(fresh, lib, k=1)
    torch.testing.assert_close(_logits(fresh, IDS), patched, rtol=0, atol=0)


def test_state_dicts_load_both_ways_strictly(tmp_path):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    lib = Library.from_peft([make_adapter(tiny_model("llama"), tmp_path / "a", seed=0)], progress=False)
    lag_triton.patch(model, lib, k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraryNotSavedWarning)
        fresh = tiny_model("llama", seed=2)
        assert not fresh.load_state_dict(model.state_dict(), strict=True).missing_keys
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    # a base checkpoint (other weights) loaded into the patched model == that model, patched
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    want = _logits(lag_triton.patch(other, lib, k=1), IDS)
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)


def test_unpatched_model_no_longer_warns(tmp_path):
    model = tiny_model("llama")
    lib = Library.from_peft([make_adapter(tiny_model("llama"), tmp_path / "a", seed=0)], progress=False)
    lag_triton.unpatch(lag_triton.patch(model, lib))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryNotSavedWarning)
        model.state_dict()


# -- 2. the patched model owns its library tensors -------------------------------------------------
def test_patched_model_never_reads_the_library_file_again(library, adapter_dirs, tmp_path):
    path, other = tmp_path / "live.lag", tmp_path / "other.lag"
    library.save(path)
    Library.from_peft(adapter_dirs[::-1], names=[f"b{i}" for i in range(4)], progress=False).save(other)
    assert os.path.getsize(path) == os.path.getsize(other)
    model = lag_triton.patch(tiny_model("llama"), path, k=2)
    want = _logits(model, IDS)
    shutil.copyfile(other, path)  # same size, other adapters: a live map would now read them
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)
    os.truncate(path, 100)  # a live map would now SIGBUS
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)


def test_patched_model_shares_no_memory_with_the_library(adapter_dirs):
    lib = Library.from_peft(adapter_dirs, progress=False)
    model = lag_triton.patch(tiny_model("llama"), lib, k=2)
    want = _logits(model, IDS)
    for m in lib.modules.values():
        for t in (m.a_star, m.b_star, m.prototypes):
            t.mul_(-3.0)
        m.adapter_ids.copy_(m.adapter_ids.flip(0))
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)


# -- 4. copies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_patched_model_copies(library, how):
    model = lag_triton.patch(tiny_model("llama"), library, k=2, top_m=2)
    want = _logits(model, IDS)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_logits(clone, IDS), want, rtol=0, atol=0)
    with lag_triton.trace(clone) as tr:
        _logits(clone, IDS)
    assert tr.selections["model.layers.0.mlp.up_proj"].shape == (IDS.numel(), 2)
    lag_triton.unpatch(clone)
    assert _unpatched(clone)


# -- moving a patched model ----------------------------------------------------------------------------
def _backends(model) -> set[str]:
    return {r.backend for m in model.modules() if isinstance(m, LagLinear) for r in m.routes}


_NO_TRITON_ON_CPU = backend_unavailable_reason("triton", torch.device("cpu"))  # None under the interpreter
needs_triton_on_cpu = pytest.mark.skipif(
    _NO_TRITON_ON_CPU is not None, reason=f"Triton cannot run here: {_NO_TRITON_ON_CPU}"
)


@needs_triton_on_cpu
def test_auto_backend_is_chosen_again_when_the_model_moves(library, monkeypatch):
    """backend="auto" follows the model: whatever moves or casts it (here .float() after the choice
    changed, as .cuda() after patching on CPU changes it) chooses again, B* laid out for the new
    backend, and the output stays the reference's."""
    model = lag_triton.patch(tiny_model("llama"), library, k=3, top_m=2)
    assert _backends(model) == {"torch"}
    want = _logits(model, IDS)
    monkeypatch.setenv("LAG_TRITON_BACKEND", "triton")
    model.float()
    assert _backends(model) == {"triton"}
    for m in model.modules():
        if isinstance(m, LagLinear):
            assert m.routes[0].b_star.stride(1) == 1  # the Triton apply's rank-major layout
    torch.testing.assert_close(_logits(model, IDS), want, rtol=1e-4, atol=1e-5)
    monkeypatch.delenv("LAG_TRITON_BACKEND")
    model.float()
    assert _backends(model) == {"torch"}
    torch.testing.assert_close(_logits(model, IDS), want, rtol=1e-4, atol=1e-5)


@needs_triton_on_cpu
def test_an_explicit_backend_that_cannot_follow_the_model_says_so(library):
    """A backend named at patch time stays where the model goes; where it cannot run, the forward
    names the backend, the device and the way out. "auto" there chooses one that can."""
    explicit = lag_triton.patch(tiny_model("llama"), library, backend="triton").to("meta")
    auto = lag_triton.patch(tiny_model("llama"), library).to("meta")
    assert _backends(explicit) == {"triton"} and _backends(auto) == {"torch"}
    x = torch.randn(5, 48, device="meta")
    with pytest.raises(RuntimeError, match=r"backend='triton', which cannot run on meta: triton kernels need CUDA"):
        explicit.model.layers[0].mlp.up_proj(x)
    assert auto.model.layers[0].mlp.up_proj(x).shape == (5, 80)


@needs_triton_on_cpu
def test_auto_backend_is_chosen_again_when_a_saved_model_loads_elsewhere(library, monkeypatch):
    """A model saved where "auto" chose Triton (a GPU machine; simulated here by the override) and
    loaded where it chooses another backend (map_location="cpu", a machine without Triton) routes
    with the backend of the place it loaded, not the one it was saved with."""
    monkeypatch.setenv("LAG_TRITON_BACKEND", "triton")
    model = lag_triton.patch(tiny_model("llama"), library, k=3, top_m=2)
    assert _backends(model) == {"triton"}
    want = _logits(model, IDS)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.delenv("LAG_TRITON_BACKEND")
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert _backends(loaded) == {"torch"}
    torch.testing.assert_close(_logits(loaded, IDS), want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_patched_on_cpu_then_moved_to_the_gpu_routes_with_the_gpu_backend(library):
    from lag_triton.kernels import resolve_backend

    moved = lag_triton.patch(tiny_model("llama"), library, k=3).cuda()
    assert _backends(moved) == {resolve_backend("auto", "cuda")}
    direct = lag_triton.patch(tiny_model("llama").cuda(), library, k=3)
    ids = IDS.cuda()
    torch.testing.assert_close(_logits(moved, ids), _logits(direct, ids), rtol=0, atol=0)
    moved.cpu()
    assert _backends(moved) == {"torch"}
    torch.testing.assert_close(_logits(moved, IDS), _logits(direct, ids).cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if _NO_TRITON_ON_CPU is None else []))
def test_a_patched_layers_output_may_be_changed_in_place_with_gradients_on(library, backend):
    """Model code scales or adds into a projection's output in place (out.add_(...), +=); with the
    kernels' output passed through the gradient Function that was refused ("a view ... is being
    modified inplace"). The input gradient is the reference's."""
    grads = []
    for name in ("torch", backend):
        layer = lag_triton.patch(tiny_model("llama"), library, k=3, top_m=2, backend=name).model.layers[0].mlp.up_proj
        x = torch.randn(5, 48, generator=torch.Generator().manual_seed(4), requires_grad=True)
        y = layer(x)
        y.mul_(2)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        grads.append(x.grad)
    # the loss weights y by up to 479: gradient elements that cancel to ~1 among terms ~1e3 carry those
    # terms' fp32 rounding (the backends sum in other orders; 3e-4 on an AMD EPYC), so atol is set from the scale
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6 * grads[0].abs().max().item())


# -- 5. autocast ---------------------------------------------------------------------------------------
def test_autocast_forward_is_as_close_to_fp32_as_peft_under_autocast(adapter_dirs):
    """One adapter, k=1 (no routing to flip): our autocast error vs the fp32 PEFT forward is PEFT's own."""
    truth = peft_logits(tiny_model("llama"), adapter_dirs[0], IDS)
    model = lag_triton.patch(tiny_model("llama"), Library.from_peft(adapter_dirs[:1], progress=False), k=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_low = peft_logits(tiny_model("llama"), adapter_dirs[0], IDS)
        got = _logits(model, IDS)
    peft_err = (peft_low.float() - truth).abs().max()
    assert got.dtype == peft_low.dtype  # bf16 (transformers 4.45 upcast logits to fp32)
    assert (got.float() - truth).abs().max() <= 2 * peft_err + 1e-3


def test_autocast_routes_every_token_in_the_library_dtype(library):
    model = lag_triton.patch(tiny_model("llama"), library, k=2)
    with lag_triton.trace(model) as full:
        _logits(model, IDS)
    with torch.autocast("cpu", dtype=torch.bfloat16), lag_triton.trace(model) as tr:
        _logits(model, IDS)
    assert tr.selections.keys() == full.selections.keys()
    agree = torch.cat([(tr.selections[n] == s).flatten() for n, s in full.selections.items()]).float().mean()
    assert agree > 0.8  # bf16 activations move near-ties only


def test_patched_forward_compiles_whole_with_and_without_a_trace(library):
    """autocast guard, trace hook and backend lookup stay inside one torch.compile graph."""
    model = lag_triton.patch(tiny_model("llama"), library, k=2, backend="torch")
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = mlp(x)
        compiled = torch.compile(mlp, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
        with lag_triton.trace(model) as tr:
            compiled(x)
    assert tr.selections["model.layers.0.mlp.up_proj"].shape == (5, 1)


# -- 6. dtypes, devices and values the forward needs ------------------------------------------------------
def test_fp64_model_and_double_after_patching_match_peft(adapter_dirs):
    want = peft_logits(tiny_model("llama", dtype=torch.float64), adapter_dirs[0], IDS)
    lib = Library.from_peft(adapter_dirs[:1], progress=False)
    model = lag_triton.patch(tiny_model("llama", dtype=torch.float64), lib, k=1)
    assert model.model.layers[0].mlp.up_proj.routes[0].a_star.dtype == torch.float32
    got = _logits(model, IDS)
    assert got.dtype == want.dtype  # fp64 (transformers 4.45 cast logits to fp32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    later = lag_triton.patch(tiny_model("llama"), lib, k=1).double()
    torch.testing.assert_close(_logits(later, IDS), want, rtol=1e-5, atol=1e-5)
    half = copy.deepcopy(later).to(torch.bfloat16)
    assert half.model.layers[0].mlp.up_proj.routes[0].a_star.dtype == torch.bfloat16
    assert _logits(half, IDS).dtype == _logits(tiny_model("llama", dtype=torch.bfloat16), IDS).dtype


def test_weights_that_cannot_route_are_refused_on_construction(library):
    m = library.modules["model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match=r"a_star has dtype torch.int32"):
        ModuleWeights(m.a_star.to(torch.int32), m.b_star, m.prototypes, m.adapter_ids)
    with pytest.raises(ValueError, match="no adapters"):
        ModuleWeights(m.a_star[:0], m.b_star[:0], m.prototypes[:0], m.adapter_ids[:0])
    with pytest.raises(ValueError, match="adapter_ids has dtype torch.float64"):
        ModuleWeights(m.a_star, m.b_star, m.prototypes, m.adapter_ids.double())


@pytest.mark.parametrize(
    "defect,needle",
    [
        ("nan", "a_star holds NaN or inf"),
        ("id_out_of_range", "adapter_ids holds 9, outside"),
        ("negative_id", "adapter_ids holds -1, outside"),
        ("ids_out_of_order", r"adapter_ids must increase from row to row \(rows in library order"),
        ("meta_library", "meta device"),
    ],
)
def test_library_values_the_forward_needs_are_checked_before_patching(library, defect, needle):
    modules = dict(library.modules)
    name = "model.layers.1.self_attn.v_proj"
    m = modules[name]
    if defect == "nan":
        a = m.a_star.clone()
        a[1, 0, 3] = float("nan")
        modules[name] = ModuleWeights(a, m.b_star, m.prototypes, m.adapter_ids, m.ranks)
    elif defect == "ids_out_of_order":  # the same adapters, rows in another order: ties would follow the rows
        flip = [f.flip(0) for f in (m.a_star, m.b_star, m.prototypes, m.adapter_ids, m.ranks)]
        modules[name] = ModuleWeights(*flip)
    elif defect in ("id_out_of_range", "negative_id"):
        ids = m.adapter_ids.clone()
        ids[-1] = 9 if defect == "id_out_of_range" else -1
        modules[name] = ModuleWeights(m.a_star, m.b_star, m.prototypes, ids, m.ranks)
    bad = Library(library.names, modules)
    if defect == "meta_library":
        bad = library.to("meta")
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=needle):
        lag_triton.patch(model, bad)
    assert _unpatched(model)


def test_meta_and_quantized_models_are_refused(library):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_model("llama").config)
    with pytest.raises(ValueError, match=r"meta device .* before patching"):
        lag_triton.patch(meta, library)
    assert _unpatched(meta)
    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"'model.layers.1.mlp.down_proj' has a torch.float8_e4m3fn weight"):
        lag_triton.patch(model, library)
    assert _unpatched(model)


class _SizedByWeight(torch.nn.Module):
    """A linear layer whose sizes are read-only properties of its weight, as some quantised layers have."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().clone())

    in_features = property(lambda self: self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_a_layer_with_read_only_sizes_is_patched(library):
    """Wrapping such a layer must not write its sizes (that raised halfway through the swap, the
    modules before it already patched); it routes like the nn.Linear it copies."""
    model, want_model = tiny_model("llama"), tiny_model("llama")
    name = list(library.modules)[-1]  # swapped last: every other module would already be patched
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, _SizedByWeight(model.get_submodule(name)))
    lag_triton.patch(model, library, k=3)
    lag_triton.patch(want_model, library, k=3)
    assert model.get_submodule(name).in_features == want_model.get_submodule(name).in_features
    torch.testing.assert_close(_logits(model, IDS), _logits(want_model, IDS), rtol=0, atol=0)
    lag_triton.unpatch(model)
    assert isinstance(model.get_submodule(name), _SizedByWeight) and _unpatched(model)


def test_a_model_offloaded_by_accelerate_is_refused_and_still_runs(library):
    """Offloaded layers (accelerate's cpu_offload / disk offload) keep meta weights between forwards:
    refused, saying why, not with the advice for a model whose weights were never loaded."""
    accelerate = pytest.importorskip("accelerate")  # a PEFT dependency
    model = tiny_model("llama")
    want = _logits(model, IDS)
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(ValueError, match=r"module 'model.layers.0.[a-z_.]+' is offloaded by accelerate"):
        lag_triton.patch(model, library)
    assert _unpatched(model)
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)


# -- 7. traces nest and are per thread ----------------------------------------------------------------------
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.uint8])
def test_traces_give_int64_library_indices_whatever_the_ids_dtype(library, ids_dtype):
    """A Library may hold its index maps in any integer dtype; a trace gives library indices as
    int64 with -1 for no adapter (a uint8 map once turned the -1 of an empty scope into 255)."""
    narrow = Library(
        library.names,
        {
            n: ModuleWeights(m.a_star, m.b_star, m.prototypes, m.adapter_ids.to(ids_dtype), m.ranks)
            for n, m in library.modules.items()
        },
    )
    traced = {}
    for lib in (library, narrow):
        model = lag_triton.patch(tiny_model("llama"), lib, k=3)
        with lag_triton.trace(model) as tr, lag_triton.scope(model, [None, []]):
            _logits(model, IDS)
        traced[lib is narrow] = tr.selections
    for module, picks in traced[True].items():
        assert picks.dtype == torch.int64
        assert torch.equal(picks, traced[False][module]) and (picks[IDS.shape[1] :] == -1).all()


def test_nested_traces_each_get_their_whole_block(library):
    model = lag_triton.patch(tiny_model("llama"), library, k=2)
    name = "model.layers.1.mlp.down_proj"
    with lag_triton.trace(model) as outer:
        _logits(model, IDS)
        with lag_triton.trace(model) as inner:
            _logits(model, IDS[:, :4])
        _logits(model, IDS[:1])
    assert inner.selections[name].shape[0] == 2 * 4
    assert outer.selections[name].shape[0] == 2 * 9 + 2 * 4 + 9
    assert torch.equal(outer.selections[name][18:26], inner.selections[name])


def test_each_thread_gets_its_own_trace(library):
    model = lag_triton.patch(tiny_model("llama"), library, k=2)
    name = "model.layers.0.self_attn.q_proj"
    inputs = {"a": IDS, "b": IDS[:1, :5]}
    alone = {}
    for key, ids in inputs.items():
        with lag_triton.trace(model) as tr:
            _logits(model, ids)
        alone[key] = tr.selections[name]
    barrier, results, errors = threading.Barrier(2), {}, []

    def work(key):
        try:
            with lag_triton.trace(model) as tr:
                barrier.wait()
                for _ in range(3):
                    _logits(model, inputs[key])
                barrier.wait()  # neither trace closes before both threads have run every forward
            results[key] = tr.selections[name]
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(key,)) for key in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key in inputs:
        assert torch.equal(results[key], alone[key].repeat(3, 1)), key
    assert all(m._trace_count == 0 for m in model.modules() if isinstance(m, LagLinear))


# -- 12. argument messages -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_arg,libraries,error,needle",
    [
        ("model", None, TypeError, "patch() takes a lag_triton.Library, a path to a saved library, or a list"),
        ("model", {"a": 1}, TypeError, "got dict"),
        ("model", [3], TypeError, "expected a lag_triton.Library or a path to one, got int"),
        ("model", [], ValueError, "at least one library"),
        ("object", "library", TypeError, "patch() needs a torch.nn.Module, got object"),
    ],
)
def test_bad_arguments_name_what_is_wrong(library, model_arg, libraries, error, needle):
    model = tiny_model("llama") if model_arg == "model" else object()
    with pytest.raises(error) as info:
        lag_triton.patch(model, library if libraries == "library" else libraries)
    assert needle in str(info.value)


def test_numpy_and_tensor_scalars_are_accepted(library):
    want = _logits(lag_triton.patch(tiny_model("llama"), library, k=3, top_m=2, temperature=0.5), IDS)
    for k, top_m, temperature in [
        (np.int64(3), np.int32(2), np.float32(0.5)),
        (torch.tensor(3), 2, torch.tensor(0.5)),
        (3, 2, np.float64(0.5)),
    ]:
        model = lag_triton.patch(tiny_model("llama"), library, k=k, top_m=top_m, temperature=temperature)
        torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)
    for bad in (True, "1", None):
        with pytest.raises(ValueError, match="temperature"):
            lag_triton.patch(tiny_model("llama"), library, temperature=bad)


# -- running out of memory while patching -------------------------------------------------------------------
@pytest.mark.parametrize("where", ["library copy", "b_star layout"])
def test_running_out_of_memory_leaves_the_model_untouched(library, monkeypatch, where):
    """An allocation that fails on the third module -- the library copy, or the backend's B* layout
    copy made as the module's route is built -- leaves the model as it was (already attached
    libraries included) and says which library, module and device, and how much was needed."""
    model = lag_triton.patch(tiny_model("llama"), library, backend="torch")
    want = _logits(model, IDS)
    layers_before = {name: list(m.routes) for name, m in model.named_modules() if isinstance(m, LagLinear)}
    calls = []

    def fail_third(original):
        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(*args, **kwargs)

        return wrapped

    copies = []  # weak references to the library copies this patch makes

    def recorded(original):
        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            copies.append(weakref.ref(out.a_star))
            return out

        return wrapped

    monkeypatch.setattr(ModuleWeights, "to", recorded(ModuleWeights.to))
    if where == "library copy":
        monkeypatch.setattr(ModuleWeights, "to", fail_third(ModuleWeights.to))
    else:
        monkeypatch.setattr(lag_triton.kernels.Ops, "prepare_b_star", fail_third(lag_triton.kernels.Ops.prepare_b_star))
    with pytest.raises(torch.OutOfMemoryError) as info:
        lag_triton.patch(model, library, backend="torch")
    gc.collect()
    assert copies and all(ref() is None for ref in copies), (
        "the copies outlive the failed patch (held by its traceback)"
    )
    message = str(info.value)
    assert "lag_triton.patch ran out of memory" in message and "on cpu" in message
    assert f"library {library.label}, module 'model.layers" in message
    assert "Tried to allocate 2.00 GiB" in message  # torch's own message is kept
    assert re.search(r"the libraries being attached need [0-9.]+ [KMG]iB on cpu", message)
    assert {name: list(m.routes) for name, m in model.named_modules() if isinstance(m, LagLinear)} == layers_before
    assert model._lag_num_libraries == 1
    torch.testing.assert_close(_logits(model, IDS), want, rtol=0, atol=0)


# -- 13. the module patch was called on ---------------------------------------------------------------------------
def _routes(model) -> list[list[int]]:
    return [[r.library_index for r in m.routes] for m in model.modules() if isinstance(m, LagLinear)]


def test_libraries_are_attached_through_one_module(library):
    """Library indices and names live on the module patch was called on: patching the model after
    its backbone (or the backbone after the model) numbered both libraries 0, so a scope's mask for
    one was applied to the other's adapters. Both are refused, model unchanged; the module that
    contains the patched one scopes and unpatches through it."""
    model = tiny_model("llama")
    inner = Library(library.names, {n.removeprefix("model."): w for n, w in library.modules.items()})
    lag_triton.patch(model.model, inner, k=2)
    routes = _routes(model)
    with pytest.raises(ValueError, match="attached through its submodule 'model'.*call patch on that module"):
        lag_triton.patch(model, library, k=2)
    assert _routes(model) == routes and not hasattr(model, "_lag_num_libraries")
    other = Library([f"b{i}" for i in range(len(library.names))], inner.modules)
    lag_triton.patch(model.model, other, k=2)  # the same root numbers it 1
    assert {tuple(r) for r in _routes(model)} == {(0, 1)}
    with lag_triton.trace(model) as tr, lag_triton.scope(model, [["b1"], ["b2"]]):  # names of library 1 only
        _logits(model, IDS)
    rows = torch.tensor([1, 2]).repeat_interleave(IDS.shape[1])[:, None]  # b1 for row 0, b2 for row 1
    assert len(tr.library_selections[0]) == len(tr.library_selections[1]) == len(library.modules)
    assert all((sel == -1).all() for sel in tr.library_selections[0].values())  # library 0: no adapter allowed
    assert all(torch.equal(sel.cpu(), rows) for sel in tr.library_selections[1].values())
    lag_triton.unpatch(model)
    assert _unpatched(model) and not hasattr(model.model, "_lag_num_libraries")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryNotSavedWarning)
        model.state_dict()

    lag_triton.patch(model, library, k=2)
    routes = _routes(model)
    for call in (lambda: lag_triton.patch(model.model, other), lambda: lag_triton.unpatch(model.model)):
        with pytest.raises(ValueError, match="attached through a module that contains it"):
            call()
        assert _routes(model) == routes
    with pytest.raises(ValueError, match="lag_triton.scope: .* a module that contains it"):
        with lag_triton.scope(model.model, [None, None]):
            pass
    with pytest.raises(ValueError, match="a copy of a part of a patched model has none"):  # its root stayed behind
        lag_triton.unpatch(copy.deepcopy(model.model))


def test_the_model_itself_cannot_be_a_librarys_module(library):
    """A library module named "" is the module patch is given, which it cannot swap in place (it
    wrapped the layer under itself: a cycle, no routing, state_dict recursing forever)."""
    layer = torch.nn.Linear(16, 16)
    weights = next(iter(library.modules.values()))
    with pytest.raises(ValueError, match="targets module '' \\(the model itself, a Linear\\)"):
        lag_triton.patch(layer, Library(library.names, {"": weights}))
    assert not list(layer.children()) and not hasattr(layer, "_lag_num_libraries")


def test_a_library_moved_to_meta_and_back_refuses_to_route(library):
    """model.to("meta") then to_empty(): a base checkpoint restores the base weights, not the
    library (not model state), so its factors hold garbage: the forward says so instead of routing
    with it, and patching again routes as before."""
    model = lag_triton.patch(tiny_model("llama"), library, k=2)
    want = _logits(model, IDS)
    base = {n: b.clone() for n, b in model.named_buffers() if ".routes." not in n}  # rotary's too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LibraryNotSavedWarning)
        state = copy.deepcopy(model.state_dict())
    model.to("meta").to_empty(device="cpu")
    model.load_state_dict(state)
    for name, b in base.items():
        model.get_buffer(name).copy_(b)
    with pytest.raises(RuntimeError, match="went to the meta device and came back without values"):
        _logits(model, IDS)
    lag_triton.unpatch(model)
    torch.testing.assert_close(_logits(lag_triton.patch(model, library, k=2), IDS), want, rtol=0, atol=0)


@pytest.mark.parametrize("training", [False, True])
def test_patched_modules_take_the_models_training_mode(library, training):
    model = tiny_model("llama").train(training)
    lag_triton.patch(model, library, k=2)
    assert {m.training for m in model.modules()} == {training}


def test_an_input_of_the_wrong_width_is_refused_naming_the_layer(library):
    """The base layer runs on the tokens flattened to [T, d_in]: an input whose width is not d_in
    (but whose size is a multiple of it) must fail as the base layer would, not be re-cut into rows."""
    model = lag_triton.patch(tiny_model("llama"), library, k=2)
    layer = model.model.layers[0].mlp.up_proj
    with pytest.raises(ValueError, match=f"up_proj: input has {2 * layer.in_features} features, the layer takes"):
        layer(torch.randn(3, 2 * layer.in_features))


def test_a_compiled_model_and_containers_scope_trace_and_unpatch_through_the_patched_module(library):
    """torch.compile's wrapper forwards attribute reads to the model it wraps, so the model patched
    through it was counted as two patched modules: scope refused it and unpatch of a container
    holding it failed halfway (the layers unwrapped, the state_dict warning left). Two models
    patched apart in one container cannot be traced (or scoped) together: their indices would mix."""
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="eager")
    lag_triton.patch(compiled, library, k=2)
    with lag_triton.scope(compiled, [library.names[:1], library.names[1:2]]), lag_triton.trace(compiled) as tr:
        _logits(model, IDS)
    assert all(set(sel.flatten().tolist()) <= {0, 1} for sel in tr.selections.values())
    lag_triton.unpatch(torch.nn.Sequential(compiled))
    assert _unpatched(model) and not hasattr(model, "_lag_num_libraries")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LibraryNotSavedWarning)
        model.state_dict()
    both = torch.nn.ModuleDict({"a": lag_triton.patch(tiny_model("llama"), library, k=2), "b": model})
    lag_triton.patch(model, library, k=2)
    for call in (lambda: lag_triton.trace(both), lambda: lag_triton.scope(both, [None, None])):
        with pytest.raises(ValueError, match=r"patched through several of its modules \('a', 'b'\)"):
            with call():
                pass


# -- what patch leaves alone ---------------------------------------------------------------------------------
def _one(d_in: int, d_out: int, seed: int = 0, n: int = 2) -> ModuleWeights:
    g = torch.Generator().manual_seed(seed)
    a = torch.linalg.qr(torch.randn(n, d_in, 2, generator=g))[0].transpose(1, 2).contiguous()
    return ModuleWeights(a, torch.randn(n, d_out, 2, generator=g), a[:, 0].contiguous(), torch.arange(n))


class _CountingLinear(torch.nn.Linear):
    """An nn.Linear subclass with a forward of its own (Falcon's are) that keeps statistics of its inputs."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.tokens_seen += x.shape[0]
        return super().forward(x)


def test_a_refused_patch_runs_no_layer_and_fires_no_hook():
    """Telling an nn.Linear subclass with its own forward from a router that subclasses nn.Linear
    runs its forward once: on meta copies of its state, without its hooks (it ran on the layer itself:
    a refused patch changed its buffers and fired the user's hooks)."""
    layer = _CountingLinear(8, 8)
    model = torch.nn.Sequential(layer, torch.nn.Linear(8, 4))
    fired = []
    layer.register_forward_hook(lambda m, args, out: fired.append(args[0].shape))
    with pytest.raises(ValueError, match=r"module '1'"):  # d_out 8 where the layer has 4: refused
        lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8), "1": _one(8, 8)}))
    assert fired == [] and layer.tokens_seen.item() == 0 and _unpatched(model)
    lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8)}))
    assert fired == [] and layer.tokens_seen.item() == 0
    model(torch.randn(3, 8))
    assert fired == [(3, 8)] and layer.tokens_seen.item() == 3  # the layer runs as a linear layer


class _QuantLinearWithDropout(torch.nn.Module):
    """A GPTQ-style linear-like layer with a child module (input dropout) its user keeps in eval."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 8, 8
        self.register_buffer("qweight", torch.randint(-5, 5, (8, 8), dtype=torch.int8))
        self.input_dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.input_dropout(x) @ self.qweight.float().T


def test_patch_and_unpatch_leave_a_layers_own_training_flags_alone():
    """The wrapper takes the layer's training mode without calling train() on it, which recursed into
    the layer: its child dropout, kept in eval, trained while patched and after unpatch."""
    model = torch.nn.Sequential(_QuantLinearWithDropout(), torch.nn.LayerNorm(8)).train()
    model[0].input_dropout.eval()
    lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8)}))
    assert model[0].training and model[0].routes.training and not model[0].base_layer.input_dropout.training
    x = torch.randn(4, 8)
    assert torch.equal(model(x), model(x))
    lag_triton.unpatch(model)
    assert model[0].training and not model[0].input_dropout.training


class _Shared(torch.nn.Module):
    def __init__(self, share_parent: bool):
        super().__init__()
        layer = torch.nn.Linear(8, 8)
        self.encoder = torch.nn.Sequential(layer)
        self.decoder = self.encoder if share_parent else torch.nn.Sequential(layer)

    def forward(self, x):
        return self.decoder(self.encoder(x))


@pytest.mark.parametrize("name", ["encoder.0", "decoder.0"])
def test_a_layer_shared_under_two_paths_is_patched_at_the_path_the_library_names(name):
    """Either path of a layer registered in two parents is the layer (the second was refused as
    missing, with a hint to rename it to the first); the wrapper goes at the path named, so the other
    call runs the layer alone. Both paths in one patch are refused (one parent may hold both)."""
    model = _Shared(share_parent=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer = model.encoder[0]
        base = layer(x)
        lag_triton.patch(model, Library(["a", "b"], {name: _one(8, 8)}), k=1)
        routed = model.get_submodule(name)
        assert isinstance(routed, LagLinear) and routed.base_layer is layer
        other = model.get_submodule("decoder.0" if name == "encoder.0" else "encoder.0")
        assert other is layer and not torch.equal(routed(x), base)
    lag_triton.unpatch(model)
    assert model.encoder[0] is layer and model.decoder[0] is layer
    for share_parent in (False, True):
        model = _Shared(share_parent)
        with pytest.raises(ValueError, match=r"modules 'encoder.0' and 'decoder.0', both targeted, are one module"):
            lag_triton.patch(model, Library(["a", "b"], {"encoder.0": _one(8, 8), "decoder.0": _one(8, 8, seed=1)}))
        assert _unpatched(model)


@pytest.mark.parametrize("name", ["0.base_layer", "0.base_layer.weight", "1.routes.0"])
def test_a_library_naming_a_part_of_a_patched_layer_is_refused(name):
    """A patched model's named_modules() lists each wrapper's base layer (PEFT's "all-linear" on it
    would target ``...base_layer``): wrapping it again nested one wrapper in another, which unpatch
    could not take out (the model stayed patched, and every later patch and unpatch was refused)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8), "1": _one(8, 8)}))
    wrapper = name.split(".")[0]
    with pytest.raises(
        ValueError, match=rf"targets module '{re.escape(name)}', a part of the LAG-patched layer '{wrapper}'"
    ):
        lag_triton.patch(model, Library(["c", "d"], {name: _one(8, 8)}))
    lag_triton.unpatch(model)
    assert _unpatched(model)


def test_hooks_on_a_layer_see_its_input_as_before_patch(library):
    """A hook registered on a layer before patch sees what the layer's callers give it, [B, S, d]
    (the layer ran on the tokens flattened, so a steering hook's ``out[:, -1] = 0`` zeroed a feature
    of every token instead of each row's last position): with a library that adds nothing, the
    hooked model's logits are the unpatched hooked model's."""
    model = tiny_model("llama")
    layer = model.model.layers[0].mlp.down_proj
    shapes = []

    def steer(module, args, out):
        shapes.append(tuple(out.shape))
        out[:, -1] = 0

    layer.register_forward_hook(steer)
    want = _logits(model, IDS)
    silent = Library(
        library.names,
        {n: dataclasses.replace(w, b_star=torch.zeros_like(w.b_star)) for n, w in library.modules.items()},
    )
    lag_triton.patch(model, silent, k=2)
    got = _logits(model, IDS)
    assert shapes == [(2, 9, layer.out_features)] * 2
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _CachedLinear(torch.nn.Linear):
    """Keeps its weight transposed and contiguous, built on first use (the probe's run is its first)."""

    _wt = None

    def forward(self, x):
        if self._wt is None:
            self._wt = self.weight.t().contiguous()
        return x @ self._wt + self.bias


class _LazyScaledLinear(torch.nn.Linear):
    """Registers a buffer on its first forward (a lazily built scale)."""

    def forward(self, x):
        if "scale" not in self._buffers:
            self.register_buffer("scale", self.weight.abs().amax(dim=1))
        return super().forward(x) * self.scale


class _ObservedLinear(torch.nn.Linear):
    """Keeps a running amax of its inputs, read on the host (no meta run can do that)."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.register_buffer("amax", torch.ones(()))

    def forward(self, x):
        self.amax.mul_(0.9).add_(0.1 * x.abs().max())
        return super().forward(x) / max(self.amax.item(), 1e-6)


class _GuardedRouter(torch.nn.Linear):
    """A router subclassing nn.Linear whose forward reads values (a NaN guard): no meta run can tell it."""

    def forward(self, x):
        logits = super().forward(x)
        if logits.isnan().any():
            raise ValueError("NaN router logits")
        return logits, logits.topk(2, dim=-1).indices


def test_the_dry_runs_of_patch_leave_attributes_hooks_and_rng_alone():
    """patch tells an nn.Linear subclass with a forward of its own, and checks a router, by dry runs:
    what such a run sets on the module is put back (a cache built on first use held a meta tensor,
    and the patched layer computed with it: garbage), its hooks do not fire and the random state does
    not move (also when patch is then refused); a forward that reads values is run on its real state."""
    torch.manual_seed(0)
    observed = torch.nn.Sequential(_ObservedLinear(8, 8), torch.nn.Linear(8, 4))  # run on copies of its state
    with pytest.raises(ValueError, match=r"module '1'"):
        lag_triton.patch(observed, Library(["a", "b"], {"0": _one(8, 8), "1": _one(8, 8)}))
    assert observed[0].amax.item() == 1.0
    model = torch.nn.Sequential(_CachedLinear(8, 8), _GuardedRouter(8, 4), torch.nn.Linear(4, 4))
    lazy = _LazyScaledLinear(8, 8)  # the buffer its first run registers (on meta copies) is taken back
    lag_triton.patch(torch.nn.Sequential(lazy), Library(["a", "b"], {"0": _one(8, 8)}))
    assert "scale" not in lazy._buffers
    x = torch.randn(3, 8)
    torch.testing.assert_close(lazy(x), torch.nn.functional.linear(x, lazy.weight, lazy.bias) * lazy.scale)
    assert lazy.scale.device.type == "cpu"
    fired = []
    for layer in model:
        layer.register_forward_pre_hook(lambda m, args: fired.append(type(m).__name__))
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"module '2'"):  # d_in 8 where the layer has 4: refused
        lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8), "1.weight": _one(8, 4), "2": _one(8, 4)}))
    cached = model[0]
    assert fired == [] and torch.equal(torch.get_rng_state(), rng) and cached._wt is None
    lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8), "1.weight": _one(8, 4)}), k=1)
    assert fired == [] and cached._wt is None
    assert isinstance(model[1], lag_triton.patching.LagRouter)  # the meta run fails on its guard: run as it is
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(cached(x), torch.nn.functional.linear(x, cached.weight, cached.bias))
        logits, picked = model[1](model[0](x))
    assert logits.shape == (3, 4) and picked.shape == (3, 2)


def test_what_a_forward_hook_keeps_or_gives_is_not_changed_by_the_routes():
    """The routes add into the layer's output in place: with a hook on the base layer they add into a
    copy, so what the hook kept (an activation cache) stays the base output, and a tensor the hook
    gives as the output (activation patching) is not changed call after call."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    layer, kept = model[0], []
    layer.register_forward_hook(lambda m, args, out: kept.append(out))
    lag_triton.patch(model, Library(["a", "b"], {"0": _one(8, 8)}), k=1)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        routed = model(x)
        torch.testing.assert_close(kept[0], torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
        assert not torch.equal(routed, kept[0])
        patch_in = torch.randn(2, 3, 8)
        layer.register_forward_hook(lambda m, args, out: patch_in)
        first, second = model(x), model(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_a_full_backward_hook_on_a_layer_sees_its_gradient_as_before_patch(library):
    """A full backward hook makes the layer's output a view of itself that may not be changed in
    place: the routes add into a copy (a patched forward with gradients raised), and the hook sees
    the gradient shaped as the layer's callers give it. The input gradient is the unhooked model's."""
    grads = {}
    for hooked in (False, True):
        model = lag_triton.patch(tiny_model("llama"), library, k=2)
        layer = model.model.layers[0].mlp.down_proj.base_layer
        seen = []
        if hooked:
            layer.register_full_backward_hook(lambda m, grad_in, grad_out, seen=seen: seen.append(grad_out[0].shape))
        embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.sum().backward()
        grads[hooked] = embeds.grad
        assert seen == ([(*IDS.shape, layer.out_features)] if hooked else [])  # torch.Size == tuple
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)

"""Kernels launch on their tensors' GPU, not on the current one.

Triton launches on the current CUDA device; a layer living on another GPU (a model split over
GPUs with ``device_map="auto"``, or moved to cuda:1) must make its own device current while its
ops launch (``_common.other_gpu``, ``on_tensor_device``). The CUDA backend's launchers set the device themselves
(``DeviceGuard`` in csrc). Without a GPU: the rule, and that every Triton launch of every op
happens inside it; with two GPUs: a patched model on cuda:1, cuda:0 current, against the reference.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from emulated_cuda import install_backend
from kernel_data import DEVICE, backend_ops, int_tensor, randn

import lag_triton
from lag_triton.kernels import resolve_backend

from factories import VOCAB, needs_triton, tiny_library, tiny_model


def _common():
    from lag_triton.kernels.triton import _common

    return _common


@needs_triton
def test_other_gpu_only_names_a_gpu_that_is_not_current(monkeypatch):
    common = _common()

    class OnGpu:  # what other_gpu reads of a CUDA tensor
        is_cuda = True

        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert common.other_gpu(OnGpu(1)) == 1
    assert common.other_gpu(OnGpu(0)) is None
    assert common.other_gpu(torch.zeros(1)) is None


@needs_triton
def test_every_triton_launch_runs_on_its_tensors_device(monkeypatch):
    """With the tensors taken for another GPU's, each op makes that GPU current once, and each of
    its Triton launches happens inside (the scoring GEMM is torch's, which launches on its
    tensors' device by itself)."""
    ops = backend_ops("triton", monkeypatch)
    common = _common()
    if not common.interpreting():
        pytest.skip("counts launches through the Triton interpreter")
    from triton.runtime import interpreter

    entered, inside, launches = [], [], []

    @contextlib.contextmanager
    def switch_to(index):
        entered.append(index)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    run = interpreter.InterpretedFunction.run

    def launch(self, *args, **kwargs):
        launches.append((self.fn.__name__, bool(inside)))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(common, "other_gpu", lambda t: 3)
    monkeypatch.setattr(torch.cuda, "device", switch_to)
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", launch)
    x, p, a = int_tensor(3, 40, seed=1), int_tensor(90, 40, seed=2), randn(90, 6, 40, seed=3)
    idx, _ = ops.arrow_topk(x, p, 5)
    sel, w, z = ops.spectr_rerank(x, a, idx, 2)
    ops.lora_apply(randn(3, 70, seed=4), randn(90, 70, 6, seed=5), sel, w, z)
    assert entered == [3, 3, 3]
    assert len(launches) >= 3 and all(ok for _, ok in launches), launches


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_patched_model_on_a_second_gpu(tmp_path, backend, monkeypatch):
    """The whole model on cuda:1 while cuda:0 is current: the backend's logits and picks equal the
    reference backend's (fp32)."""
    install_backend(backend, DEVICE, monkeypatch)
    second = torch.device("cuda", 1)
    try:
        resolve_backend(backend, second)
    except RuntimeError as e:
        pytest.skip(str(e))
    library = tiny_library(tmp_path, 7)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0)).to(second)
    out = {}
    for name in ("torch", backend):
        model = tiny_model("llama").to(second)
        lag_triton.patch(model, library, k=3, top_m=2, backend=name)
        with torch.cuda.device(0), torch.no_grad(), lag_triton.trace(model) as tr:
            out[name] = model(input_ids=ids).logits, tr.selections
    (want, want_sel), (got, got_sel) = out["torch"], out[backend]
    for module in want_sel:
        assert torch.equal(got_sel[module], want_sel[module]), module
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "value,on",
    [
        ("1", True),
        ("True", True),
        ("on", True),
        ("y", True),
        ("false", False),
        ("0", False),
        ("off", False),
        ("", False),
    ],
)
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """TRITON_INTERPRET=false leaves Triton compiling (it reads 1/true/on/yes/y as on): the Triton
    backend must then be unavailable for CPU tensors (patch took it, and the forward failed in the driver)."""
    from lag_triton.kernels import backend_unavailable_reason, triton_interpreter_enabled

    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreter_enabled() is on
    reason = backend_unavailable_reason("triton", torch.device("cpu"))
    assert (reason is None) is on, reason

#!/usr/bin/env python3
"""End-to-end benchmark: a Llama-3.2-3B-shaped model with a LAG knowledge library on its MLPs.

Model: LlamaForCausalLM built from a config with random weights (hidden 3072, intermediate 8192,
28 layers, 24 heads / 8 KV heads, vocab 128256, tied embeddings, bf16, sdpa attention).
Library: N rank-r adapters (default N=1000, r=6) on every gate/up/down_proj, built directly on the
device in library form: A* rows orthonormal (Cholesky-QR of Gaussian rows), B* = U diag(sigma)
with unit-norm random U columns and sigma from 1.0 down to 0.3 (the adapter changes a layer's
output by a few percent), prototypes = A*[:, 0]. About 11-12 GB in bf16 at the default sizes.

Measured, per backend (base = unpatched model; LAG triton / cuda / torch = lag_triton.patch with
that backend, k=20, top_m=1):
  prefill   one forward of --prefill-len tokens at batch 1 (logits of the last token only)
  decode    greedy decode at each --batches size after a --decode-ctx token prompt, with a
            StaticCache and an explicit attention mask, one decode step (model + argmax + position
            advance) captured in a CUDA graph and replayed (--no-graphs, or a failed capture:
            eager, and the row says so)
PEFT Arrow (peft.create_arrow_model, ArrowConfig(top_k=1), adapters saved as PEFT folders and
loaded by PEFT, bf16 kept) runs on a --peft-layers model (default 2 layers, same widths) with
--peft-n adapters, eager (its forward builds a tensor from a Python list every call), beside
base and LAG triton on the same small model and adapter count.

Order: base, LAG triton, LAG cuda, the PEFT comparison, then the (slow) torch reference, so that a
--time-budget that runs out cuts the least important rows; skipped rows say so.

    PYTHONPATH=. python3 bench/bench_e2e.py [--quick] [--device cpu] [--layers 28] [--n-adapters 1000] ...
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.harness import DTYPES, Budget, Results, default_results_path, log  # noqa: E402
from bench.timing import cuda_context_broken, free_memory, short_error, sync, time_events  # noqa: E402

TARGETS = ("gate_proj", "up_proj", "down_proj")
LAG_BACKENDS = ("triton", "cuda", "torch")

# Sizes by run: "full" is Llama-3.2-3B's shape (the README table), "quick" 4 of its layers and
# shorter sweeps, "cpu" a tiny model that exercises every path in seconds. Flags override them.
_FULL = dict(
    layers=28,
    hidden=3072,
    intermediate=8192,
    heads=24,
    kv_heads=8,
    vocab=128256,
    n_adapters=1000,
    prefill_len=2048,
    prefill_reps=3,
    batches="1,8,32",
    decode_ctx=256,
    decode_steps=32,
    peft_n=100,
    peft_layers=2,
    peft_batches="1,8",
    peft_prefill_len=512,
    eager_batches="1,8",
    dtype="bf16",
)
PRESETS = {
    "full": _FULL,
    "quick": {
        **_FULL,
        **dict(layers=4, prefill_reps=2, batches="1,32", decode_ctx=128, decode_steps=16, peft_n=50),
        **dict(peft_batches="1", eager_batches="1"),
    },
    "cpu": dict(
        layers=2,
        hidden=64,
        intermediate=128,
        heads=4,
        kv_heads=2,
        vocab=256,
        n_adapters=16,
        prefill_len=16,
        prefill_reps=1,
        batches="1,2",
        decode_ctx=6,
        decode_steps=3,
        peft_n=4,
        peft_layers=2,
        peft_batches="1",
        peft_prefill_len=16,
        eager_batches="",
        dtype="fp32",
    ),
}


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer layers / shorter runs (smoke test)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default=None, help="results JSON (appended to); default bench/results/<card>-<date>.json")
    p.add_argument("--backends", default="base,triton,cuda,torch")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later stages are skipped once spent")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    # library / routing
    p.add_argument("--n-adapters", type=int, default=None)
    p.add_argument("--rank", type=int, default=6)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--top-m", type=int, default=1)
    # workload
    p.add_argument("--prefill-len", type=int, default=None)
    p.add_argument("--prefill-reps", type=int, default=None)
    p.add_argument("--batches", default=None, help="comma list of decode batch sizes")
    p.add_argument("--decode-ctx", type=int, default=None, help="prompt tokens per sequence before decoding")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per batch size")
    p.add_argument("--ref-batches", default="1", help="decode batch sizes for the slow torch reference backend")
    p.add_argument(
        "--ref-prefill-len", type=int, default=None, help="prefill length for the reference (default = --prefill-len)"
    )
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graph)")
    p.add_argument(
        "--eager-batches",
        default=None,
        help="decode batch sizes also timed eagerly next to the CUDA-graph decode (GPU; '' for none)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="verify the static-cache decode step against full recomputation (default on CPU)",
    )
    # PEFT Arrow comparison
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--peft-n", type=int, default=None, help="adapters for the PEFT Arrow comparison")
    p.add_argument("--peft-layers", type=int, default=None)
    p.add_argument("--peft-batches", default=None, help="decode batch sizes for the PEFT comparison")
    p.add_argument(
        "--peft-prefill-len",
        type=int,
        default=None,
        help="prefill length of the PEFT comparison (all its rows run eagerly, as PEFT must)",
    )
    a = p.parse_args(argv)

    cpu = torch.device(a.device).type != "cuda"
    d = PRESETS["cpu" if cpu else "quick" if a.quick else "full"]
    a.check = a.check or cpu
    for key, value in d.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    a.batches = [int(b) for b in str(a.batches).split(",") if b.strip()]
    a.ref_batches = [int(b) for b in str(a.ref_batches).split(",") if b.strip()]
    a.peft_batches = [int(b) for b in str(a.peft_batches).split(",") if b.strip()]
    a.eager_batches = [int(b) for b in str(a.eager_batches).split(",") if b.strip()]
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if a.ref_prefill_len is None:
        a.ref_prefill_len = a.prefill_len
    return a


# ----------------------------------------------------------------------------------------------
# model and library
# ----------------------------------------------------------------------------------------------
def build_model(a, layers: int, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        head_dim=a.hidden // a.heads,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def target_linears(model) -> dict[str, nn.Linear]:
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    }


@torch.no_grad()
def build_library(model, n: int, r: int, device, dtype, seed: int):
    """A random, properly scaled LAG library built in library form, directly on ``device``."""
    import lag_triton

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    sigma = torch.linspace(1.0, 0.3, r, device=device)
    eye = torch.eye(r, device=device)
    modules = {}
    for name, lin in target_linears(model).items():
        d_in, d_out = lin.in_features, lin.out_features
        a = torch.randn(n, r, d_in, generator=gen, device=device)
        # Cholesky-QR: rows of L^-1 a are orthonormal (a a^T = L L^T).
        chol = torch.linalg.cholesky(a @ a.transpose(1, 2) + 1e-6 * eye)
        a = torch.linalg.solve_triangular(chol, a, upper=False)
        b = torch.randn(n, d_out, r, generator=gen, device=device)
        b = b / b.norm(dim=1, keepdim=True) * sigma
        modules[name] = lag_triton.ModuleWeights(
            a_star=a.to(dtype),
            b_star=b.to(dtype),
            prototypes=a[:, 0].to(dtype).contiguous(),
            adapter_ids=torch.arange(n, device=device),
        )
        del a, b, chol
    return lag_triton.Library(names=[f"knowledge_{i}" for i in range(n)], modules=modules)


# ----------------------------------------------------------------------------------------------
# forward helpers that work across transformers 5.x (cache kwarg renamed past_key_values -> cache)
# ----------------------------------------------------------------------------------------------
def _hf_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_kwargs(model) -> tuple[str, bool]:
    """(name of the cache kwarg, whether logits_to_keep is accepted)."""
    hf = _hf_model(model)
    inner = inspect.signature(type(hf.model).forward).parameters
    outer = inspect.signature(type(hf).forward).parameters
    cache_kw = "cache" if "cache" in inner else "past_key_values"
    return cache_kw, "logits_to_keep" in outer


def prefill_fn(model, ids):
    _, keep = _forward_kwargs(model)
    kw = {"logits_to_keep": 1} if keep else {}

    def run():
        return model(input_ids=ids, use_cache=False, **kw).logits[:, -1]

    return run


class StaticDecoder:
    """Greedy decode with a StaticCache; ``step()`` has static shapes and no host syncs (graph-capturable).

    All per-step state lives in device tensors: ``ids`` (last token), ``pos`` (its position). The
    attention mask and position ids are computed from ``pos`` inside the step, so a captured graph
    advances by itself on every replay.
    """

    def __init__(self, model, batch: int, max_len: int, device):
        from transformers import StaticCache

        self.model, self.batch, self.max_len = model, batch, max_len
        hf = _hf_model(model)
        # older transformers (4.45) allocate the cache up front: they need the batch, device and dtype
        params = inspect.signature(StaticCache).parameters
        eager = {
            "batch_size" if "batch_size" in params else "max_batch_size": batch,
            "device": device,
            "dtype": hf.dtype,
        }
        eager = {k: v for k, v in eager.items() if k in params}
        self.cache = StaticCache(config=hf.config, max_cache_len=max_len, **eager)
        self.cache_kw, keep = _forward_kwargs(model)
        self.extra = {"logits_to_keep": 1} if keep else {}
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.arange = torch.arange(max_len, device=device)

    def prefill(self, prompt: torch.Tensor) -> None:
        b, ctx = prompt.shape
        q = torch.arange(ctx, device=prompt.device)
        mask = (self.arange[None, :] <= q[:, None]).view(1, 1, ctx, self.max_len).expand(b, 1, ctx, self.max_len)
        out = self.model(
            input_ids=prompt,
            attention_mask=mask,
            position_ids=q[None].expand(b, ctx),
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.extra,
        )
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.fill_(ctx)

    def step(self) -> None:
        b, L = self.batch, self.max_len
        mask = (self.arange <= self.pos).view(1, 1, 1, L).expand(b, 1, 1, L)
        out = self.model(
            input_ids=self.ids,
            attention_mask=mask,
            position_ids=self.pos.view(1, 1).expand(b, 1),
            use_cache=True,
            **{self.cache_kw: self.cache},
            **self.extra,
        )
        self.ids.copy_(out.logits[:, -1:].argmax(-1))
        self.pos.add_(1)


@torch.no_grad()
def check_static_decode(model, device, vocab: int, ctx: int = 5, steps: int = 4) -> str:
    """Tokens from StaticDecoder == tokens from recomputing the whole sequence each step (greedy)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(0, vocab, (2, ctx), generator=gen).to(device)
    dec = StaticDecoder(model, 2, ctx + steps + 2, device)
    dec.prefill(prompt)
    got = [dec.ids.clone()]
    for _ in range(steps - 1):
        dec.step()
        got.append(dec.ids.clone())
    got = torch.cat(got, 1)
    seq = prompt
    want = []
    for _ in range(steps):
        nxt = model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)
        want.append(nxt)
        seq = torch.cat([seq, nxt], 1)
    want = torch.cat(want, 1)
    if not torch.equal(got, want):
        raise AssertionError(f"static-cache decode diverges from recomputation: {got.tolist()} vs {want.tolist()}")
    return "ok"


def _capture(dec: StaticDecoder, warmup: int = 2):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):  # autotuning / lazy init happen here, outside the capture
            dec.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.step()
    return graph


@torch.no_grad()
def time_decode(model, batch: int, a, device, graphs: bool, gen) -> tuple[float, str]:
    """(ms per decode step, mode) for greedy decode at ``batch`` after a ``decode_ctx`` prompt."""
    warm = 2
    max_len = a.decode_ctx + warm + 1 + a.decode_steps + 2
    dec = StaticDecoder(model, batch, max_len, device)
    prompt = torch.randint(0, a.vocab, (batch, a.decode_ctx), generator=gen, device="cpu").to(device)
    dec.prefill(prompt)
    mode = "eager"
    fn = dec.step
    graph = None
    if graphs and device.type == "cuda":
        try:
            graph = _capture(dec, warm)
            fn = graph.replay
            mode = "cuda-graph"
        except Exception as exc:  # noqa: BLE001
            mode = f"eager (graph capture failed: {short_error(exc, 160)})"
            if cuda_context_broken(device):
                raise
            fn = dec.step
    else:
        for _ in range(warm):
            dec.step()
    fn()  # one more warm call (first replay)
    sync(device)
    steps = a.decode_steps
    if device.type == "cuda":
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(steps):
            fn()
        e.record()
        e.synchronize()
        ms = s.elapsed_time(e) / steps
    else:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / steps
    # The graph must advance its own position on every replay: check once, after timing.
    expected = a.decode_ctx + warm + 1 + steps
    got = int(dec.pos.item())
    if got != expected:
        raise RuntimeError(f"decode position is {got} after the timed steps, expected {expected} ({mode})")
    del graph, dec
    return ms, mode


# ----------------------------------------------------------------------------------------------
# one model configuration, several backends
# ----------------------------------------------------------------------------------------------
class E2E:
    def __init__(self, a, device, dtype, results: Results, budget: Budget):
        self.a, self.device, self.dtype, self.results, self.budget = a, device, dtype, results, budget
        self.gen = torch.Generator(device="cpu").manual_seed(a.seed)

    def row(self, **kw):
        row = {"section": "e2e", "dtype": self.a.dtype, **kw}
        if row.get("ms"):
            tokens = row["tokens"]
            row["ms_per_token"] = row["ms"] / (tokens if row["phase"] == "prefill" else 1)
            row["tokens_per_s"] = tokens * 1e3 / row["ms"]
        self.results.add(row)
        ms = f"{row['ms']:9.3f} ms  {row['tokens_per_s']:10.1f} tok/s" if row.get("ms") else row["status"]
        log(
            f"  e2e {row['model']:>22s} {row['backend']:12s} {row['phase']:8s} B={row['batch']:<3d} {ms}"
            f"  {row.get('mode', '')}"
        )

    def measure(
        self,
        model,
        model_name: str,
        backend: str,
        n_adapters: int,
        prefill_len: int,
        batches: list[int],
        graphs: bool,
        layers: int,
        eager_batches: list[int] = (),
    ):
        a, device = self.a, self.device
        base = dict(model=model_name, layers=layers, N=n_adapters, backend=backend, k=a.k, top_m=a.top_m)
        # prefill
        if self.budget.expired():
            self.row(**base, phase="prefill", batch=1, tokens=prefill_len, status="skipped: time budget")
        else:
            try:
                ids = torch.randint(0, a.vocab, (1, prefill_len), generator=self.gen).to(device)
                with torch.no_grad():
                    ms = time_events(prefill_fn(model, ids), device, reps=a.prefill_reps, warmup=1)
                self.row(**base, phase="prefill", batch=1, tokens=prefill_len, status="ok", ms=ms, mode="eager")
            except Exception as exc:  # noqa: BLE001
                self._failed(base, "prefill", 1, prefill_len, exc)
        # decode (CUDA-graph replay when asked and possible), then the eager extras
        extra = list(eager_batches) if graphs and device.type == "cuda" else []
        for b, use_graphs in [(b, graphs) for b in batches] + [(b, False) for b in extra]:
            tag = {} if use_graphs == graphs else {"eager_extra": True}
            if self.budget.expired():
                self.row(**base, **tag, phase="decode", batch=b, tokens=b, status="skipped: time budget")
                continue
            try:
                ms, mode = time_decode(model, b, a, device, use_graphs, self.gen)
                self.row(
                    **base,
                    **tag,
                    phase="decode",
                    batch=b,
                    tokens=b,
                    status="ok",
                    ms=ms,
                    mode=mode,
                    decode_ctx=a.decode_ctx,
                )
            except Exception as exc:  # noqa: BLE001
                self._failed(dict(base, **tag), "decode", b, b, exc)
            free_memory(device)

    def _failed(self, base, phase, batch, tokens, exc):
        traceback.print_exc()
        self.row(**base, phase=phase, batch=batch, tokens=tokens, status=f"error: {short_error(exc)}")
        if cuda_context_broken(self.device):
            self.results.note("CUDA context broken during e2e; stopping")
            sys.exit(3)
        free_memory(self.device)


def lag_backend_or_reason(backend: str, device) -> str | None:
    from bench.harness import backend_ops

    _, why = backend_ops(backend, device)
    return why


def run_backends(
    e2e: E2E,
    model,
    lib,
    model_name: str,
    backends: list[str],
    n: int,
    layers: int,
    batches: list[int],
    ref_batches: list[int],
    *,
    graphs: bool | None = None,
    prefill_len: int | None = None,
    eager_batches: list[int] | None = None,
):
    """Measure ``model`` unpatched ("base") and patched with each LAG backend. graphs / prefill_len /
    eager_batches default to the command line's."""
    import lag_triton

    a = e2e.a
    graphs = (not a.no_graphs) if graphs is None else graphs
    prefill_len = a.prefill_len if prefill_len is None else prefill_len
    eager_batches = a.eager_batches if eager_batches is None else eager_batches
    for backend in backends:
        label = backend if backend == "base" else f"lag-{backend}"
        if backend != "base":
            why = lag_backend_or_reason(backend, e2e.device)
            if why:
                e2e.row(model=model_name, layers=layers, N=n, backend=label, phase="all", batch=0, tokens=0, status=why)
                continue
            if e2e.budget.expired():
                e2e.row(
                    model=model_name,
                    layers=layers,
                    N=n,
                    backend=label,
                    phase="all",
                    batch=0,
                    tokens=0,
                    status="skipped: time budget",
                )
                continue
            try:
                lag_triton.patch(model, lib, k=a.k, top_m=a.top_m, router="lag", backend=backend)
            except Exception as exc:  # noqa: BLE001
                e2e._failed(
                    dict(model=model_name, layers=layers, N=n, backend=label, k=a.k, top_m=a.top_m), "patch", 0, 0, exc
                )
                continue
        try:
            ref = backend == "torch"
            e2e.measure(
                model,
                model_name,
                label,
                n if backend != "base" else 0,
                a.ref_prefill_len if ref else prefill_len,
                ref_batches if ref else batches,
                graphs,
                layers,
                [] if ref else eager_batches,
            )
        finally:
            if backend != "base":
                lag_triton.unpatch(model)
            free_memory(e2e.device)


# ----------------------------------------------------------------------------------------------
# PEFT Arrow
# ----------------------------------------------------------------------------------------------
def write_peft_adapters(model, n: int, r: int, root: Path, seed: int) -> list[str]:
    """N random LoRA adapters on the model's gate/up/down_proj, saved as PEFT folders (bf16)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    gen = torch.Generator(device="cpu").manual_seed(seed)
    linears = {name: (m.in_features, m.out_features) for name, m in target_linears(model).items()}
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    paths = []
    for i in range(n):
        path = root / f"adapter_{i}"
        path.mkdir(parents=True)
        config.save_pretrained(str(path))
        tensors = {}
        for name, (d_in, d_out) in linears.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(r, d_in, generator=gen) * d_in**-0.5).to(
                torch.bfloat16
            )
            tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(d_out, r, generator=gen) * 0.02).to(
                torch.bfloat16
            )
        save_file(tensors, str(path / "adapter_model.safetensors"))
        paths.append(str(path))
    return paths


def run_peft(e2e: E2E):
    a, device, dtype = e2e.a, e2e.device, e2e.dtype
    layers, n = a.peft_layers, a.peft_n
    name = f"llama-{layers}L (PEFT cmp)"
    model = build_model(a, layers, device, dtype, a.seed)
    lag_backends = [b for b in a.backends if b in ("base", "triton")]
    try:
        lib = build_library(model, n, a.rank, device, dtype, a.seed)
        # PEFT's forward cannot be graph-captured: every row of this comparison runs eagerly.
        run_backends(
            e2e,
            model,
            lib,
            name,
            lag_backends,
            n,
            layers,
            a.peft_batches,
            a.ref_batches,
            graphs=False,
            prefill_len=a.peft_prefill_len,
            eager_batches=[],
        )
        del lib
        free_memory(device)
        import peft

        skipped = "time budget" if e2e.budget.expired() else None
        if not hasattr(peft, "create_arrow_model"):
            skipped = f"PEFT {peft.__version__} has no Arrow router"
        if skipped:
            e2e.row(
                model=name,
                layers=layers,
                N=n,
                backend="peft-arrow",
                phase="all",
                batch=0,
                tokens=0,
                status=f"skipped: {skipped}",
            )
            return
        from peft import ArrowConfig, create_arrow_model

        tmp = Path(tempfile.mkdtemp(prefix="lag_bench_peft_"))
        try:
            t0 = time.perf_counter()
            paths = write_peft_adapters(model, n, a.rank, tmp, a.seed)
            try:
                peft_model = create_arrow_model(model, paths, ArrowConfig(top_k=1), autocast_adapter_dtype=False)
            except TypeError:
                peft_model = create_arrow_model(model, paths, ArrowConfig(top_k=1))
            peft_model.eval()
            e2e.results.note(
                f"PEFT Arrow: {n} adapters x {layers} layers written and loaded via "
                f"create_arrow_model in {time.perf_counter() - t0:.1f}s; decode eager"
            )
            e2e.measure(peft_model, name, "peft-arrow", n, a.peft_prefill_len, a.peft_batches, False, layers)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001
        e2e._failed(dict(model=name, layers=layers, N=n, backend="peft-arrow", k=1, top_m=1), "all", 0, 0, exc)
    finally:
        del model
        free_memory(device)


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> Path:
    a = parse_args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype]
    budget = Budget(a.time_budget)
    results = Results(a.out or default_results_path(device), device)
    results.ensure_copy_bandwidth()
    e2e = E2E(a, device, dtype, results, budget)
    name = f"llama-3.2-3b-shaped {a.layers}L" if a.hidden == 3072 else f"tiny-llama {a.layers}L"
    log(
        f"e2e on {device} {a.dtype}: {name}, N={a.n_adapters}, rank {a.rank}, prefill {a.prefill_len}, "
        f"decode batches {a.batches} ctx {a.decode_ctx} x {a.decode_steps} steps, backends {a.backends}"
    )

    t0 = time.perf_counter()
    model = build_model(a, a.layers, device, dtype, a.seed)
    sync(device)
    t_model = time.perf_counter() - t0
    lib = build_library(model, a.n_adapters, a.rank, device, dtype, a.seed)
    sync(device)
    results.note(
        f"e2e {name}: model built in {t_model:.1f}s, library of {a.n_adapters} adapters "
        f"({lib.nbytes / 2**30:.2f} GiB) in {time.perf_counter() - t0 - t_model:.1f}s"
    )
    if a.check:
        import lag_triton

        for backend in ["base"] + [b for b in a.backends if b in LAG_BACKENDS]:
            if backend != "base":
                if lag_backend_or_reason(backend, device):
                    continue
                lag_triton.patch(model, lib, k=a.k, top_m=a.top_m, backend=backend)
            try:
                status = check_static_decode(model, device, a.vocab)
            except Exception as exc:  # noqa: BLE001
                status = f"error: {short_error(exc)}"
            finally:
                if backend != "base":
                    lag_triton.unpatch(model)
            results.note(f"static-cache decode check ({backend}): {status}")
            results.data.setdefault("checks", {})[f"static_decode_{backend}"] = status
            results.save()
    # Order by value, so a time budget that runs out cuts the slow reference last: base and the fast
    # backends, then the PEFT comparison (its own small model), then the torch reference.
    fast = [b for b in a.backends if b != "torch"]
    run_backends(e2e, model, lib, name, fast, a.n_adapters, a.layers, a.batches, a.ref_batches)
    if not a.no_peft:
        run_peft(e2e)
    if "torch" in a.backends:
        run_backends(e2e, model, lib, name, ["torch"], a.n_adapters, a.layers, a.batches, a.ref_batches)
    del model, lib
    free_memory(device)
    log(f"wrote {results.path} ({budget.elapsed():.1f}s)")
    return results.path


if __name__ == "__main__":
    main()

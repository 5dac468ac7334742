"""CI for the benchmark scripts: every script runs end to end on CPU at tiny sizes (< 1 minute).

These check the harness (timing, rotation, bytes model, results JSON, report, plot), not the
speed or the correctness of the kernels (tests/ does that). A backend that cannot run here (cuda
on CPU) must show up as "unavailable: ..." rather than fail; no row may be an "error".
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import (
    baselines,
    bench_arrow_topk,
    bench_e2e,
    bench_kernels,
    bench_layer,
    bench_lora_apply,
    bench_spectr_rerank,
    harness,
    report,
    timing,
)
from lag_triton.kernels import backend_unavailable_reason

TRITON_UNAVAILABLE = backend_unavailable_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
#: scripts that import the Triton backend's modules themselves (an old Triton refuses the import)
needs_triton = pytest.mark.skipif(
    TRITON_UNAVAILABLE is not None, reason=f"the Triton backend is unavailable here: {TRITON_UNAVAILABLE}"
)
TINY = ["--device", "cpu", "--shapes", "32:48", "--n", "40", "--rep-ms", "1", "--warmup-ms", "0", "--rotate", "2"]


def _rows(path):
    data = json.loads(path.read_text())
    assert data["copy_bandwidth"]["gbps"] > 0
    return data, data["rows"]


def _assert_no_errors(rows):
    errors = [(r.get("op", r.get("phase")), r["backend"], r["status"]) for r in rows if r["status"].startswith("error")]
    assert not errors, errors


def test_kernel_tables(tmp_path):
    out = tmp_path / "k.json"
    bench_kernels.main(TINY + ["--t", "1,3", "--out", str(out)])
    data, rows = _rows(out)
    _assert_no_errors(rows)
    ops = {r["op"] for r in rows}
    assert ops == {"layer", "arrow_topk", "spectr_rerank", "lora_apply"}
    for op in ops:
        for backend in ("plain", "torch"):
            mine = [r for r in rows if r["op"] == op and r["backend"] == backend]
            assert len(mine) == 2 and all(r["status"] == "ok" and r["ms"] > 0 for r in mine), mine
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert cuda and all(r["status"].startswith("unavailable") for r in cuda)
    compiled = [r for r in rows if r["backend"] == "plain-compile"]
    assert len(compiled) == 8 and all(r["status"] == "unavailable: cpu" for r in compiled)
    assert data["gemm_tflops"] > 0 and data["gemm"]["tflops"] == data["gemm_tflops"]
    for r in rows:
        assert r["bytes"] > 0 and r["floor_ms"] > 0 and r["flops"] > 0
        assert 1 <= r["unique_candidates"] <= r["N"]
        # the floor is the larger of the bytes term and the FLOPs term, each at its measured rate
        mem = r["bytes"] / (data["copy_bandwidth"]["gbps"] * 1e9) * 1e3
        comp = r["flops"] / (data["gemm_tflops"] * 1e12) * 1e3
        assert r["floor_mem_ms"] == pytest.approx(mem) and r["floor_compute_ms"] == pytest.approx(comp)
        assert r["floor_ms"] == max(mem, comp) and r["bound"] == ("memory" if mem >= comp else "compute")
        if r["status"] == "ok":  # CPU: one wall-clock timing, no CUDA graph
            assert r["timing"] == "wall" and r["eager_ms"] == r["ms"]
            assert r["pct_floor"] == pytest.approx(100 * r["floor_ms"] / r["ms"])
    # the layer row charges prototypes + candidates' A* + chosen B* + activations
    layer = next(r for r in rows if r["op"] == "layer" and r["T"] == 3)
    d_in, d_out, n, rank = layer["d_in"], layer["d_out"], layer["N"], layer["rank"]
    want = 2 * (
        n * d_in
        + layer["unique_candidates"] * rank * d_in
        + layer["unique_selected"] * d_out * rank
        + 3 * d_in
        + 2 * 3 * d_out
    )
    assert layer["bytes"] == want
    # every layer row beside the reference's says how many tokens got the reference's picks
    matched = [r for r in rows if r["op"] == "layer" and r["status"] == "ok" and r["backend"] != "torch"]
    assert matched and all(r["sel_match_ref"] == 1.0 for r in matched), matched


def test_kernel_flops_and_floor():
    dims = dict(n=1000, r=6, d_in=3072, d_out=8192, t=32, k=20, m=2)
    parts = {
        "arrow_topk": 2 * 32 * 1000 * 3072,
        "spectr_rerank": 2 * 32 * 20 * 6 * 3072,
        "lora_apply": 2 * 32 * 2 * 6 * 8192,
    }
    for op, want in parts.items():
        assert harness.kernel_flops(op, **dims) == want
    assert harness.kernel_flops("layer", **dims) == sum(parts.values())
    mem = harness.roofline(3_000_000, 10**9, copy_gbps=3000, gemm_tflops=1000)  # 1 us of bytes, 1 us of FLOPs
    assert mem["bound"] == "memory" and mem["floor_ms"] == pytest.approx(1e-3)
    comp = harness.roofline(3_000, 10**9, copy_gbps=3000, gemm_tflops=100)
    assert comp["bound"] == "compute" and comp["floor_ms"] == pytest.approx(1e-2) == comp["floor_compute_ms"]
    assert comp["floor_mem_ms"] == pytest.approx(1e-6)


def test_library_is_built_like_a_real_one():
    gen = torch.Generator().manual_seed(0)
    protos, a_star, b_star = harness._random_library(50, 4, 64, 24, torch.bfloat16, torch.device("cpu"), gen)
    assert protos.is_contiguous() and torch.equal(protos, a_star[:, 0])  # prototype = A*[:, 0] (docs/design.md §1)
    assert torch.allclose(a_star.float().norm(dim=-1), torch.ones(50, 4), atol=1e-2)
    assert b_star.shape == (50, 24, 4)
    protos, a_star, b_star = harness._random_library(
        50, 4, 64, 24, torch.float32, torch.device("cpu"), gen, need_a=False, need_b=False
    )
    assert a_star is None and b_star is None and torch.allclose(protos.norm(dim=-1), torch.ones(50))


def test_plain_ranks_fp32_scores_like_the_reference():
    from lag_triton.kernels import get_ops

    cpu = torch.device("cpu")
    assert baselines.probe_fp32_out(cpu, torch.bfloat16) is False  # CPU torch has no mm(out_dtype=...): upcast
    gen = torch.Generator().manual_seed(1)
    protos, a_star, _ = harness._random_library(300, 4, 64, 8, torch.bfloat16, cpu, gen, need_b=False)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    idx, scores = baselines.plain_arrow_topk(x, protos, 10)
    ref_idx, ref_scores = get_ops("torch").arrow_topk(x, protos, 10)
    assert scores.dtype == torch.float32 and torch.equal(idx, ref_idx)
    sel, w, z = baselines.plain_spectr_rerank(x, a_star, idx, 1)
    ref_sel, _, ref_z = get_ops("torch").spectr_rerank(x, a_star, idx, 1, "softmax", 1.0, None)
    assert z.dtype == torch.float32 and torch.equal(sel, ref_sel) and torch.allclose(z, ref_z, atol=1e-5)


@pytest.mark.parametrize("top_m,scoped", [(1, False), (3, False), (1, True), (3, True)])
def test_plain_layer_computes_the_references_function(top_m, scoped):
    """The plain baseline is the same function as the reference: softmax weights over several picks, and
    under a scope no adapter outside it (-1 past the allowed ones, a token whose scope allows none gets none)."""
    from lag_triton.kernels import get_ops
    from lag_triton.routing import RoutingConfig, route_and_apply

    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(2)
    protos, a_star, b_star = harness._random_library(60, 4, 32, 24, torch.float32, cpu, gen)
    x = torch.randn(7, 32, generator=gen)
    allowed = scope = None
    if scoped:  # scope 0: 5 adapters (fewer than k = 8), scope 1: 30, scope 2: none
        allowed = torch.zeros(3, 60, dtype=torch.bool)
        allowed[0, torch.randperm(60, generator=gen)[:5]] = True
        allowed[1, torch.randperm(60, generator=gen)[:30]] = True
        scope = torch.tensor([0, 1, 2, 0, 1, 0, 2], dtype=torch.int32)
    y_plain, y_ref = torch.zeros(7, 24), torch.zeros(7, 24)
    sel = baselines.plain_layer(x, y_plain, a_star, b_star, protos, 8, top_m, allowed, scope)
    ref_sel = route_and_apply(
        x, y_ref, a_star, b_star, protos, RoutingConfig(k=8, top_m=top_m), get_ops("torch"), allowed, scope
    )
    assert torch.equal(sel.to(torch.int32), ref_sel)
    torch.testing.assert_close(y_plain, y_ref, rtol=1e-5, atol=1e-5)
    if scoped:
        assert (ref_sel[scope == 2] == -1).all() and (y_ref[scope == 2] == 0).all()
    idx, scores = baselines.plain_arrow_topk(x, protos, 8, allowed, scope)
    ref_idx, ref_scores = get_ops("torch").arrow_topk(x, protos, 8, allowed, scope)
    assert torch.equal(idx, ref_idx) and torch.equal(scores.isnan(), ref_scores.isnan())
    if not scoped:
        got = baselines.plain_spectr_rerank(x, a_star, ref_idx, top_m)
        for g, w in zip(got, get_ops("torch").spectr_rerank(x, a_star, ref_idx, top_m), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_time_cell_falls_back_to_eager_when_capture_fails(monkeypatch):
    """The CUDA path's contract, faked on CPU: a failed capture gives the eager time, flagged, no crash."""

    def no_graph(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timing, "bench", lambda fn, device, *a, **k: (fn(), 0.5)[1])
    monkeypatch.setattr(timing, "graph_replay_ms", no_graph)
    monkeypatch.setattr(timing, "cuda_context_broken", lambda device: False)
    monkeypatch.setattr(timing, "free_memory", lambda device: None)
    calls = []
    t = timing.time_cell([lambda: calls.append(0), lambda: calls.append(1)], torch.device("cuda"))
    assert t["ms"] == t["eager_ms"] == 0.5 and t["timing"] == "eager" and "capturing" in t["graph_error"]
    monkeypatch.setattr(timing, "graph_replay_ms", lambda fns, device, *a, **k: 0.125)
    assert timing.time_cell([lambda: None], torch.device("cuda")) == {
        "ms": 0.125,
        "eager_ms": 0.5,
        "timing": "cuda-graph",
    }
    assert timing.time_cell([lambda: None], torch.device("cpu"), rep_ms=0)["timing"] == "wall"


def test_report_renders_graph_timed_rows_and_old_files():
    def row(backend, ms, eager, timing="cuda-graph", **kw):
        return {
            "section": "kernel",
            "op": "layer",
            "shape": "3072->8192",
            "N": 1000,
            "T": 1,
            "k": 20,
            "top_m": 1,
            "rank": 6,
            "dtype": "bf16",
            "backend": backend,
            "status": "ok",
            "ms": ms,
            "eager_ms": eager,
            "timing": timing,
            "bytes": 7e6,
            "flops": 6.2e6,
            "floor_ms": 0.002,
            "bound": "memory",
            **kw,
        }

    md = report.render(
        {
            "env": {"card": "H200"},
            "copy_bandwidth": {"gbps": 4300},
            "gemm_tflops": 780.0,
            "gemm": {"m": 8192, "dtype": "bfloat16", "tflops": 780.0},
            "rows": [
                row("triton", 0.010, 0.030),
                row("plain", 0.2, 0.5, timing="eager", graph_error="RuntimeError: capture failed"),
                row("plain-compile", 0.05, 0.09),
            ],
        }
    )
    assert "GEMM rate: **780 TFLOP/s**" in md and "device time of one CUDA-graph replay" in md
    assert "| triton (device) | triton eager | met |" in md and "| 0.0100 | 0.0300 | yes |" in md
    table = md[md.index("### Per layer:") :]
    assert "| triton | plain PyTorch | compiled plain | floor | bound | MB moved | GFLOP | triton %floor |" in table
    assert "| 0.0100 | 0.200 [1] | 0.0500 | 0.0020 | memory | 7.0 | 0.0062 | 20% | 0.0300 | 0.500 | 0.0900 |" in table
    assert "[1] plain: eager time (no CUDA graph: RuntimeError: capture failed)" in table
    old = (
        Path(report.__file__).parent / "results" / "nvidia-h100-80gb-hbm3-2026-11-26.json"
    )  # rows without the new keys
    md = report.render(json.loads(old.read_text()))
    assert "Per-layer targets" in md and "| 3072->8192 | 1,000 | 1 | 0.226 |" in md


def test_report_summarises_baselines_and_opt_in_paths():
    """The goals beyond the targets: triton faster than each baseline in every cell (the misses
    named), cuda within 2x of triton; each opt-in path's time over the default's, per cell."""

    def row(backend, n, t, ms, op="layer"):
        return {"section": "kernel", "op": op, "shape": "3072->8192", "N": n, "T": t, "backend": backend}, ms

    cells = [
        row("triton", 1000, 1, 0.02),
        row("plain", 1000, 1, 0.05),
        row("plain-compile", 1000, 1, 0.01),  # compiled plain wins here
        row("cuda", 1000, 1, 0.05),  # 2.5x triton
        row("triton", 1000, 2048, 0.5),
        row("plain", 1000, 2048, 0.4),  # plain wins here
        row("plain-compile", 1000, 2048, 0.6),
        row("cuda", 1000, 2048, 0.9),
        row("triton-fold", 1000, 1, 0.01),
        row("triton", 100000, 2048, 2.0, op="arrow_topk"),
        row("triton-filter", 100000, 2048, 2.5, op="arrow_topk"),
    ]
    rows = [dict(r, status="ok", ms=ms, k=20, top_m=1, rank=6, dtype="bf16") for r, ms in cells]
    md = report.render({"env": {"card": "H200"}, "rows": rows})
    assert "| 3072->8192 | faster than plain PyTorch | 1 / 2 | N=1,000 T=2048 |" in md
    assert "| 3072->8192 | faster than compiled plain | 1 / 2 | N=1,000 T=1 |" in md
    assert "| 3072->8192 | cuda within 2x | 1 / 2 | N=1,000 T=1 |" in md
    assert "| `LAG_TRITON_FOLD_SPLITS=1` | layer | 3072->8192 | 1,000 | 1 | 0.0200 | 0.0100 | 0.50 |" in md
    assert "| `LAG_TRITON_FILTER_GEMM=1` | arrow_topk | 3072->8192 | 100,000 | 2048 | 2.00 | 2.50 | 1.25 |" in md


@pytest.mark.parametrize("script", [bench_layer, bench_arrow_topk, bench_spectr_rerank, bench_lora_apply])
def test_each_kernel_script(tmp_path, script):
    out = tmp_path / "one.json"
    script.main(TINY + ["--t", "2", "--backends", "plain,torch,cuda", "--out", str(out)])
    _, rows = _rows(out)
    _assert_no_errors(rows)
    assert len({r["op"] for r in rows}) == 1
    assert {r["backend"] for r in rows if r["status"] == "ok"} == {"plain", "torch"}


def test_reference_size_limit(tmp_path):
    out = tmp_path / "lim.json"
    bench_layer.main(TINY + ["--t", "1,4", "--backends", "torch", "--ref-max-tn", "100", "--out", str(out)])
    _, rows = _rows(out)
    by_t = {r["T"]: r["status"] for r in rows}
    assert by_t[1] == "ok" and by_t[4].startswith("skipped")


def test_time_budget_skips_and_notes(tmp_path):
    out = tmp_path / "b.json"
    bench_layer.main(TINY + ["--t", "1", "--backends", "plain", "--time-budget", "0.000001", "--out", str(out)])
    data, rows = _rows(out)
    assert not rows and any("time budget" in n for n in data["notes"])


def test_e2e_and_report(tmp_path):
    out = tmp_path / "e.json"
    bench_e2e.main(
        [
            "--device",
            "cpu",
            "--out",
            str(out),
            "--layers",
            "1",
            "--peft-layers",
            "1",
            "--peft-n",
            "3",
            "--n-adapters",
            "8",
            "--batches",
            "1,2",
            "--decode-steps",
            "2",
            "--prefill-len",
            "8",
            "--backends",
            "base,cuda,torch",
        ]
    )
    data, rows = _rows(out)
    _assert_no_errors(rows)
    assert all(v == "ok" for v in data["checks"].values()), data["checks"]
    ok = {(r["model"], r["backend"], r["phase"], r["batch"]) for r in rows if r["status"] == "ok"}
    main_model = rows[0]["model"]
    for backend in ("base", "lag-torch"):
        assert (main_model, backend, "prefill", 1) in ok
        assert (main_model, backend, "decode", 1) in ok
    assert (main_model, "base", "decode", 2) in ok
    import peft

    if hasattr(peft, "create_arrow_model"):
        assert any(b == "peft-arrow" and p == "prefill" for _, b, p, _ in ok)
    else:  # an older PEFT (the floor, 0.17): the comparison is a row that says why it did not run
        assert [r["status"] for r in rows if r["backend"] == "peft-arrow"] == [
            f"skipped: PEFT {peft.__version__} has no Arrow router"
        ]
    assert all(r["tokens_per_s"] > 0 for r in rows if r["status"] == "ok")

    # report: markdown + README block + PNG (from the kernel JSON, which has layer rows)
    k = tmp_path / "k.json"
    bench_layer.main(TINY + ["--t", "1", "--backends", "plain,torch", "--out", str(k)])
    merged = json.loads(k.read_text())
    merged["rows"] += data["rows"]
    merged["checks"] = data["checks"]
    both = tmp_path / "both.json"
    both.write_text(json.dumps(merged))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n\ntail\n")
    report.main([str(both), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\n\ntail\n")
    assert "old" not in text and "Per layer" in text and "End to end" in text and "peft-arrow" in text
    pytest.importorskip("matplotlib")
    assert both.with_suffix(".png").stat().st_size > 1000


def test_static_decode_with_triton_backend():
    """The decode step the GPU run captures in a CUDA graph, with the Triton backend (interpreter on CPU)."""
    import torch

    import lag_triton
    from bench.harness import backend_ops

    device = torch.device("cpu")
    if backend_ops("triton", device)[1]:
        pytest.skip(backend_ops("triton", device)[1])
    a = bench_e2e.parse_args(["--device", "cpu", "--layers", "1", "--n-adapters", "8"])
    model = bench_e2e.build_model(a, 1, device, torch.float32, 0)
    lib = bench_e2e.build_library(model, 8, a.rank, device, torch.float32, 0)
    lag_triton.patch(model, lib, k=4, top_m=1, backend="triton")
    assert bench_e2e.check_static_decode(model, device, a.vocab, ctx=4, steps=3) == "ok"


def test_profile_layer_reports_kernels_per_call(tmp_path, capsys):
    from bench import profile_layer

    out = tmp_path / "profile.json"
    profile_layer.main(
        [
            "--device",
            "cpu",
            "--backends",
            "torch",
            "--n",
            "9",
            "--t",
            "3",
            "--d-in",
            "16",
            "--d-out",
            "12",
            "--k",
            "4",
            "--iters",
            "2",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["backend"] == "torch" and rows[0]["host_us_per_call"] > 0
    assert any("mm" in k["name"] for k in rows[0]["kernels"])
    assert "torch  N=9 T=3 16->12" in capsys.readouterr().out


def _host_rows(tmp_path, script: str, *args: str) -> tuple[dict, dict]:
    """(record, rows by (case, T)) of a host-cost script run at tiny sizes in a subprocess (the script
    selects the Triton interpreter before Triton defines kernels)."""
    out = tmp_path / "host.json"
    path = Path(__file__).resolve().parent / script
    command = [sys.executable, str(path), *args, "--iters", "2", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    return record, {(r["case"], r["t"]): r for r in record["rows"]}


@needs_triton
def test_bench_host_counts_the_launches_it_stubs(tmp_path):
    """bench_host.py times lag_triton's own Python with every launch stubbed: each row counts the
    launches its call plans (the layer = its three ops; prefill groups pairs by adapter) and has a
    time."""
    record, by_case = _host_rows(tmp_path, "bench_host.py", "--t", "1,70", "--n", "50", "--d-in", "32", "--d-out", "24")
    assert len(by_case) == 10 and all(r["host_us"] > 0 for r in record["rows"])
    for t in (1, 70):
        layer = by_case["route_and_apply", t]
        assert layer["launches"] == sum(
            by_case[op, t]["launches"] for op in ("arrow_topk", "spectr_rerank", "lora_apply")
        )
        assert by_case["patched forward", t]["kernels"] == layer["kernels"]
        assert by_case["arrow_topk", t]["kernels"]["prototype_scores (GEMM)"] == 1
    assert "_grouped_z_kernel" in by_case["spectr_rerank", 70]["kernels"]
    assert by_case["lora_apply", 70]["kernels"] == {
        "_count_pairs_kernel": 1,
        "_scatter_pairs_kernel": 1,
        "_lora_apply_kernel": 1,
    }
    assert record["shape"]["n"] == 50 and record["versions"]["triton"]


@needs_triton
def test_bench_host_moe_routes_each_hit_expert_projection(tmp_path):
    """bench_host_moe.py: the patched expert module makes one routed call (the layer's launches) per
    hit expert and projection, the unpatched one none; both rows are timed."""
    record, by_case = _host_rows(
        tmp_path, "bench_host_moe.py", "--t", "1,3", "--experts", "6", "--top-k", "2", "--n", "9"
    )
    assert len(by_case) == 4 and all(r["host_us"] > 0 for r in record["rows"])
    for t in (1, 3):
        patched = by_case["experts (patched)", t]
        assert by_case["experts (unpatched)", t]["launches"] == 0
        assert 2 <= patched["experts_hit"] <= min(6, 2 * t)
        assert patched["launches"] >= 3 * 2 * patched["experts_hit"]  # >= three ops per hit expert and projection
    assert record["shape"]["experts"] == 6


def test_e2e_table_puts_eager_extras_in_their_own_columns():
    def row(backend, batch, mode, ms, **kw):
        return {
            "section": "e2e",
            "model": "m",
            "backend": backend,
            "N": 5,
            "phase": "decode",
            "batch": batch,
            "tokens": batch,
            "status": "ok",
            "ms": ms,
            "ms_per_token": ms,
            "tokens_per_s": batch * 1e3 / ms,
            "mode": mode,
            "decode_ctx": 8,
            **kw,
        }

    lines = report.e2e_table(
        [
            row("base", 1, "cuda-graph", 2.0),
            row("base", 1, "eager", 4.0, eager_extra=True),
            row("lag-triton", 1, "cuda-graph", 3.0),
        ]
    )
    header = next(line for line in lines if line.startswith("| model"))
    assert "| decode B=1 | eager decode B=1 | decode mode |" in header
    base = next(line for line in lines if "| base |" in line)
    assert "| 2.00 (500) | 4.00 (250) | cuda-graph |" in base
    lag = next(line for line in lines if "| lag-triton |" in line)
    assert lag.endswith("| 3.00 (333) |  | cuda-graph |")


@needs_triton
def test_probe_topk_rows_and_report(tmp_path):
    """The merge-step probe runs (interpreter) and the report renders its table; the interpreter's
    timings mean nothing, only the plumbing is checked."""
    from bench import probe_topk

    out = tmp_path / "probe.json"
    probe_topk.main(["--device", "cpu", "--iters", "1", "--shapes", "1x32x16,4x32x32", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2  # shapes x dtypes x (1 program, one per SM)
    assert all(r["status"] == "ok" and r["us_per_merge"] > 0 for r in rows), rows
    md = report.render(json.loads(out.read_text()))
    assert "Top-k merge step" in md and "| 4 x 32 -> 32 | int64 words |" in md


def test_scope_fraction_rows_and_their_table(tmp_path):
    """--scope-fraction runs arrow_topk and the layer under a scope, marks the rows, and the report
    gives them their own tables (the cost of a scope beside the unscoped ones)."""
    out = tmp_path / "scope.json"
    common = TINY + ["--t", "3", "--ops", "arrow_topk,layer", "--backends", "plain,torch", "--out", str(out)]
    bench_kernels.main(common)
    bench_kernels.main(common + ["--scope-fraction", "0.5"])
    _, rows = _rows(out)
    _assert_no_errors(rows)
    scoped = [r for r in rows if r.get("scope_fraction") == 0.5]
    assert len(scoped) == len(rows) // 2 == 4 and all(r["status"] == "ok" for r in scoped)
    md = tmp_path / "scope.md"
    report.main([str(out), "--md", str(md)])
    text = md.read_text()
    assert text.count("under a scope") == 2 and text.count("### Arrow retrieval") == 2


@needs_triton
def test_triton_fold_variant_runs_folded_and_gets_its_column(tmp_path, monkeypatch):
    """--backends triton-fold times the Triton backend with split reductions folded into one launch
    (the unfolded rerank select must not launch, warm-up and timed calls alike), and the report
    gives it its own column beside triton."""
    import sys

    class MustNotLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the unfolded rerank select launched under triton-fold")

    out = tmp_path / "fold.json"
    common = TINY + ["--t", "1", "--ops", "layer,spectr_rerank", "--out", str(out)]
    bench_kernels.main(common + ["--backends", "triton"])
    rerank = sys.modules["lag_triton.kernels.triton.spectr_rerank"]  # imported by that run
    monkeypatch.setattr(rerank, "_select_kernel", MustNotLaunch())
    bench_kernels.main(common + ["--backends", "triton-fold"])
    _, rows = _rows(out)
    _assert_no_errors(rows)
    assert sorted((r["op"], r["backend"]) for r in rows) == [
        ("layer", "triton"),
        ("layer", "triton-fold"),
        ("spectr_rerank", "triton"),
        ("spectr_rerank", "triton-fold"),
    ]
    assert all(r["status"] == "ok" for r in rows)
    assert "| triton | triton folded |" in report.render(json.loads(out.read_text()))


@needs_triton
def test_triton_filter_variant_takes_the_filtering_gemm(tmp_path, monkeypatch):
    """--backends triton-filter times the Triton backend with the filtering GEMM on (every call of
    the Arrow op goes through it at these shapes) and the report gives it its own column."""
    import sys

    import lag_triton.kernels.triton.arrow_topk  # noqa: F401

    arrow = sys.modules["lag_triton.kernels.triton.arrow_topk"]
    calls = []
    run = arrow.filtered_arrow_topk
    monkeypatch.setattr(arrow, "filtered_arrow_topk", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    out = tmp_path / "filter.json"
    common = TINY[:4] + ["--n", "300", "--t", "5", "--ops", "arrow_topk", "--out", str(out)] + TINY[6:]
    bench_kernels.main(common + ["--backends", "triton"])
    assert not calls
    bench_kernels.main(common + ["--backends", "triton-filter"])
    assert calls
    _, rows = _rows(out)
    _assert_no_errors(rows)
    assert sorted(r["backend"] for r in rows) == ["triton", "triton-filter"]
    assert "| triton | triton filtering GEMM |" in report.render(json.loads(out.read_text()))


@needs_triton
def test_tune_kernels_writes_a_table_the_launchers_accept(tmp_path):
    """The tuning script times candidates through tuning.forced and writes a table that load_table
    accepts, one entry per op and shape bucket (every entry here: --min-gain=-inf, since at these
    sizes timings are noise and the best candidate may time slower than the default)."""
    from bench import tune_kernels
    from lag_triton.kernels.triton import tuning

    out = tune_kernels.main(
        ["--quick", "--out", str(tmp_path / "t.json"), "--rep-ms", "1", "--warmup-ms", "0", "--min-gain=-inf"]
    )
    table = tuning.load_table(out)
    ops = sorted(e["op"] for e in table["entries"])
    assert ops == ["arrow_select"] * 2 + ["lora_apply"] * 2
    for e in table["entries"]:
        assert e["measured"]["ms"] > 0 and e["measured"]["default_ms"] > 0
        assert (
            tuning.lookup(
                table["entries"],
                e["op"],
                k_pad=32,
                t=e["measured"]["T"],
                n=e["measured"]["N"],
                d_out=e["d_out"][0] if "d_out" in e else 0,
            )
            == e["config"]
        )


def test_demo_joint_routing_reports_every_router(tmp_path):
    from bench import demo_joint_routing

    out = tmp_path / "j.json"
    assert demo_joint_routing.main(["--seeds", "0", "--tiny", "--out", str(out)]) == 0
    seed = json.loads(out.read_text())["seeds"]["0"]
    assert set(seed) == set(demo_joint_routing.ROUTERS)
    for row in seed.values():
        assert 0.0 <= row["identity_modules_both_gold"] <= 1.0
        assert set(demo_joint_routing.IDENTITY_MODULES) <= set(row["routing_per_module"])

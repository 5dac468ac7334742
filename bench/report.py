#!/usr/bin/env python3
"""Markdown tables and a PNG plot from a results JSON written by the bench scripts.

    python3 bench/report.py bench/results/<card>-<date>.json                 # markdown to stdout, PNG beside the JSON
    python3 bench/report.py RESULTS.json --md report.md --png plot.png
    python3 bench/report.py RESULTS.json --readme README.md                  # replace the block between
                                                                             # <!-- bench:start --> / <!-- bench:end -->
Needs only the standard library (matplotlib for the PNG; skipped with a message if missing).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
KERNEL_BACKENDS = ("triton", "triton-fold", "triton-filter", "cuda", "plain", "plain-compile", "torch")
BACKEND_TITLES = {
    "triton": "triton",
    "triton-fold": "triton folded",
    "triton-filter": "triton filtering GEMM",
    "cuda": "cuda",
    "plain": "plain PyTorch",
    "plain-compile": "compiled plain",
    "torch": "torch ref",
}
PCT_BACKENDS = ("triton", "triton-fold", "triton-filter", "cuda")  # backends with a % of floor column
OP_TITLES = OrderedDict(
    [
        ("layer", "Per layer: Arrow top-k + SpectR rerank + apply (`route_and_apply`)"),
        ("arrow_topk", "Arrow retrieval: scoring + top-k"),
        ("spectr_rerank", "SpectR rerank"),
        ("lora_apply", "Gather-BGMV apply"),
    ]
)
# Per-layer targets for the triton backend (issue 10: ms, or a multiple of the floor, which is
# max(bytes / copy bandwidth, FLOPs / GEMM rate)), beside plain PyTorch measured in the same run.
TARGETS = [
    {"N": 1000, "T": 1, "ms": 0.015},
    {"N": 100000, "T": 1, "floor_x": 1.2},
    {"N": 1000, "T": 2048, "floor_x": 1.3},
    {"N": 10000, "T": 2048, "floor_x": 1.3},
    {"N": 100000, "T": 2048, "floor_x": 1.5},
]
#: the other per-layer goals: faster than each baseline in every cell; the CUDA backend within this of triton
BASELINES = ("plain", "plain-compile")
CUDA_WITHIN = 2.0
#: opt-in paths, each against the default Triton backend on the cells both measured
OPT_IN = {"triton-fold": "LAG_TRITON_FOLD_SPLITS=1", "triton-filter": "LAG_TRITON_FILTER_GEMM=1"}


def _fmt_ms(v):
    if v is None:
        return ""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}" if v >= 0.1 else f"{v:.4f}"


class Footnotes:
    def __init__(self):
        self.items: OrderedDict[str, int] = OrderedDict()

    def ref(self, text: str) -> str:
        if text not in self.items:
            self.items[text] = len(self.items) + 1
        return f"[{self.items[text]}]"

    def render(self) -> list[str]:
        return [f"[{i}] {t}  " for t, i in self.items.items()]


def _ok(row) -> bool:
    return bool(row) and row.get("status") == "ok" and row.get("ms") is not None


def _cell(row, notes: Footnotes) -> str:
    """A backend's time: device (graph) time; a footnote where capture failed and it is the eager time."""
    if row is None:
        return ""
    if _ok(row):
        if row.get("timing") == "eager":
            why = row.get("graph_error", "graph capture failed")
            return f"{_fmt_ms(row['ms'])} {notes.ref(row['backend'] + ': eager time (no CUDA graph: ' + why + ')')}"
        return _fmt_ms(row["ms"])
    status = row.get("status", "?")
    tag = status.split(":", 1)[0]
    label = row["backend"] + ": " + status
    return f"{tag} {notes.ref(label)}"


def _pct(row) -> str:
    """floor / time, from the row's own floor (old files: the bytes floor, then the only one)."""
    if not _ok(row) or not row.get("floor_ms"):
        return ""
    pct = 100.0 * row["floor_ms"] / row["ms"]
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"


def _graph_timed(rows: list[dict]) -> bool:
    """Rows from a run that timed CUDA-graph replays (device time + a separate eager time)."""
    return any(r.get("timing") in ("cuda-graph", "eager") for r in rows)


def _timing_text(rows: list[dict]) -> str:
    if _graph_timed(rows):
        return (
            "times in ms: device time of one CUDA-graph replay (median of >= 10 replays cycling over the "
            "rotated input sets, L2 flushed by a read before each); *eager*: median of eager calls "
            "(`do_bench`), host launch overhead included."
        )
    if any(r.get("timing") == "wall" for r in rows):
        return "times in ms: wall-clock median of eager calls (CPU)."
    return "times in ms: median of eager calls (`do_bench`, host launch overhead included)."


def _floor_text(rows: list[dict]) -> str:
    if any(r.get("flops") for r in rows):
        return (
            "*floor* = max(bytes that must move / measured copy bandwidth, FLOPs / measured GEMM rate) "
            "(bench/harness.py `kernel_bytes`, `kernel_flops`), *bound* = the larger term; "
            "*%floor* = floor / time."
        )
    return (
        "*floor* = bytes that must move (see bench/harness.py `kernel_bytes`) at the measured copy "
        "bandwidth; *%floor* = floor / time."
    )


def kernel_tables(rows: list[dict], ops: list[str] | None = None) -> list[str]:
    out = []
    krows = [r for r in rows if r.get("section") == "kernel"]
    for op, title in OP_TITLES.items():
        if ops is not None and op not in ops:
            continue
        for variant in sorted({_variant(r) for r in krows if r["op"] == op}):
            op_rows = [r for r in krows if r["op"] == op and _variant(r) == variant]
            out.extend(_kernel_table(op_rows, title, *variant))
    return out


def _variant(row: dict) -> tuple[int, float]:
    """The input variant a kernel row measured: (prompt topics, scope fraction); (0, 0.0) = i.i.d., unscoped."""
    return row.get("prompt_topics", 0), row.get("scope_fraction", 0.0)


def _kernel_table(op_rows: list[dict], title: str, topics: int, scope_fraction: float = 0.0) -> list[str]:
    """One op's table: (shape, N, T) rows x backend columns (device time, then floor, %floor, eager)."""
    notes = Footnotes()
    cells: OrderedDict[tuple, dict] = OrderedDict()
    for r in op_rows:
        key = (r["shape"], r["N"], r["T"])
        cells.setdefault(key, {})[r["backend"]] = r  # later rows (reruns) win
    backends = [b for b in KERNEL_BACKENDS if any(b in v for v in cells.values())]
    has = {key: any(r.get(key) is not None for r in op_rows) for key in ("bound", "flops")}
    eager = [b for b in backends if _graph_timed(op_rows) and any(_ok(v.get(b)) for v in cells.values())]
    pct = [b for b in PCT_BACKENDS if b in backends]
    any_r = op_rows[0]
    if topics:
        title += f" — prompts about {topics} adapters (routing concentrated, `--prompt-topics {topics}`)"
    if scope_fraction:
        title += (
            f" — under a scope (each batch row may use a random {scope_fraction:.0%} of the adapters, "
            f"`--scope-fraction {scope_fraction:g}`)"
        )
    out = [
        f"### {title}",
        "",
        f"{any_r['dtype']}, rank {any_r['rank']}, k={any_r['k']}, top_m={any_r['top_m']}; "
        + _timing_text(op_rows)
        + " "
        + _floor_text(op_rows),
        "",
    ]
    head = ["shape", "N", "T"] + [BACKEND_TITLES[b] for b in backends] + ["floor"]
    head += ["bound"] * has["bound"] + ["MB moved"] + ["GFLOP"] * has["flops"]
    head += [f"{b} %floor" for b in pct] + [f"{BACKEND_TITLES[b]} eager" for b in eager]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|")
    shape_order = list(OrderedDict.fromkeys(k[0] for k in cells))
    for (shape, n, t), by_b in sorted(cells.items(), key=lambda kv: (shape_order.index(kv[0][0]), kv[0][1], kv[0][2])):
        anyrow = next(iter(by_b.values()))
        line = [shape, f"{n:,}", str(t)] + [_cell(by_b.get(b), notes) for b in backends]
        line.append(_fmt_ms(anyrow.get("floor_ms")))
        if has["bound"]:
            line.append(anyrow.get("bound") or "")
        line.append(f"{anyrow['bytes'] / 1e6:.1f}" if anyrow.get("bytes") else "")
        if has["flops"]:
            gflop = None if anyrow.get("flops") is None else anyrow["flops"] / 1e9
            line.append("" if gflop is None else (f"{gflop:,.0f}" if gflop >= 100 else f"{gflop:.3g}"))
        line += [_pct(by_b.get(b)) for b in pct]
        line += [_fmt_ms((by_b.get(b) or {}).get("eager_ms")) if _ok(by_b.get(b)) else "" for b in eager]
        out.append("| " + " | ".join(line) + " |")
    out.append("")
    out.extend(notes.render())
    if notes.items:
        out.append("")
    return out


def _target_goal(tgt: dict, row: dict | None) -> tuple[float | None, str]:
    if "ms" in tgt:
        return tgt["ms"], f"{tgt['ms']} ms"
    floor = (row or {}).get("floor_ms")
    goal = None if floor is None else tgt["floor_x"] * floor
    return goal, f"{tgt['floor_x']}x floor" + (f" = {_fmt_ms(goal)} ms" if goal else "")


def _time_or_status(row: dict | None, key: str = "ms") -> str:
    if _ok(row):
        return _fmt_ms(row.get(key))
    return (row or {}).get("status", "not run").split(":")[0]


def _layer_cells(rows: list[dict]) -> OrderedDict:
    """(shape, N, T) -> {backend: row} of the per-layer kernel rows on i.i.d., unscoped inputs."""
    cells: OrderedDict[tuple, dict] = OrderedDict()
    for r in rows:
        if r.get("section") == "kernel" and r["op"] == "layer" and _variant(r) == (0, 0.0):
            cells.setdefault((r["shape"], r["N"], r["T"]), {})[r["backend"]] = r
    return cells


def target_table(rows: list[dict]) -> list[str]:
    """The per-layer goals against triton's time: the CUDA-graph device time where measured (else eager)."""
    cells = _layer_cells(rows)  # the targets are stated for i.i.d. random inputs
    shapes = list(OrderedDict.fromkeys(k[0] for k in cells))
    if not any("triton" in by_b for by_b in cells.values()):
        return []
    graph = _graph_timed([r for by_b in cells.values() for r in by_b.values()])
    compiled = any("plain-compile" in by_b for by_b in cells.values())
    head = ["shape", "N", "T", "target", "plain PyTorch"] + ["compiled plain"] * compiled
    head += ["triton (device)" if graph else "triton"] + ["triton eager"] * graph + ["met"]
    out = [
        "### Per-layer targets (triton)",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 2) + ":---:|",
    ]
    for shape in shapes:
        for tgt in TARGETS:
            by_b = {b: cells.get((shape, tgt["N"], tgt["T"]), {}).get(b) for b in ("triton", "plain", "plain-compile")}
            tri, plain = by_b["triton"], by_b["plain"]
            if tri is None and plain is None:
                continue
            goal, goal_txt = _target_goal(tgt, tri or plain)
            met = "" if not _ok(tri) or goal is None else ("yes" if tri["ms"] <= goal else "no")
            here = _fmt_ms(plain["ms"]) if _ok(plain) else "-"
            line = [shape, f"{tgt['N']:,}", str(tgt["T"]), goal_txt, here]
            line += [_time_or_status(by_b["plain-compile"])] * compiled
            line += [_time_or_status(tri)] + [_time_or_status(tri, "eager_ms")] * graph + [met]
            out.append("| " + " | ".join(line) + " |")
    if len(out) == 4:
        return []
    out.append("")
    return out


def baseline_table(rows: list[dict]) -> list[str]:
    """Per shape, in how many measured cells triton beats each baseline and cuda stays within
    CUDA_WITHIN of triton, naming the cells that miss."""
    cells = _layer_cells(rows)
    shapes = list(OrderedDict.fromkeys(k[0] for k in cells))
    checks = [(b, f"faster than {BACKEND_TITLES[b]}", lambda tri, other: tri["ms"] < other["ms"]) for b in BASELINES]
    checks.append(("cuda", f"cuda within {CUDA_WITHIN:g}x", lambda tri, cuda: cuda["ms"] <= CUDA_WITHIN * tri["ms"]))
    out = []
    for shape in shapes:
        for other, title, holds in checks:
            pairs = [
                (k, by_b["triton"], by_b.get(other))
                for k, by_b in cells.items()
                if k[0] == shape and _ok(by_b.get("triton")) and _ok(by_b.get(other))
            ]
            if not pairs:
                continue
            missed = [f"N={k[1]:,} T={k[2]}" for k, tri, o in pairs if not holds(tri, o)]
            met = f"{len(pairs) - len(missed)} / {len(pairs)}"
            out.append(f"| {shape} | {title} | {met} | {', '.join(missed) or '-'} |")
    if not out:
        return []
    head = ["### Per layer: triton against the baselines", "", "| shape | goal | cells met | missed |"]
    return head + ["|---|---|---:|---|"] + out + [""]


def opt_in_table(rows: list[dict]) -> list[str]:
    """Each opt-in path against the default Triton backend, per op and cell both measured (device time)."""
    krows = [r for r in rows if r.get("section") == "kernel" and _variant(r) == (0, 0.0)]
    by_cell: OrderedDict[tuple, dict] = OrderedDict()
    for r in krows:
        by_cell.setdefault((r["op"], r["shape"], r["N"], r["T"]), {})[r["backend"]] = r
    out = []
    for variant, switch in OPT_IN.items():
        for (op, shape, n, t), by_b in by_cell.items():
            base, opt = by_b.get("triton"), by_b.get(variant)
            if _ok(base) and _ok(opt):
                ratio = opt["ms"] / base["ms"]
                cells = [f"`{switch}`", op, shape, f"{n:,}", str(t), _fmt_ms(base["ms"]), _fmt_ms(opt["ms"])]
                out.append("| " + " | ".join(cells + [f"{ratio:.2f}"]) + " |")
    if not out:
        return []
    head = [
        "### Opt-in paths against the default (triton)",
        "",
        "ratio = opt-in time / default time (< 1: the opt-in path is faster; default it there once its tests pass).",
        "",
        "| switch | op | shape | N | T | triton | opt-in | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    return head + out + [""]


def e2e_table(rows: list[dict]) -> list[str]:
    erows = [r for r in rows if r.get("section") == "e2e"]
    if not erows:
        return []
    notes = Footnotes()
    groups: OrderedDict[tuple, dict] = OrderedDict()
    cols: OrderedDict[tuple, str] = OrderedDict()
    for r in erows:
        g = groups.setdefault((r["model"], r["backend"], r.get("N")), {"modes": [], "cells": {}, "status": None})
        if r["phase"] in ("all", "patch"):
            g["status"] = r["status"]
            continue
        if r["phase"] == "prefill":
            col, title = (0, r["tokens"], 0), f"prefill {r['tokens']} tok"
        elif r.get("eager_extra"):  # eager decode timed beside the CUDA-graph decode
            col, title = (2, r["batch"], 0), f"eager decode B={r['batch']}"
        else:
            col, title = (1, r["batch"], 0), f"decode B={r['batch']}"
        cols.setdefault(col, title)
        g["cells"][col] = r
        if r["phase"] == "decode" and not r.get("eager_extra") and r.get("mode") and r["mode"] not in g["modes"]:
            g["modes"].append(r["mode"])
    cols = OrderedDict(sorted(cols.items()))
    ctx = sorted({r.get("decode_ctx") for r in erows if r.get("decode_ctx")})
    out = [
        "### End to end",
        "",
        "Cells: **ms per token** (tokens/s). Prefill: one forward of the whole prompt at batch 1, "
        "ms/token = forward time / prompt tokens. Decode: greedy with a static KV cache"
        + (f" after a {ctx[0]}-token prompt" if len(ctx) == 1 else "")
        + ", ms per decode step; tokens/s = batch / step time. *decode mode*: of the decode columns (CUDA graph or "
        "eager); *eager decode* columns time the same step without a graph.",
        "",
        "| model | backend | N | " + " | ".join(cols.values()) + " | decode mode |",
        "|---|---|---:|" + "---:|" * len(cols) + "---|",
    ]
    model_order = list(OrderedDict.fromkeys(k[0] for k in groups))
    rank = {b: i for i, b in enumerate(("base", "lag-triton", "lag-cuda", "lag-torch", "peft-arrow"))}
    ordered = sorted(groups.items(), key=lambda kv: (model_order.index(kv[0][0]), rank.get(kv[0][1], 99)))
    for (model, backend, n), g in ordered:
        cells = []
        for col in cols:
            r = g["cells"].get(col)
            if r is None:
                cells.append("")
            elif r.get("status") == "ok":
                cells.append(f"{_fmt_ms(r['ms_per_token'])} ({r['tokens_per_s']:,.0f})")
            else:
                label = backend + ": " + r["status"]
                cells.append(r["status"].split(":", 1)[0] + " " + notes.ref(label))
        if g["status"] and not g["cells"]:
            label = backend + ": " + g["status"]
            cells = [g["status"].split(":", 1)[0] + " " + notes.ref(label)] + [""] * (len(cols) - 1)
        out.append(f"| {model} | {backend} | {n or '-'} | " + " | ".join(cells) + f" | {', '.join(g['modes'])} |")
    out.append("")
    out.extend(notes.render())
    return out


def probe_table(rows: list[dict]) -> list[str]:
    """bench/probe_topk.py: device microseconds per running top-k merge step, by tile shape."""
    prows = [r for r in rows if r.get("section") == "probe_topk"]
    if not prows:
        return []
    progs = sorted({r["programs"] for r in prows})
    out = [
        "### Top-k merge step inside a Triton program (`bench/probe_topk.py`)",
        "",
        "Device µs per merge of a [rows, C] block into a running top-K_PAD list (median launch / "
        f"{prows[0]['iters']} dependent merges).",
        "",
        "| rows x C -> K_PAD | dtype | " + " | ".join(f"{p} program{'s' if p > 1 else ''}" for p in progs) + " |",
        "|---|---|" + "---:|" * len(progs),
    ]
    cells: OrderedDict[tuple, dict] = OrderedDict()
    for r in prows:
        cells.setdefault((r["rows"], r["C"], r["K_PAD"], r["dtype"]), {})[r["programs"]] = r
    for (rows_, c, kp, dt), by_p in cells.items():
        vals = [
            (
                f"{by_p[p]['us_per_merge']:.2f}"
                if by_p.get(p, {}).get("us_per_merge") is not None
                else (by_p.get(p) or {}).get("status", "").split(":")[0]
            )
            for p in progs
        ]
        out.append(f"| {rows_} x {c} -> {kp} | {dt} | " + " | ".join(vals) + " |")
    out.append("")
    return out


def header(data: dict) -> list[str]:
    env = data.get("env", {})
    bw = data.get("copy_bandwidth") or {}
    parts = [f"**{env.get('card', '?')}**"]
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    for key in ("cuda", "torch", "triton", "transformers", "peft"):
        if env.get(key):
            parts.append(f"{key} {env[key]}")
    line = ", ".join(parts) + f"; {env.get('date', '')}."
    if bw:
        line += f" Measured device copy bandwidth: **{bw['gbps']:.0f} GB/s** (read + write)."
    gemm = data.get("gemm") or {}
    if data.get("gemm_tflops"):
        size = f", {gemm.get('dtype', '')} {gemm['m']}^3".rstrip() if gemm.get("m") else ""
        line += f" Measured GEMM rate: **{data['gemm_tflops']:.3g} TFLOP/s**{size}."
    return [line, ""]


def render(data: dict, ops: list[str] | None = None) -> str:
    rows = data.get("rows", [])
    out = header(data) + target_table(rows) + baseline_table(rows) + opt_in_table(rows)
    out += kernel_tables(rows, ops) + e2e_table(rows) + probe_table(rows)
    checks = data.get("checks")
    if checks:
        out += ["", "Checks: " + ", ".join(f"{k} = {v}" for k, v in checks.items())]
    notes = data.get("notes") or []
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"


def plot(data: dict, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    rows = [
        r
        for r in data.get("rows", [])
        if r.get("section") == "kernel" and r["op"] == "layer" and _variant(r) == (0, 0.0)
    ]
    if not rows:
        return False
    shapes = list(OrderedDict.fromkeys(r["shape"] for r in rows))
    ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(len(shapes), len(ts), figsize=(4.2 * len(ts), 3.4 * len(shapes)), squeeze=False)
    styles = {"triton": "o-", "triton-fold": "o--", "triton-filter": "o:", "cuda": "s-"}
    styles.update({"plain": "^-", "plain-compile": "d-", "torch": "v-"})
    for i, shape in enumerate(shapes):
        for j, t in enumerate(ts):
            ax = axes[i][j]
            sub = [r for r in rows if r["shape"] == shape and r["T"] == t]
            for b in KERNEL_BACKENDS:
                pts = sorted(
                    (r["N"], r["ms"]) for r in sub if r["backend"] == b and r.get("status") == "ok" and r.get("ms")
                )
                if pts:
                    ax.plot(*zip(*pts), styles[b], label=BACKEND_TITLES[b])
            floor = sorted({(r["N"], r["floor_ms"]) for r in sub if r.get("floor_ms")})
            if floor:
                ax.plot(*zip(*floor), "k--", marker="_", markersize=12, label="floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{shape}, T={t}", fontsize=9)
            ax.set_xlabel("adapters N")
            if j == 0:
                ax.set_ylabel("ms per layer")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    env = data.get("env", {})
    fig.suptitle(f"LAG per-layer time vs N ({env.get('card', '?')})", y=0.995, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.90))
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=max(1, len(labels)), fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def update_readme(readme: Path, md: str) -> None:
    block = f"{START}\n{md}{END}"
    text = readme.read_text() if readme.exists() else ""
    if START in text and END in text and text.index(START) < text.index(END):
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Benchmarks\n\n" + block + "\n"
        print(f"{readme}: no {START} / {END} markers; appended a Benchmarks section", file=sys.stderr)
    readme.write_text(text)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results JSON")
    p.add_argument("--md", help="write the markdown here (default: stdout)")
    p.add_argument("--png", help="plot path (default: beside the JSON, .png)")
    p.add_argument("--no-png", action="store_true")
    p.add_argument("--readme", help="README to update between the bench markers")
    p.add_argument(
        "--readme-ops",
        default="layer",
        help="comma-separated kernel tables for the README block (the --md report has them all)",
    )
    a = p.parse_args(argv)
    path = Path(a.results)
    data = json.loads(path.read_text())
    md = render(data)
    if not a.no_png:
        png = Path(a.png) if a.png else path.with_suffix(".png")
        if plot(data, png):
            if a.md and not a.readme:
                import os

                rel = os.path.relpath(png.resolve(), Path(a.md).resolve().parent)
                md += f"\n![per-layer time vs N]({rel})\n"
            print(f"wrote {png}", file=sys.stderr)
    if a.md:
        Path(a.md).write_text(md)
        print(f"wrote {a.md}", file=sys.stderr)
    if a.readme:
        update_readme(Path(a.readme), render(data, a.readme_ops.split(",")))
        print(f"updated {a.readme}", file=sys.stderr)
    if not a.md and not a.readme:
        print(md)
    return md


if __name__ == "__main__":
    main()

"""Tables, plot and files of the experiment: one run, or the mean and sd over several seeds."""

from __future__ import annotations

import json
import math
import os

# Rows in the order the tables list them (LAG rows follow, by k).
BASELINES = ("no adapter", "uniform merge", "oracle", "arrow top-1", "spectr k=N")


# --------------------------------------------------------------------------- several seeds


def _mean_sd(values: list):
    """Mean and sd of numbers, recursively over dicts and lists of numbers (same structure in every run)."""
    first = values[0]
    if isinstance(first, dict):
        pairs = {k: _mean_sd([v[k] for v in values]) for k in first}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(first, list):
        pairs = [_mean_sd([v[i] for v in values]) for i in range(len(first))]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first, None
    values = [float(v) for v in values]  # (NaN, e.g. normalised with a zero oracle, stays NaN)
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def summarise_seeds(runs: list[dict]) -> dict:
    """A result shaped like one run's (rows hold means; ``rows[name]["sd"]`` the sds), plus every run."""
    rows = {}
    for name in runs[0]["rows"]:
        mean, sd = _mean_sd([r["rows"][name] for r in runs])
        mean["sd"] = sd
        rows[name] = mean
    checks = {
        k: all(r["checks"].get(k) is True for r in runs) for k, v in runs[0]["checks"].items() if isinstance(v, bool)
    }
    checks["peft_loaded_weights_max_abs_diff"] = max(r["checks"]["peft_loaded_weights_max_abs_diff"] for r in runs)
    generated = [r["checks"]["generate_vs_teacher_forced"] for r in runs if "generate_vs_teacher_forced" in r["checks"]]
    if generated:  # the model.generate re-check: its counts over every run's sample
        checks["generate_vs_teacher_forced"] = {
            "method": generated[0]["method"],
            "questions": sum(g["questions"] for g in generated),
            "agree_with_teacher_forced": sum(g["agree_with_teacher_forced"] for g in generated),
        }
    return {
        "config": runs[0]["config"],
        "seeds": [r["config"]["seed"] for r in runs],
        "adapter": runs[0]["adapter"],
        "questions": runs[0]["questions"],
        "phrasings": runs[0]["phrasings"],
        "rows": rows,
        "checks": checks,
        "diagnostics": {"chance_routing": runs[0]["diagnostics"]["chance_routing"]},
        "timings": {"total_s": sum(r["timings"]["total_s"] for r in runs)},
        "environment": runs[0]["environment"],
        "runs": runs,
    }


# --------------------------------------------------------------------------- tables


def _cell(row: dict, get, scale: float = 1.0, digits: int = 1, pct: bool = False) -> str:
    value = get(row)
    if value is None:
        return "-"
    sd = row.get("sd")
    text = f"{scale * value:.{digits}f}"
    if sd is not None:
        s = get(sd)
        if s is not None and not (isinstance(s, float) and math.isnan(s)):
            text += f" ± {scale * s:.{digits}f}"
    return text + ("%" if pct else "")


GKS = " +GKS"  # suffix of the rows routed over the library with general knowledge subtraction


def lag_rows(rows: dict) -> list[tuple[str, int]]:
    """(row name, k) of the plain LAG rows ("lag k=5"; not "lag k=5 +GKS")."""
    return [(name, int(name.split("=")[1])) for name in rows if name.startswith("lag k=") and not name.endswith(GKS)]


def ordered_rows(result: dict) -> list[str]:
    rows = result["rows"]
    lag = sorted((k, name) for name, k in lag_rows(rows))
    return [k for k in BASELINES if k in rows] + [k for _, k in lag] + [k for k in rows if k.endswith(GKS)]


def _routing(key: str, layer: str | None = None):
    def get(row):
        ro = row.get("routing")
        if not ro:
            return None
        return ro[key] if layer is None else ro[key][layer]

    return get


def format_table(result: dict) -> str:
    """The main table: EM, normalised, routing accuracy (answer position per layer, question tokens), cost."""
    rows = result["rows"]
    n = result["config"]["adapters"]
    layers = next(r["routing"]["per_layer_answer_position"] for r in rows.values() if r.get("routing"))
    seeds = result.get("seeds")
    title = f"method (N={n}" + (f", seeds {','.join(map(str, seeds))}: mean ± sd)" if seeds else ")")
    head = " | ".join(f"routing @answer, {layer.replace('layer', 'layer ')}" for layer in layers)
    lines = [
        f"| {title} | exact match | normalised (oracle=100) | routing @answer, all layers | {head} "
        "| routing, question tokens | factors read / token |",
        "|---|" + "---:|" * (5 + len(layers)),
    ]
    for name in ordered_rows(result):
        r = rows[name]
        cells = [
            _cell(r, lambda x: x["exact_match"], 100, pct=True),
            _cell(r, lambda x: x["normalised"]),
            _cell(r, _routing("answer_position"), 100, pct=True),
        ]
        cells += [_cell(r, _routing("per_layer_answer_position", layer), 100, pct=True) for layer in layers]
        cells.append(_cell(r, _routing("question_tokens"), 100, pct=True))
        cost = r.get("factors_per_token")
        cells.append(f"{cost / 1e3:,.1f}k" if cost else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nchance routing = {100 * result['diagnostics']['chance_routing']:.1f}%; factors read / token = "
        "adapter-factor scalars one token reads over all routed modules (prototypes, A*, B*)"
    )
    return "\n".join(lines)


def format_routing_by_module(result: dict) -> str:
    """Routing accuracy at the answer position for every routed module."""
    routed = {
        name: result["rows"][name]["routing"] for name in ordered_rows(result) if result["rows"][name].get("routing")
    }
    modules = list(next(iter(routed.values()))["per_module_answer_position"])
    short = [m.replace("model.layers.", "L").replace(".mlp.", " ").replace("_proj", "") for m in modules]
    lines = [
        "routing accuracy at the answer position, per module",
        "| method | " + " | ".join(short) + " |",
        "|---|" + "---:|" * len(modules),
    ]
    for name, ro in routed.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * ro['per_module_answer_position'][m]:.1f}%" for m in modules) + " |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot and files


def _lag_curve(rows: dict, get) -> tuple[list[int], list[float], list[float]]:
    lag = sorted((k, rows[name]) for name, k in lag_rows(rows))
    sds = [get(r["sd"]) if r.get("sd") else 0.0 for _, r in lag]
    return [k for k, _ in lag], [get(r) for _, r in lag], [s or 0.0 for s in sds]


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.4))
    ks, score, score_sd = _lag_curve(rows, lambda r: r["normalised"])
    if any(math.isfinite(v) for v in score):  # all NaN when the oracle answers nothing (normalised = EM / 0)
        ax1.errorbar(ks, score, yerr=score_sd, fmt="o-", color="C0", capsize=3, label="LAG (Arrow top-k + SpectR)")
    for name, (color, ls) in [
        ("arrow top-1", ("C1", "--")),
        ("spectr k=N", ("C2", "-.")),
        ("uniform merge", ("C4", ":")),
        ("no adapter", ("k", ":")),
        ("oracle", ("C3", "-")),
    ]:
        if name in rows and math.isfinite(rows[name]["normalised"]):
            ax1.axhline(rows[name]["normalised"], color=color, ls=ls, label=name)
    if not ax1.lines:
        ax1.text(
            0.5,
            0.5,
            "no normalised scores:\nthe oracle answers nothing",
            ha="center",
            va="center",
            transform=ax1.transAxes,
        )
    ax1.set_ylabel("exact match, normalised (oracle = 100)")
    ax1.set_title("score vs k (cf. LAG paper Fig. 3)")

    layers = list(next(r["routing"]["per_layer_answer_position"] for r in rows.values() if r.get("routing")))
    for i, layer in enumerate(layers):
        ks, acc, acc_sd = _lag_curve(
            rows, lambda r, layer=layer: 100 * r["routing"]["per_layer_answer_position"][layer]
        )
        ax2.errorbar(ks, acc, yerr=acc_sd, fmt="os^v"[i % 4] + "-", color=f"C{i}", capsize=3, label=f"LAG, {layer}")
        for name, ls in [("arrow top-1", "--"), ("spectr k=N", "-.")]:
            ax2.axhline(
                100 * rows[name]["routing"]["per_layer_answer_position"][layer],
                color=f"C{i}",
                ls=ls,
                lw=0.8,
                label=f"{name}, {layer}",
            )
    ax2.axhline(100 * result["diagnostics"]["chance_routing"], color="k", ls=":", label="chance")
    ax2.set_ylabel("routed to the gold adapter at the answer position (%)")
    ax2.set_title("routing accuracy per layer")

    ks, cost, _ = _lag_curve(rows, lambda r: r["factors_per_token"] / 1e3)
    ax3.plot(ks, cost, "o-", color="C0", label="LAG(k)")
    for name, color in [("arrow top-1", "C1"), ("spectr k=N", "C2")]:
        ax3.axhline(rows[name]["factors_per_token"] / 1e3, color=color, ls="--", label=name)
    ax3.set_ylabel("adapter factors read per token (thousands)")
    ax3.set_title("cost: N·d + k·r·d (LAG) vs N·r·d (SpectR)")
    for ax in (ax1, ax2, ax3):
        ax.set_xscale("log")
        if ks:  # explicit: a panel with no finite point has no data limits to log-scale
            lo, hi = min(ks), max(ks)
            pad = (hi / lo) ** 0.05 if hi > lo else 1.25
            ax.set_xlim(lo / pad, hi * pad)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xticks([], minor=True)  # no "3x10^0" between them
        ax.set_xlabel("k (Arrow candidates reranked by SpectR)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    c = result["config"]
    seeds = result.get("seeds")
    fig.suptitle(
        f"LAG in miniature: N={c['adapters']} knowledge LoRAs, tiny Llama (d={c['hidden']}, "
        f"{c['layers']} layers), " + (f"seeds {seeds}, mean ± sd" if seeds else f"seed {c['seed']}"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str, stem: str = "lag_demo", log=print) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    jpath, ppath = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".png")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, ppath)
    log(f"[out] {jpath}, {ppath}")
    return jpath, ppath

"""CI-sized run of the LAG knowledge-library experiment (lag_triton.experiment): N=12, fixed seed.

Asserts what holds by construction (each adapter answers its own document, PEFT loads the written
folders exactly, LAG with k=N selects exactly what SpectR selects, LAG with k=1 exactly what Arrow
top-1 selects, the one-adapter library matches PEFT's LoRA forward) and the ordering the demo is
for, measured on this configuration: LAG k=5 answers more questions than Arrow top-1, and routes
the answer position to the gold adapter more often.
"""

import json

import pytest
import torch

from lag_triton.experiment import ExperimentConfig, run_experiment, run_seeds
from lag_triton.experiment.report import format_routing_by_module, format_table
from lag_triton.experiment.run import determinism

N = 12
SMALL = dict(adapters=N, seed=0, hidden=64, intermediate=192, pretrain_steps=200, adapter_steps=60, backend="torch")


def _deterministic_setting() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.parametrize("caller", [(False, False), (True, False)])
def test_determinism_gives_the_callers_setting_back(caller):
    """The experiment (run_experiment, the demo's PEFT check) seeds and turns deterministic
    algorithms on inside ``determinism`` only: after it, an exception included, the caller's setting."""
    restore = _deterministic_setting()
    torch.use_deterministic_algorithms(caller[0], warn_only=caller[1])
    try:
        with determinism(3):
            assert _deterministic_setting() == (True, True)
            drawn = torch.rand(4)
        assert _deterministic_setting() == caller
        with pytest.raises(RuntimeError, match="inside"), determinism(3):
            assert torch.equal(torch.rand(4), drawn)  # seeded
            raise RuntimeError("inside")
        assert _deterministic_setting() == caller
    finally:
        torch.use_deterministic_algorithms(restore[0], warn_only=restore[1])


@pytest.fixture(scope="module")
def result():
    cfg = ExperimentConfig(**SMALL, ks=(1, 5, N), generate_check=16)
    return run_experiment(cfg, out_dir=None, log=lambda *a: None)


def test_oracle_far_above_no_adapter(result):
    rows = result["rows"]
    assert rows["oracle"]["exact_match"] >= 0.9
    assert rows["oracle"]["exact_match"] - rows["no adapter"]["exact_match"] >= 0.5


def test_peft_loads_the_written_adapters_exactly(result):
    assert result["checks"]["peft_loaded_weights_max_abs_diff"] == 0.0


def test_lag_limits_select_as_arrow_and_spectr(result):
    checks = result["checks"]
    assert checks["lag_k1_selects_as_arrow_top1"] is True
    assert checks["lag_kN_selects_as_spectr"] is True
    rows = result["rows"]
    assert rows["lag k=1"]["exact_match"] == rows["arrow top-1"]["exact_match"]
    assert rows["lag k=12"]["exact_match"] == rows["spectr k=N"]["exact_match"]


def test_lag_k5_beats_arrow(result):
    # The demo's point, on the CI configuration: reranking Arrow's 5 candidates by SpectR answers
    # more questions than Arrow's top-1 and routes the answer position better, well above chance.
    rows = result["rows"]
    lag, arrow = rows["lag k=5"], rows["arrow top-1"]
    assert rows["spectr k=N"]["exact_match"] >= lag["exact_match"] > arrow["exact_match"]
    assert lag["routing"]["answer_position"] > arrow["routing"]["answer_position"]
    assert lag["routing"]["per_layer_answer_position"]["layer0"] >= 3 * result["diagnostics"]["chance_routing"]


def test_cost_ordering(result):
    # factors read per token: Arrow < LAG(5) < LAG(N) (LAG at k=N also reads the prototypes)
    rows = result["rows"]
    assert rows["arrow top-1"]["factors_per_token"] < rows["lag k=5"]["factors_per_token"]
    assert rows["lag k=5"]["factors_per_token"] < rows["spectr k=N"]["factors_per_token"]
    assert rows["spectr k=N"]["factors_per_token"] < rows["lag k=12"]["factors_per_token"]


def test_greedy_generate_agrees_with_teacher_forced_scoring(result):
    g = result["checks"]["generate_vs_teacher_forced"]
    assert g["agree_with_teacher_forced"] == g["questions"]


def test_report_shape(result):
    for name in ("no adapter", "uniform merge", "oracle", "arrow top-1", "spectr k=N", "lag k=1", "lag k=5"):
        row = result["rows"][name]
        assert 0.0 <= row["exact_match"] <= 1.0
    assert result["rows"]["oracle"]["normalised"] == pytest.approx(100.0)
    routing = result["rows"]["lag k=5"]["routing"]
    assert set(routing["per_layer"]) == {"layer0", "layer1"}
    assert 0.0 <= routing["question_tokens"] <= 1.0
    table = format_table(result)
    assert "| lag k=5 |" in table and "factors read / token" in table
    assert "| arrow top-1 |" in format_routing_by_module(result)


def test_one_adapter_library_matches_peft():
    from lag_triton.demo import peft_equivalence_check

    check = peft_equivalence_check(adapters=2, seed=1, backend="torch")
    assert check["adapter_effect_max_abs"] > 1e-3  # the adapter does change the logits
    assert check["ok"], check


def test_demo_table_gives_routing_by_layer(result):
    """The demo's main table has a routing column per layer, filled for every routed method."""
    lines = format_table(result).splitlines()
    assert "routing @answer, layer 0" in lines[0] and "routing @answer, layer 1" in lines[0]
    routed = [name for name, row in result["rows"].items() if row.get("routing")]
    assert len(routed) >= 4
    for name in routed:
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        layer_cells = row.split("|")[5:7]  # after method, exact match, normalised, all layers
        assert all(cell.strip().endswith("%") for cell in layer_cells), row


def test_seeds_report_mean_and_sd(tmp_path):
    tiny = dict(SMALL, adapters=3, hidden=32, intermediate=96, pretrain_steps=5, adapter_steps=3)
    cfg = ExperimentConfig(**tiny, ks=(1,), generate_check=0)
    summary = run_seeds(cfg, seeds=2, log=lambda *a: None, adapters_dir=str(tmp_path))
    assert summary["seeds"] == [0, 1] and len(summary["runs"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0", "seed1"]  # kept adapters: one folder per seed
    ems = [run["rows"]["arrow top-1"]["exact_match"] for run in summary["runs"]]
    row = summary["rows"]["arrow top-1"]
    assert row["exact_match"] == pytest.approx(sum(ems) / 2)
    assert row["sd"]["exact_match"] == pytest.approx(abs(ems[0] - ems[1]) / 2**0.5)
    assert "±" in format_table(summary)


def test_ablation_runs_variants_and_merges_parts(tmp_path, capsys):
    """Each variant changes only its overrides; parts run apart merge into one table (--merge)."""
    import json
    from dataclasses import replace

    from lag_triton.experiment import ablation

    tiny = dict(SMALL, adapters=6, hidden=32, intermediate=96, pretrain_steps=5, adapter_steps=3)
    base = ExperimentConfig(**tiny, ks=(5,), generate_check=0, check_limits=False)
    parts = []
    for name in ("default", "lr A = lr B"):
        got = ablation.run_ablation(base, [name], log=lambda *a: None)
        assert got[name]["overrides"] == ablation.VARIANTS[name][1]
        assert set(got[name]["exact_match"]) == set(ablation.METHODS)
        path = tmp_path / f"{len(parts)}.json"
        # the parts as `--ablation --adapters 6` records them (merge checks base_config against its own)
        cli_base = ExperimentConfig(adapters=6, ks=(5,), generate_check=0, check_limits=False)
        path.write_text(json.dumps({"base_config": ablation.config_record(cli_base), "variants": got}))
        parts.append(str(path))
    assert replace(base, **ablation.VARIANTS["lr A = lr B"][1]).lr_a_ratio == 1.0
    merge = ["--merge", ",".join(parts), "--out", str(tmp_path), "--stem", "merged", "--adapters", "6"]
    assert ablation.main(merge) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert list(merged["variants"]) == ["default", "lr A = lr B"]
    table = capsys.readouterr().out
    assert "| default |" in table and "| lr A = lr B |" in table


def test_general_knowledge_subtraction_rows_come_last_and_change_nothing_else(tmp_path):
    """--general-adapters G adds Arrow / LAG / SpectR routed over the library with GKS (general
    adapters trained on pre-training documents, their mean subtracted); the other rows are those of
    a run without it, and the kept adapters include the general ones."""
    tiny = dict(SMALL, adapters=3, hidden=32, intermediate=96, pretrain_steps=5, adapter_steps=3)
    cfg = ExperimentConfig(**tiny, ks=(1,), generate_check=0)
    plain = run_experiment(cfg, log=lambda *a: None)
    gks = run_experiment(
        ExperimentConfig(**tiny, ks=(1,), generate_check=0, general_adapters=2),
        log=lambda *a: None,
        adapters_dir=str(tmp_path),
    )
    added = ["arrow top-1 +GKS", "spectr k=N +GKS", "lag k=3 +GKS"]
    assert sorted(gks["rows"]) == sorted([*plain["rows"], *added])
    for name, row in plain["rows"].items():  # as JSON: a tiny run's oracle is 0, so "normalised" is NaN
        assert json.dumps(gks["rows"][name], sort_keys=True) == json.dumps(row, sort_keys=True), name
    rows = gks["rows"]
    assert rows["lag k=3 +GKS"]["exact_match"] == rows["spectr k=N +GKS"]["exact_match"]  # k = N is SpectR
    assert rows["arrow top-1 +GKS"]["routing"] != rows["arrow top-1"]["routing"]  # the prototypes moved
    assert format_table(gks).splitlines()[-3].startswith("| lag k=3 +GKS |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc0000", "doc0001", "doc0002", "general00", "general01"]


def test_plot_writes_a_png_when_no_score_can_be_normalised(tmp_path):
    """An oracle that answers nothing (a tiny or untrained run) makes every row's normalised score NaN:
    the plot has no finite point on its log-scaled k axis, and matplotlib raised "Data cannot be
    log-scaled" after the table, losing the PNG. A synthetic result: no experiment runs."""
    from lag_triton.experiment.report import write_outputs

    def row(factors, routed=0.25):
        return {
            "exact_match": 0.0,
            "normalised": float("nan"),
            "factors_per_token": factors,
            "routing": {"per_layer_answer_position": {"layer0": routed, "layer1": routed}},
        }

    rows = {"no adapter": {"exact_match": 0.0, "normalised": float("nan"), "factors_per_token": 0}}
    rows |= {"oracle": row(100), "arrow top-1": row(300), "spectr k=N": row(900)}
    rows |= {f"lag k={k}": row(300 + 100 * k, 0.25 + k / 100) for k in (1, 2, 4)}
    result = {
        "rows": rows,
        "diagnostics": {"chance_routing": 0.25},
        "config": {"adapters": 4, "hidden": 16, "layers": 2, "seed": 0},
    }
    jpath, ppath = write_outputs(result, str(tmp_path), stem="nan", log=lambda *a: None)
    with open(ppath, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(jpath))["rows"]["lag k=2"]["exact_match"] == 0.0


def _tiny_ablation_base(adapters: int) -> ExperimentConfig:
    tiny = dict(SMALL, adapters=adapters, hidden=32, intermediate=96, pretrain_steps=5, adapter_steps=3)
    return ExperimentConfig(**tiny, ks=(5,), generate_check=0, check_limits=False)


def test_ablation_below_five_adapters_uses_the_lag_k_n_row():
    """At N < 5 the experiment's LAG k=5 row is "lag k=N" (k is capped at N): the ablation's summary,
    log line and table read that row (they looked up "lag k=5": KeyError)."""
    from lag_triton.experiment import ablation

    got = ablation.run_ablation(_tiny_ablation_base(4), ["base: not pre-trained"], log=lambda *a: None)
    summary = got["base: not pre-trained"]
    assert set(summary["exact_match"]) == set(ablation.methods(4)) and "lag k=4" in summary["exact_match"]
    table = ablation.format_ablation({"variants": got})
    assert "| base: not pre-trained |" in table and "LAG k=5 is LAG k=N where N < 5" in table


def _fake_variant() -> dict:
    per_layer = {"layer0": 0.5, "layer1": 0.25}
    routed = ("arrow top-1", "spectr k=N", "lag k=4")
    return {
        "what": "x",
        "overrides": {},
        "exact_match": {m: 0.5 for m in ("no adapter", "oracle", *routed)},
        "normalised": {m: 50.0 for m in ("no adapter", "oracle", *routed)},
        "routing_answer_position": {m: per_layer for m in routed},
        "routing_question_tokens": {m: 0.1 for m in routed},
        "chance_routing": 0.25,
        "total_s": 1.0,
    }


def test_ablation_resumes_only_a_file_of_the_same_configuration(tmp_path, monkeypatch, capsys):
    """OUT/STEM.json of another base_config (here N=8) is not resumed into (its rows would be merged
    with rows of N=4): exit 2, one line naming the field and the file, before any work. The same
    base_config resumes: its variants are kept."""
    from lag_triton.experiment import ablation

    ran = []
    monkeypatch.setattr(ablation, "run_ablation", lambda base, names, **kw: ran.append(names) or {})
    record = ablation.config_record(ExperimentConfig(adapters=8, ks=(5,), generate_check=0, check_limits=False))
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"base_config": record, "variants": {"default": _fake_variant()}}))
    before = path.read_text()
    argv = ["--adapters", "4", "--only", "default", "--out", str(tmp_path), "--stem", "a"]
    assert ablation.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapters" in err[0] and str(path) in err[0], err
    assert ran == [] and path.read_text() == before
    # the same configuration: resumed, the stored variant kept
    assert ablation.main(["--adapters", "8", "--only", "default", "--out", str(tmp_path), "--stem", "a"]) == 0
    assert ran == [["default"]]
    assert list(json.loads(path.read_text())["variants"]) == ["default"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapters", "0"], "--adapters must be >= 1"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--ablation", "--adapters", "-1"], "--adapters must be >= 1"),
        (["--adapters", "0", "--ablation"], "--adapters must be >= 1"),  # --ablation anywhere
        (["--adapters", "8", "--ablation", "--stem", "a/b"], "--stem must be a plain file name"),
        (["--ablation", "--threads", "-1"], "--threads must be >= 0"),
    ],
)
def test_experiment_entry_points_check_options_as_the_demo(argv, message, tmp_path, monkeypatch, capsys):
    """`python -m lag_triton.experiment.run [--ablation]` applies the demo's option checks: exit 2 with
    one line before any work (it ran --seeds 0 as one seed, --adapters -1 for minutes, --adapters 0 to
    an AssertionError), and --ablation is recognised anywhere on the command line."""
    from lag_triton.experiment import ablation, run

    def no_work(*a, **kw):
        raise AssertionError("work started")

    monkeypatch.setattr(run, "run_configured", no_work)
    monkeypatch.setattr(ablation, "run_ablation", no_work)
    assert run.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_seeds_summary_keeps_the_generate_check():
    """--seeds > 1: the model.generate re-check of every run is summed into the summary's checks."""
    from lag_triton.experiment.report import summarise_seeds

    def fake_run(seed, agree):
        return {
            "config": {"adapters": 4, "seed": seed},
            "adapter": {},
            "questions": 10,
            "phrasings": [],
            "rows": {"oracle": {"exact_match": 1.0}},
            "checks": {
                "peft_loaded_weights_max_abs_diff": 0.0,
                "lag_k1_selects_as_arrow_top1": True,
                "generate_vs_teacher_forced": {
                    "method": "lag k=5",
                    "questions": 16,
                    "agree_with_teacher_forced": agree,
                },
            },
            "diagnostics": {"chance_routing": 0.25},
            "timings": {"total_s": 1.0},
            "environment": {},
        }

    summary = summarise_seeds([fake_run(0, 16), fake_run(1, 15)])
    assert summary["checks"]["generate_vs_teacher_forced"] == {
        "method": "lag k=5",
        "questions": 32,
        "agree_with_teacher_forced": 31,
    }
    assert summary["checks"]["lag_k1_selects_as_arrow_top1"] is True

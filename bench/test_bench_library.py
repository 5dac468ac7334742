"""CI for the library benchmarks (issue 13): each runs end to end at tiny sizes on CPU."""

import json

from bench import bench_build, bench_sharded


def test_build_benchmark_records_time_memory_and_rate(tmp_path):
    row = bench_build.main(
        [
            "--adapters",
            "3",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--intermediate",
            "48",
            "--workers",
            "0",
            "--quiet",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / f"build-streaming-{row['date']}-n3.json").read_text())
    assert saved == row and row["modules"] == 3 and row["adapters_per_s"] > 0
    assert row["library_bytes"] > 0 and row["peak_rss_process_tree_mib"] >= row["peak_rss_build_process_mib"] > 0
    assert not (tmp_path / "w" / "library.safetensors").exists()  # deleted unless --keep


def test_sharded_benchmark_bytes_match_the_formula(tmp_path):
    row = bench_sharded.main(
        [
            "--world",
            "2",
            "--n-per-rank",
            "3",
            "--tokens",
            "4",
            "--d-in",
            "16",
            "--d-out",
            "24",
            "--k",
            "4",
            "--reps",
            "2",
            "--out",
            str(tmp_path),
            "--stem",
            "s",
        ]
    )
    assert row["bytes_measured"] == row["bytes_formula"]
    assert all(row[k] > 0 for k in ("one_process_n_ms", "one_process_pn_ms", "sharded_pn_ms"))
    assert json.loads((tmp_path / "s.json").read_text()) == row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]

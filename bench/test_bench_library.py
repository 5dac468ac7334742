"""CI for the library benchmarks (issue 13): each runs end to end at tiny sizes on CPU."""

import json

from bench import bench_build, bench_grow, bench_sharded


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


def test_grow_benchmark_times_file_and_folder_and_checks_they_agree(tmp_path):
    small = ["--hidden", "32", "--intermediate", "48", "--layers", "1", "--workers", "0", "--quiet"]
    record = bench_grow.main(
        [
            "--adapters",
            "5",
            "--parts",
            "2",
            "--repeats",
            "1",
            *small,
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path),
        ]
    )
    results = record["results"]
    assert "1 aligned, 5 copied" in results["add_file_report"]
    assert "1 aligned, 5 left in place" in results["add_folder_report"]
    assert (
        "4 adapters" in results["remove_middle_file_report"]
        and "2 copied, 2 left in place" in results["remove_middle_folder_report"]
    )
    assert all(results[k] > 0 for k in ("add_file_s", "add_folder_s", "remove_file_s", "remove_folder_s"))
    assert len(results["read_as_patch_file_s"]) == len(results["read_as_patch_folder_s"]) == 1
    saved = next(tmp_path.glob("grow-folder-cpu-*-n5.json"))
    assert json.loads(saved.read_text()) == record
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["adapters"]  # libraries deleted

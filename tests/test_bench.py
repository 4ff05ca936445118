"""The bench's bookkeeping (no timings): medians over repeated runs, failed rows, the MFU column."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import run as bench  # noqa: E402


def _result(train, memory, accuracy=1.0):
    return {
        "train_images_per_s": train,
        "eval_images_per_s": 2 * train,
        "peak_rss_mb": memory,
        "train_rss_delta_mb": memory / 4,
        "best_val_accuracy": accuracy,
        "impl": "hftl",
    }


def test_repeated_runs_report_each_numbers_median_and_skip_failures():
    runs = [_result(100.0, 1000.0), {"error": "killed"}, _result(300.0, 1200.0), _result(200.0, 900.0)]
    merged = bench.median_result(runs)
    assert merged["train_images_per_s"] == 200.0 and merged["peak_rss_mb"] == 1000.0
    assert merged["runs_finished"] == 3 and merged["impl"] == "hftl"
    assert bench.median_result([{"error": "boom"}]) == {"error": "boom"}


def test_a_run_that_never_reached_the_target_counts_as_the_slowest():
    runs = [{**_result(1.0, 1.0), "time_to_target_s": t} for t in (19.0, 23.0, None)]
    assert bench.median_result(runs)["time_to_target_s"] == 23.0
    runs[0]["time_to_target_s"] = None
    assert bench.median_result(runs)["time_to_target_s"] is None


def test_table_gives_ratios_against_the_named_row_and_keeps_failed_rows_aligned():
    rows = [
        {"case": "c", "row": "baseline", "vs": None, "result": _result(100.0, 1000.0)},
        {"case": "c", "row": "hftl", "vs": "baseline", "result": _result(184.0, 1040.0)},
        {"case": "c", "row": "broken", "vs": "baseline", "result": {"error": "x"}},
    ]
    lines = bench.table(rows).splitlines()
    columns = lines[0].count("|")
    assert all(line.count("|") == columns for line in lines)
    hftl = [cell.strip() for cell in lines[3].split("|")]
    assert hftl[lines[0].split("|").index(" train × ")] == "1.84"
    assert hftl[lines[0].split("|").index(" peak mem × ")] == "1.04"


def test_mfu_is_training_flops_times_images_per_second_over_the_peak():
    row = {"train_flops_per_image": 105e9, "bf16_peak_flops": 989e12, "result": _result(2000.0, 1.0)}
    assert bench._mfu(row) == f"{100 * 105e9 * 2000 / 989e12:.1f}%"
    assert bench._mfu({"result": _result(1.0, 1.0)}) == "—"
    assert bench.bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.bf16_peak_flops("AMD EPYC") is None


def test_hftl_rows_run_through_the_documented_launcher(monkeypatch):
    """`accelerate launch`, as the README says: its thread setting (OMP_NUM_THREADS=1 without --cpu) is measured."""
    monkeypatch.delenv("HFTL_BENCH_THREADS", raising=False)
    one = bench.hftl_cmd("o.json", "m", "d", 1, 8, 0.1, 0.9)
    assert one[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "1"] and "--num_threads" not in one
    two = bench.hftl_cmd("o.json", "m", "d", 1, 8, 0.1, 0.9, ranks=2)
    assert two[1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    monkeypatch.setenv("HFTL_BENCH_THREADS", "1")
    pinned = bench.hftl_cmd("o.json", "m", "d", 1, 8, 0.1, 0.9)
    assert pinned[pinned.index("--num_threads") + 1] == "1"

"""The comparison grid: runs, resumes without recomputing, and reports exactly what the runs measured."""

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hftl.compare import cell_config, compare, grid, model_slug, parse_compare_config, strategy_options
from hftl.outputs import RESULTS_FILE

REPO = Path(__file__).resolve().parents[1]
FAST = ["--num_epochs", "1", "--batch_size", "8", "--learning_rate", "3e-3", "--report_to", "none",
        "--checkpoint_every_epoch", "false"]  # fmt: skip


def _argv(colour_folder, models, report_dir, *extra):
    return ["--dataset", str(colour_folder), "--models", ",".join(str(m) for m in models),
            "--strategies", "linear-probe,scratch", "--shots", "2,4", "--seeds", "1",
            "--report_dir", str(report_dir), "--isolate", "false", *FAST, *extra]  # fmt: skip


def _mtimes(runs: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in runs.glob(f"*/{RESULTS_FILE}")}


def test_grid_resumes_and_report_matches_the_runs(tiny_vit_dir, tiny_resnet_dir, colour_folder, tmp_path):
    report_dir = tmp_path / "compare"
    argv = _argv(
        colour_folder,
        [tiny_vit_dir, tiny_resnet_dir],
        report_dir,
        "--shift",
        "contrast",
        "--shift_severities",
        "3",
        "--adapt",
        "adabn",
        "--shift_cells",
        "all",
    )
    summary = compare(argv)
    runs = report_dir / "runs"
    first = _mtimes(runs)
    assert len(first) == 8  # 2 models × 2 strategies × 2 shots × 1 seed
    assert (runs / f"{model_slug(str(tiny_resnet_dir))}__scratch__4__seed0" / RESULTS_FILE).is_file()

    # rerun: nothing recomputed; then an interrupted cell (no all_results.json) is the only one redone
    compare(argv)
    assert _mtimes(runs) == first
    victim = f"{model_slug(str(tiny_vit_dir))}__linear-probe__2__seed0"
    (runs / victim / RESULTS_FILE).unlink()
    summary = compare(argv)
    again = _mtimes(runs)
    assert again[victim] != first[victim]
    assert {k: v for k, v in again.items() if k != victim} == {k: v for k, v in first.items() if k != victim}

    # the leaderboard's numbers are the runs' numbers
    report = report_dir / "report"
    with (report / "leaderboard.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8
    for row in rows:
        strategy = row["strategy"]
        results = [
            json.loads(p.read_text())
            for p in runs.glob(f"*__{strategy}__{row['shots']}__seed*/{RESULTS_FILE}")
            if json.loads(p.read_text())["model"] == row["model"]
        ]
        assert len(results) == int(row["seeds"]) == 1
        accuracies = [r["test"]["accuracy"] for r in results]
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.mean(accuracies), abs=1e-12)
        assert float(row["f1_macro_mean"]) == pytest.approx(results[0]["test"]["f1_macro"], abs=1e-12)
        assert int(row["trainable_parameters"]) == results[0]["trainable_parameters"]
        assert float(row["train_seconds_mean"]) == pytest.approx(results[0]["train"]["seconds"])
        assert results[0]["config"]["model"]["from_scratch"] == (strategy == "scratch")
        assert float(row["peak_rss_mb"]) > 50
    scratch = [r for r in rows if r["strategy"] == "scratch"]
    probe = [r for r in rows if r["strategy"] == "linear-probe"]
    assert all(int(s["trainable_parameters"]) > int(p["trainable_parameters"]) for s, p in zip(scratch, probe))

    # plots: real, non-uniform images; the report names the recommendation and shows shift before/after
    for name in ("accuracy_vs_params.png", "accuracy_vs_time.png", "learning_curves.png", "shift.png"):
        with Image.open(report / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert image.size[0] > 100 and image.size[1] > 100
        assert pixels.std() > 5, f"{name} looks blank"
    readme = (report / "README.md").read_text()
    best = summary["recommendation"]["4"]["best"]
    assert f"{best['model']} + {best['strategy']}" in readme
    assert "## Under distribution shift" in readme and "| contrast | 3 |" in readme
    methods = {(r["model"], r["method"]) for r in summary["shift"]}
    assert (str(tiny_resnet_dir), "adabn") in methods  # BatchNorm: adapted
    assert (str(tiny_vit_dir), "adabn") not in methods  # LayerNorm only: reported as not applicable
    assert "not applicable" in readme


def test_budget_picks_the_best_cell_that_fits_and_report_pushes(
    tiny_resnet_dir, colour_folder, tmp_path, local_hub, hub_repo_id
):
    report_dir = tmp_path / "compare"
    argv = _argv(colour_folder, [tiny_resnet_dir], report_dir, "--shots", "4", "--shift", "none")
    compare(argv)
    probe_params = json.loads(next((report_dir / "runs").glob(f"*linear-probe*/{RESULTS_FILE}")).read_text())
    budget = str(probe_params["trainable_parameters"])
    summary = compare([*argv, "--budget_params", budget])  # all cells finished: only the report is rebuilt
    best = summary["recommendation"]["4"]["best"]
    assert best["strategy"] == "linear-probe" and best["trainable_parameters"] <= int(budget)
    assert summary["recommendation"]["4"]["fits"] == 1

    compare([*argv, "--push_report", hub_repo_id])
    api = local_hub.api()
    files = set(api.list_repo_files(hub_repo_id, repo_type="dataset"))
    assert {"README.md", "leaderboard.csv", "learning_curves.png", "summary.json"} <= files
    pushed = api.hf_hub_download(hub_repo_id, "leaderboard.csv", repo_type="dataset", local_dir=tmp_path / "dl")
    assert Path(pushed).read_bytes() == (report_dir / "report" / "leaderboard.csv").read_bytes()


@pytest.mark.slow  # a child process re-imports torch + transformers
def test_isolated_cell_measures_its_own_peak_memory(tiny_resnet_dir, colour_folder, tmp_path):
    report_dir = tmp_path / "compare"
    argv = _argv(
        colour_folder,
        [tiny_resnet_dir],
        report_dir,
        "--strategies",
        "linear-probe",
        "--shots",
        "2",
        "--scratch_baseline",
        "false",
        "--isolate",
        "true",
        "--shift",
        "none",
    )
    summary = compare(argv)
    (cell,) = (report_dir / "runs").iterdir()
    resources = json.loads((cell / "resources.json").read_text())
    assert "VmHWM" in resources["measured"] and resources["peak_rss_mb"] > 50
    assert summary["leaderboard"][0]["peak_rss_mb"] == resources["peak_rss_mb"]


def test_options_are_checked_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="--shots: 'ten'"):
        parse_compare_config(["--shots", "1,ten"])
    with pytest.raises(ValueError, match="unknown 'probe'"):
        parse_compare_config(["--strategies", "probe"])
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        parse_compare_config(["--shift", "fog"])
    with pytest.raises(ValueError, match="same folder name"):
        parse_compare_config(["--models", f"{tmp_path}/a/m,{tmp_path}/b/m"])
    args, base = parse_compare_config(
        [
            "--models",
            "a/b,c/d",
            "--strategies",
            "lora",
            "--shots",
            "all,3",
            "--seeds",
            "2",
            "--model",
            "ignored/by-grid",
            "--learning_rate",
            "0.01",
        ]
    )
    cells = grid(args)
    assert len(cells) == 2 * 2 * 2 * 2  # lora + scratch baseline
    assert {c.shots for c in cells} == {None, 3} and base.train.learning_rate == 0.01

    options = '{"lora": {"learning_rate": 0.5, "lora_r": 2}}'
    args, base = parse_compare_config(
        ["--strategies", "lora", "--shots", "1", "--seeds", "1", "--strategy_options", options]
    )
    lora, scratch = (cell_config(base, c, tmp_path / c.name, strategy_options(args)) for c in grid(args))
    assert (lora.train.learning_rate, lora.strategy.lora_r, lora.data.shots) == (0.5, 2, 1)
    assert scratch.train.learning_rate == base.train.learning_rate and scratch.model.from_scratch
    assert scratch.strategy.strategy == "full" and not lora.model.from_scratch
    with pytest.raises(ValueError, match="unknown run option"):
        parse_compare_config(["--strategy_options", '{"full": {"lr": 1}}'])


def test_quickstart_config_parses():
    path = REPO / "recipes" / "configs" / "compare" / "quickstart.yaml"
    header = path.read_text().splitlines()[:3]
    assert any("recipes/compare.py --config recipes/configs/compare/quickstart.yaml" in line for line in header)
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    args, base = parse_compare_config(["--config", str(path)])
    assert base.data.dataset == "hftl/digits" and "hftl/efficientnet-lite0" in args.models
    assert len(grid(args)) >= 8

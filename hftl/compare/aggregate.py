"""The leaderboard's numbers: finished cells flattened, averaged over seeds, a recommendation, pretrained vs
scratch. Every number comes from the cells' own results file (and `resources.json` for memory)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from hftl.compare.grid import SCRATCH
from hftl.outputs import RESULTS_FILE

# strategies that train every BatchNorm layer, so its running statistics describe the training data
BN_TRAINING_STRATEGIES = ("full", "gradual-unfreeze")
LEADERBOARD_COLUMNS = [
    "model", "strategy", "shots", "labels_per_class", "seeds", "accuracy_mean", "accuracy_std", "f1_macro_mean",
    "f1_macro_std", "trainable_parameters", "total_parameters", "train_seconds_mean", "peak_rss_mb", "peak_cuda_mb",
]  # fmt: skip


def load_cell(run_dir: Path) -> dict:
    """One finished cell, flattened: what the leaderboard aggregates."""
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    config = results["config"]
    resources_path = run_dir / "resources.json"
    resources = json.loads(resources_path.read_text()) if resources_path.is_file() else {}
    shots = config["data"]["shots"]
    zero_shot = results["strategy"] == "zero-shot"
    return {
        "run_dir": str(run_dir),
        "model": results["model"],
        "strategy": SCRATCH if config["model"].get("from_scratch") else results["strategy"],
        "shots": "0" if zero_shot else "all" if shots is None else str(shots),
        "labels_per_class": 0.0 if zero_shot else results["num_samples"]["train"] / len(results["labels"]),
        "seed": config["train"]["seed"],
        "accuracy": results["test"]["accuracy"],
        "f1_macro": results["test"]["f1_macro"],
        "trainable_parameters": results["trainable_parameters"],
        "total_parameters": results["total_parameters"],
        "train_seconds": results["train"]["seconds"],
        "peak_rss_mb": resources.get("peak_rss_mb"),
        "peak_cuda_mb": resources.get("peak_cuda_mb"),
        "dataset": results["dataset"],
        "hardware": results.get("hardware", ""),
        "wise_ft": results.get("wise_ft"),
    }


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _max_or_none(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (model, strategy, shots): mean and sample std (n − 1) over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[(cell["model"], cell["strategy"], cell["shots"])].append(cell)
    rows = []
    for (model, strategy, shots), members in groups.items():
        accuracy = [m["accuracy"] for m in members]
        f1 = [m["f1_macro"] for m in members]
        rows.append({
            "model": model,
            "strategy": strategy,
            "shots": shots,
            "labels_per_class": statistics.mean(m["labels_per_class"] for m in members),
            "seeds": len(members),
            "accuracy_mean": statistics.mean(accuracy),
            "accuracy_std": _std(accuracy),
            "f1_macro_mean": statistics.mean(f1),
            "f1_macro_std": _std(f1),
            "trainable_parameters": max(m["trainable_parameters"] for m in members),
            "total_parameters": max(m["total_parameters"] for m in members),
            "train_seconds_mean": statistics.mean(m["train_seconds"] for m in members),
            "peak_rss_mb": _max_or_none(m["peak_rss_mb"] for m in members),
            "peak_cuda_mb": _max_or_none(m["peak_cuda_mb"] for m in members),
            "run_dirs": sorted(m["run_dir"] for m in members),
        })  # fmt: skip
    return sorted(rows, key=lambda r: (shots_order(r["shots"]), -r["accuracy_mean"]))


def wise_ft_rows(cells: list[dict]) -> list[dict]:
    """One row per (model, strategy, shots, alpha) of the cells run with --wise_ft_alpha: validation, test and every
    shifted test set's accuracy (mean over seeds), and in how many seeds validation chose this alpha."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        if cell.get("wise_ft"):
            groups[(cell["model"], cell["strategy"], cell["shots"])].append(cell["wise_ft"])
    rows = []
    for (model, strategy, shots), reports in groups.items():
        by_alpha: dict[float, list[dict]] = defaultdict(list)
        for report in reports:
            for row in report["alphas"]:
                by_alpha[row["alpha"]].append(row)
        for alpha, members in sorted(by_alpha.items()):
            keys = [k for k in members[0] if k != "alpha"]  # validation, test_accuracy, <shift target>_accuracy
            rows.append({
                "model": model, "strategy": strategy, "shots": shots, "alpha": alpha, "seeds": len(members),
                "chosen": sum(report["best_alpha"] == alpha for report in reports),
                "shift_severity": reports[0].get("shift_severity"),
                **{k: statistics.mean(m[k] for m in members) for k in keys},
            })  # fmt: skip
    return sorted(rows, key=lambda r: (r["model"], r["strategy"], shots_order(r["shots"]), r["alpha"]))


def shots_order(shots: str) -> float:
    return float("inf") if shots == "all" else float(shots)


def recommend(rows: list[dict], budget_seconds: float | None, budget_params: int | None) -> dict:
    """Per label budget: the most accurate row whose mean train time and trainable parameters fit the budgets."""
    out = {}
    for shots in sorted({r["shots"] for r in rows}, key=shots_order):
        candidates = [r for r in rows if r["shots"] == shots]
        fitting = [
            r for r in candidates
            if (budget_seconds is None or r["train_seconds_mean"] <= budget_seconds)
            and (budget_params is None or r["trainable_parameters"] <= budget_params)
        ]  # fmt: skip
        best = max(fitting, key=lambda r: r["accuracy_mean"]) if fitting else None
        out[shots] = {"best": best, "fits": len(fitting), "of": len(candidates)}
    return out


def pretrained_vs_scratch(rows: list[dict]) -> list[dict]:
    """For each model and label budget: the best transfer strategy against the from-scratch baseline."""
    out = []
    for (model, shots), members in group(rows, ("model", "shots")).items():
        scratch = next((r for r in members if r["strategy"] == SCRATCH), None)
        transfer = [r for r in members if r["strategy"] != SCRATCH]
        if scratch is None or not transfer:
            continue
        best = max(transfer, key=lambda r: r["accuracy_mean"])
        out.append({
            "model": model, "shots": shots, "best_strategy": best["strategy"],
            "pretrained_accuracy": best["accuracy_mean"], "pretrained_std": best["accuracy_std"],
            "scratch_accuracy": scratch["accuracy_mean"], "scratch_std": scratch["accuracy_std"],
            "gain": best["accuracy_mean"] - scratch["accuracy_mean"],
        })  # fmt: skip
    return sorted(out, key=lambda r: (r["model"], shots_order(r["shots"])))


def group(rows: list[dict], keys: tuple) -> dict:
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(row)
    return groups

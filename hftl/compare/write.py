"""The comparison report: leaderboard (Markdown + CSV), plots, a recommendation, pretrained vs scratch, and
accuracy under distribution shift before and after label-free adaptation.

Every number comes from the cells' own `all_results.json` (and `resources.json` for memory), so the report can be
rebuilt at any time from the run folders alone.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hftl.compare.aggregate import (
    BN_TRAINING_STRATEGIES,
    LEADERBOARD_COLUMNS,
    aggregate,
    group,
    load_cell,
    pretrained_vs_scratch,
    recommend,
    shots_order,
    wise_ft_rows,
)
from hftl.compare.grid import shift_corruptions, split_list
from hftl.compare.shift import eval_dataset, evaluate_shift
from hftl.config import RunConfig
from hftl.log import get_logger
from hftl.outputs import RESULTS_FILE
from hftl.runner import prepare_data
from hftl.tasks import get_task

logger = get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Shift evaluation of chosen cells


def shift_evaluation(args, rows: list[dict], recommendation: dict) -> list[dict]:
    corruptions, extra = shift_corruptions(args), split_list(args.eval_datasets)
    if not corruptions and not extra:
        return []
    top = max(rows, key=lambda r: shots_order(r["shots"]))["shots"]
    at_top = [r for r in rows if r["shots"] == top]
    best = recommendation.get(top, {}).get("best")
    chosen = [best] if best else []
    if args.shift_cells == "all":
        chosen = at_top
    elif args.shift_cells != "best":  # strategies: the best model for each (and the overall best)
        for strategy in split_list(args.shift_cells):
            mine = [r for r in at_top if r["strategy"] == strategy and r is not best]
            chosen += [max(mine, key=lambda r: r["accuracy_mean"])] if mine else []
    out = []
    for row in chosen:
        run_dir = Path(row["run_dirs"][0])
        for item in _shift_for_run(args, run_dir, corruptions, extra):
            out.append(
                {
                    "model": row["model"],
                    "strategy": row["strategy"],
                    "shots": row["shots"],
                    "run_dir": str(run_dir),
                    **item,
                }
            )
    return out


def _shift_for_run(args, run_dir: Path, corruptions: list[str], extra: list[str]) -> list[dict]:
    """Cached in the run folder as shift_results.json, keyed by the settings that produced it."""

    settings = {
        "version": 2,  # bump when what is evaluated changes, so cached results are recomputed
        "corruptions": corruptions,
        "severities": split_list(args.shift_severities),
        "methods": split_list(args.adapt),
        "eval_datasets": extra,
    }
    cache = run_dir / "shift_results.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return saved["rows"]
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    config = RunConfig.from_dict(results["config"])
    task = get_task("classification", config)
    dsd, spec = prepare_data(task, config)
    image_column, label_column = spec.image_column, spec.label_column
    targets = [(name, eval_dataset(config, name, spec.label_names, image_column, label_column)) for name in extra]
    # AdaBN/TENT assume the BatchNorm statistics were estimated on the training data. Strategies that keep the
    # pretrained statistics frozen fitted their head to pretraining-normalised features; re-estimating the
    # statistics then breaks the head (measured on digits: linear probe 0.88 -> 0.09 clean), so they are skipped.
    methods = settings["methods"] if results["strategy"] in BN_TRAINING_STRATEGIES else []
    logger.info(
        f"shift evaluation of {run_dir.name}: {len(corruptions)} corruptions × {len(settings['severities'])} "
        f"severities, adaptation {methods or 'none'}"
    )
    rows = evaluate_shift(
        run_dir,
        dsd["test"],
        image_column,
        label_column,
        corruptions,
        [int(s) for s in settings["severities"]],
        methods,
        seed=config.train.seed,
        extra_targets=targets,
    )
    for row in rows:
        if not methods and settings["methods"]:
            row["skipped"] = settings["methods"]
            row["skipped_reason"] = f"{results['strategy']} keeps the pretrained BatchNorm statistics frozen"
        elif row["skipped"]:
            row["skipped_reason"] = "no BatchNorm"
    cache.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_report(args, run_dirs: list[Path]) -> dict:
    from hftl.compare.plots import plot_learning_curves, plot_scatter, plot_shift

    report = Path(args.report_dir) / "report"
    report.mkdir(parents=True, exist_ok=True)
    cells = [load_cell(d) for d in run_dirs if (d / RESULTS_FILE).is_file()]
    if not cells:
        raise RuntimeError(f"No finished cells under {args.report_dir}/runs: nothing to report.")
    rows = aggregate(cells)
    recommendation = recommend(rows, args.budget_seconds, args.budget_params)
    versus = pretrained_vs_scratch(rows)
    shift_rows = shift_evaluation(args, rows, recommendation)
    wise_rows = wise_ft_rows(cells)
    if wise_rows:
        _write_csv(report / "wise_ft.csv", wise_rows, list(dict.fromkeys(k for r in wise_rows for k in r)))
    _write_csv(report / "leaderboard.csv", rows)
    (report / "leaderboard.md").write_text(leaderboard_markdown(rows) + "\n")
    plots = [
        plot_scatter(rows, "trainable_parameters", "trainable parameters", report / "accuracy_vs_params.png"),
        plot_scatter(rows, "train_seconds_mean", "train time (s)", report / "accuracy_vs_time.png"),
        plot_learning_curves(rows, report / "learning_curves.png"),
    ]
    if shift_rows:
        plots.append(plot_shift(shift_rows, report / "shift.png"))
        _write_csv(
            report / "shift.csv",
            shift_rows,
            ["model", "strategy", "shots", "target", "severity", "method", "accuracy", "drop"],
        )
    summary = {
        "dataset": cells[0]["dataset"],
        "hardware": cells[0]["hardware"],
        "cells": len(cells),
        "total_train_seconds": sum(c["train_seconds"] for c in cells),
        "budget_seconds": args.budget_seconds,
        "budget_params": args.budget_params,
        "leaderboard": rows,
        "recommendation": recommendation,
        "pretrained_vs_scratch": versus,
        "shift": shift_rows,
        "wise_ft": wise_rows,
        "plots": [p.name for p in plots],
    }
    (report / "summary.json").write_text(json.dumps(summary, indent=2))
    (report / "README.md").write_text(report_markdown(summary, args))
    logger.info(f"report: {report / 'README.md'}")
    logger.info(recommendation_line(recommendation, args))
    return summary


def _write_csv(path: Path, rows: list[dict], columns: list[str] = LEADERBOARD_COLUMNS) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def _num(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def leaderboard_markdown(rows: list[dict]) -> str:
    lines = [
        "| model | strategy | shots | labels/class | seeds | test accuracy | test f1_macro | trainable params "
        "| train s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['shots']} | {r['labels_per_class']:.1f} | {r['seeds']} "
            f"| {_pm(r['accuracy_mean'], r['accuracy_std'])} | {_pm(r['f1_macro_mean'], r['f1_macro_std'])} "
            f"| {r['trainable_parameters']:,} | {r['train_seconds_mean']:.1f} | {_num(r['peak_rss_mb'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def _budget_text(args) -> str:
    parts = []
    if args.budget_seconds is not None:
        parts.append(f"≤ {args.budget_seconds:g} s train time")
    if args.budget_params is not None:
        parts.append(f"≤ {args.budget_params:,} trainable parameters")
    return " and ".join(parts) or "no budget"


def recommendation_line(recommendation: dict, args) -> str:
    if not recommendation:
        return "Recommendation: no finished cells."
    shots = max(recommendation, key=shots_order)
    entry = recommendation[shots]
    if entry["best"] is None:
        return f"Recommendation ({_budget_text(args)}, shots {shots}): no cell fits; relax the budget."
    best = entry["best"]
    return (
        f"Recommendation ({_budget_text(args)}, shots {shots}): {best['model']} + {best['strategy']}: test accuracy "
        f"{_pm(best['accuracy_mean'], best['accuracy_std'])}, {best['trainable_parameters']:,} trainable params, "
        f"{best['train_seconds_mean']:.1f} s train ({entry['fits']}/{entry['of']} cells fit)."
    )


def report_markdown(summary: dict, args) -> str:
    rows = summary["leaderboard"]
    lines = [
        "---", "tags: [hftl, transfer-learning, model-comparison]", "---", "",
        f"# Choosing how to transfer: {summary['dataset']}", "",
        f"{summary['cells']} runs ({len(rows)} model × strategy × shots cells, mean ± sample std over seeds), "
        f"{summary['total_train_seconds']:.0f} s of training on {summary['hardware']}. Made with hftl "
        "(`recipes/compare.py`); every number comes from the runs' `all_results.json`.", "",
        f"**{recommendation_line(summary['recommendation'], args)}**", "",
        "## Best cell per label budget", "",
        "| shots | best (within budget) | test accuracy | train s | trainable params |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for shots, entry in sorted(summary["recommendation"].items(), key=lambda kv: shots_order(kv[0])):
        best = entry["best"]
        if best is None:
            lines.append(f"| {shots} | none fits | – | – | – |")
        else:
            lines.append(
                f"| {shots} | {best['model']} + {best['strategy']} | "
                f"{_pm(best['accuracy_mean'], best['accuracy_std'])} | {best['train_seconds_mean']:.1f} | "
                f"{best['trainable_parameters']:,} |"
            )
    lines += ["", "## Leaderboard", "", leaderboard_markdown(rows), ""]
    if summary["pretrained_vs_scratch"]:
        lines += [
            "## Pretrained vs from scratch",
            "",
            "| model | shots | best transfer | accuracy | scratch | gain |",
            "|---|---|---|---|---|---|",
        ]
        for r in summary["pretrained_vs_scratch"]:
            lines.append(
                f"| {r['model']} | {r['shots']} | {r['best_strategy']} | "
                f"{_pm(r['pretrained_accuracy'], r['pretrained_std'])} | "
                f"{_pm(r['scratch_accuracy'], r['scratch_std'])} | {r['gain']:+.4f} |"
            )
        lines.append("")
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in summary["plots"]] + [""]
    if summary["shift"]:
        lines += ["## Under distribution shift", "", shift_markdown(summary["shift"]), ""]
    if summary.get("wise_ft"):
        lines += ["## WiSE-FT: every alpha in-distribution and under shift", "", wise_ft_markdown(summary["wise_ft"])]
    return "\n".join(lines)


def wise_ft_markdown(wise_rows: list[dict]) -> str:
    """One table per model × strategy × shots: a row per alpha (0 = zero-shot, 1 = fine-tuned), accuracy on
    validation, test and each shifted test set, mean over seeds; 'chosen' counts the seeds whose validation picked
    it (the saved model)."""
    out = []
    for (model, strategy, shots), members in group(wise_rows, ("model", "strategy", "shots")).items():
        shifted = [k for k in members[0] if k.endswith("_accuracy") and k != "test_accuracy"]
        severity = members[0].get("shift_severity")
        out.append(
            f"**{model} + {strategy}, shots {shots}** (accuracy, mean over {members[0]['seeds']} seed(s); "
            f"corruptions at severity {severity})\n"
        )
        out.append(
            "| alpha | chosen | validation | test | " + " | ".join(k.removesuffix("_accuracy") for k in shifted) + " |"
        )
        out.append("|---|---|---|---|" + "---|" * len(shifted))
        for r in members:
            values = [f"{r['validation']:.4f}", f"{r['test_accuracy']:.4f}", *(f"{r[k]:.4f}" for k in shifted)]
            out.append(f"| {r['alpha']:g} | {r['chosen']}/{r['seeds']} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def shift_markdown(shift_rows: list[dict]) -> str:
    """One table per shift-evaluated run: rows = target × severity, columns = adaptation methods."""
    out = []
    for (model, strategy, shots), members in group(shift_rows, ("model", "strategy", "shots")).items():
        methods = list(dict.fromkeys(r["method"] for r in members))
        skipped = members[0].get("skipped") or []
        out.append(
            f"**{model} + {strategy}, shots {shots}** (test accuracy; drop vs clean in brackets"
            + (f"; {', '.join(skipped)} not applicable: {members[0].get('skipped_reason')}" if skipped else "")
            + ")\n"
        )
        out.append("| target | severity | " + " | ".join(methods) + " |")
        out.append("|---|---|" + "---|" * len(methods))
        for (target, severity), cells in group(members, ("target", "severity")).items():
            by_method = {c["method"]: c for c in cells}
            # + 0.0 turns a -0.0 change into 0.0
            values = [
                f"{by_method[m]['accuracy']:.4f} ({-by_method[m]['drop'] + 0.0:+.3f})" if m in by_method else "–"
                for m in methods
            ]
            out.append(f"| {target} | {severity} | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def push_report(folder: Path, repo_id: str, private: bool = False) -> str:
    """Uploads the report folder as a Hub dataset repo (README.md is its card); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="dataset", commit_message="hftl compare report"
    )
    return str(url)

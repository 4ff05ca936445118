"""The comparison report's plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from hftl.compare.aggregate import shots_order
from hftl.compare.grid import SCRATCH
from hftl.plotting import pyplot

plt = pyplot()

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scatter(rows: list[dict], x_key: str, x_label: str, path: Path) -> Path:
    """Test accuracy (mean ± std over seeds) against a cost, at the largest label budget: colour = model,
    marker = strategy."""
    top = max((r["shots"] for r in rows), key=shots_order)
    chosen = [r for r in rows if r["shots"] == top]
    models = sorted({r["model"] for r in chosen})
    strategies = sorted({r["strategy"] for r in chosen})
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in chosen:
        colour = colours(models.index(r["model"]) % 10)
        marker = MARKERS[strategies.index(r["strategy"]) % len(MARKERS)]
        ax.errorbar(
            max(r[x_key], 1e-3),
            r["accuracy_mean"],
            yerr=r["accuracy_std"],
            fmt=marker,
            color=colour,
            markersize=8,
            capsize=3,
        )
        ax.annotate(
            r["strategy"],
            (max(r[x_key], 1e-3), r["accuracy_mean"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel(x_label + " (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"accuracy vs {x_label}, shots {top}")
    for i, model in enumerate(models):
        ax.plot([], [], "o", color=colours(i % 10), label=model)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_learning_curves(rows: list[dict], path: Path) -> Path:
    """Accuracy vs labelled images per class, one panel per model, one line per strategy; the from-scratch
    baseline (same architecture, random init) dashed black on every panel."""
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for i, strategy in enumerate(sorted({r["strategy"] for r in mine})):
            points = sorted((r for r in mine if r["strategy"] == strategy), key=lambda r: r["labels_per_class"])
            xs = [r["labels_per_class"] for r in points]
            ys = [r["accuracy_mean"] for r in points]
            errs = [r["accuracy_std"] for r in points]
            style = {"color": "black", "linestyle": "--"} if strategy == SCRATCH else {}
            ax.errorbar(xs, ys, yerr=errs, marker=MARKERS[i % len(MARKERS)], capsize=3, label=strategy, **style)
        if not any(r["strategy"] == SCRATCH for r in mine):
            ax.text(0.5, 0.02, "no from-scratch runs (scratch_baseline off)", transform=ax.transAxes, ha="center")
        if any(r["labels_per_class"] == 0 for r in mine):  # the zero-shot point: linear up to 1, log above
            ax.set_xscale("symlog", linthresh=1.0)
        else:
            ax.set_xscale("log")
        ax.set_xlabel("labelled images per class (log)")
        ax.set_ylabel("test accuracy")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_shift(shift_rows: list[dict], path: Path) -> Path:
    """Accuracy vs corruption severity (0 = clean), one panel per corruption, one line per adaptation method."""
    runs = sorted({(r["model"], r["strategy"]) for r in shift_rows})
    corruptions = sorted({r["target"] for r in shift_rows if r["severity"] > 0})
    extra = sorted({r["target"] for r in shift_rows if r["severity"] == 0 and r["target"] != "clean"})
    panels = corruptions + (["other test sets"] if extra else [])
    fig, axes = plt.subplots(len(runs), len(panels), figsize=(3.6 * len(panels), 3.2 * len(runs)), squeeze=False)
    for row_axes, (model, strategy) in zip(axes, runs):
        mine = [r for r in shift_rows if (r["model"], r["strategy"]) == (model, strategy)]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        clean = {r["method"]: r["accuracy"] for r in mine if r["target"] == "clean"}
        for ax, panel in zip(row_axes, panels):
            for method in methods:
                if panel == "other test sets":
                    values = [r["accuracy"] for r in mine if r["target"] in extra and r["method"] == method]
                    ax.plot(range(len(extra)), values, marker="o", label=method)
                    ax.set_xticks(range(len(extra)), extra, rotation=20, fontsize=7)
                    continue
                points = sorted(
                    (r["severity"], r["accuracy"]) for r in mine if r["target"] == panel and r["method"] == method
                )
                xs = [0] + [s for s, _ in points]
                ys = [clean.get(method, float("nan"))] + [a for _, a in points]
                ax.plot(xs, ys, marker="o", label=method)
                ax.set_xlabel("severity (0 = clean)")
            ax.set_title(f"{panel}\n{model} + {strategy}", fontsize=8)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, path)

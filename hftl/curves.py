"""Learning curves of a run (train loss, validation loss, validation metric per epoch) as a PNG in output_dir,
so overfitting shows at a glance; the Hub card shows every PNG in the folder."""

from __future__ import annotations

from pathlib import Path

CURVES_FILE = "learning_curves.png"


def plot_learning_curves(history: list[dict], metric: str, path: str | Path) -> Path | None:
    """Two panels: losses, and validation `metric` (raw weights, and EMA weights when the run kept an EMA).
    Returns None when no epoch was recorded."""
    from hftl.plotting import pyplot

    plt = pyplot()

    if not history:
        return None
    epochs = [r["epoch"] for r in history]

    def series(key):
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        return zip(*points) if points else ((), ())

    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("eval_loss", "validation loss"), ("ema_eval_loss", "EMA val.")):
        xs, ys = series(key)
        if xs:
            loss_ax.plot(xs, ys, marker="o", label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    for key, label in ((f"eval_{metric}", "validation"), (f"ema_eval_{metric}", "validation, EMA weights")):
        xs, ys = series(key)
        if xs:
            metric_ax.plot(xs, ys, marker="o", label=label)
    metric_ax.set_xlabel("epoch")
    metric_ax.set_ylabel(metric)
    metric_ax.legend()
    for ax in (loss_ax, metric_ax):
        ax.set_xticks(epochs if len(epochs) <= 20 else ax.get_xticks())
        ax.grid(alpha=0.3)
    fig.suptitle("learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)

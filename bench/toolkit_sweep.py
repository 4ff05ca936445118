"""Accuracy-toolkit options on and off, one change at a time against a baseline, on small offline tasks.

    python bench/toolkit_sweep.py --seeds 2 --out bench/results/toolkit-sweep.json

Each cell is a normal hftl classification run (in-process); the table (mean ± std test accuracy over seeds) is
printed as Markdown and the raw per-run numbers saved as JSON. Numbers go to bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hftl.runner import run  # noqa: E402

TASKS = {
    # few-shot digits: 10 labelled images per class, 50 steps, as recipes/configs/compare/quickstart.yaml
    "digits-10shot": ["--dataset", "hftl/digits", "--shots", "10", "--image_size", "32", "--hflip", "false",
                      "--crop_scale_min", "0.7", "--max_steps", "50", "--batch_size", "16"],
    # Fashion-MNIST subset: 2,000 train images, 1,000 validation / test images, one epoch at 32 px
    "fashion-mnist-2k": ["--dataset", "hftl/fashion-mnist", "--max_train_samples", "2000",
                         "--max_eval_samples", "1000", "--image_size", "32", "--num_epochs", "1",
                         "--batch_size", "32", "--crop_scale_min", "0.8"],
}  # fmt: skip
COMMON = ["--model", "hftl/efficientnet-lite0", "--learning_rate", "2.0e-3", "--weight_decay", "0.01",
          "--label_smoothing", "0.1", "--report_to", "none", "--checkpoint_every_epoch", "false",
          "--overwrite_output_dir", "true"]  # fmt: skip
VARIANTS = {
    "baseline (crop + flip)": [],
    "+ trivialaugment": ["--auto_augment", "trivialaugment"],
    "+ random_erasing 0.25": ["--random_erasing", "0.25"],
    "+ mixup 0.2": ["--mixup_alpha", "0.2"],
    "+ cutmix 1.0": ["--cutmix_alpha", "1.0"],
    "+ EMA 0.9": ["--ema_decay", "0.9"],
    "+ drop_path 0.1": ["--drop_path_rate", "0.1"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out", default="bench/results/toolkit-sweep.json")
    args = parser.parse_args()
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {(r["task"], r["variant"], r["seed"]) for r in rows}
    with tempfile.TemporaryDirectory(prefix="hftl-sweep-") as tmp:
        for seed in range(args.seeds):  # seeds outermost: a cut-short sweep still covers every cell once
            for task in args.tasks.split(","):
                for variant, options in VARIANTS.items():
                    if (task, variant, seed) in done:
                        continue
                    started = time.perf_counter()
                    argv = [*TASKS[task], *COMMON, *options, "--seed", str(seed), "--output_dir", f"{tmp}/run"]
                    results = run("classification", argv)
                    rows.append({"task": task, "variant": variant, "seed": seed,
                                 "test_accuracy": results["test"]["accuracy"],
                                 "weights": results["train"]["weights"],
                                 "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


def table(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    lines = ["| option | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for variant in VARIANTS:
        cells = []
        for task in tasks:
            accs = [r["test_accuracy"] for r in rows if r["task"] == task and r["variant"] == variant]
            if not accs:
                cells.append("")
                continue
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.3f} ± {std:.3f} (n={len(accs)})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Fine-tune a pretrained object detector (DETR, Conditional/Deformable DETR, RT-DETR, YOLOS, … or a timm backbone).

Usage:
    accelerate launch recipes/detect.py --config recipes/configs/detection/quickstart.yaml       # offline
    accelerate launch recipes/detect.py --dataset cppe-5 --model facebook/detr-resnet-50 --strategy full
    accelerate launch recipes/detect.py --dataset path/to/coco --model facebook/detr-resnet-50 --strategy lora
        # folder: annotations.json (COCO) + images, or train/ valid/ test/ folders each holding one
    accelerate launch --multi_gpu --num_processes 2 recipes/detect.py \
        --config recipes/configs/detection/quickstart.yaml
    python recipes/detect.py --help          # every option, with its default and help text

Rows hold an image and an `objects` column {"bbox": [[x, y, w, h], ...], "category": [...]} (COCO boxes in pixels;
--box_format xyxy|cxcywh for others; --label_column names another column). A timm classifier as --model (e.g. the
bundled hftl/efficientnet-lite0) becomes the ImageNet backbone of a fresh Conditional DETR. Options come from a YAML
file (--config) and are overridden by flags; see hftl/config.py. `main()` below shows each step of a run
(hftl/runner.py): copy this file and change the step you need.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl import runner  # noqa: E402
from hftl.config import parse_config  # noqa: E402
from hftl.exits import run_or_exit  # noqa: E402
from hftl.tasks import task_args  # noqa: E402

TASK = "detection"
# the recipe's own defaults: a --config YAML file overrides them, flags override both
DEFAULTS = {
    "dataset": "hftl/shapes-detection",
    "model": "hftl/efficientnet-lite0",
}


def main(argv: list[str] | None = None) -> dict:
    # ---- options: the shared dataclasses plus the task's own (hftl/config.py, hftl/tasks/<task>/) ---------------
    config = parse_config(argv, DEFAULTS, task_args(TASK))

    # ---- setup: checks that fail fast (output folder, preflight), threads, the Accelerator, the task's hooks -----
    run = runner.setup(TASK, config)

    # ---- data: load (Hub id, folder, bundled), standard splits, label names, image checks → run.dsd, run.spec ----
    runner.load_data(run)

    # ---- model: pretrained weights with a head for the labels, and the image processor → run.model, .processor --
    runner.build_model(run)

    # ---- adapt: the strategy freezes, groups or wraps (PEFT) the parameters → run.adapted -------------------------
    runner.adapt(run)

    # ---- train: transforms, fast paths, the Accelerate loop (evaluation, best weights, checkpoints) → run.result --
    runner.train_model(run)

    # ---- test: the held-out split, through the processor that is saved → run.test_metrics -----------------------
    runner.test(run)

    # ---- save: a folder pipeline() loads, test artefacts, the results file → run.results ------------------------
    runner.save(run)

    # ---- publish: export, Hub push and demo Space, as the options ask (main process only) ------------------------
    runner.publish(config, run.results)
    return run.results


if __name__ == "__main__":
    run_or_exit(main)

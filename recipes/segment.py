"""Fine-tune a segmentation model: semantic (SegFormer, UperNet, DPT, Mask2Former, … or a timm encoder in UperNet)
or instance (`--subtask instance`: Mask2Former / MaskFormer, or a timm backbone in a new Mask2Former).

Usage:
    accelerate launch recipes/segment.py --config recipes/configs/segmentation/quickstart.yaml       # offline
    accelerate launch recipes/segment.py --dataset scene_parse_150 --model nvidia/mit-b0
    accelerate launch recipes/segment.py --dataset path/to/folder --model nvidia/mit-b0 --strategy lora
        # folder: [train|validation|test/]images/*.jpg + masks/*.png (same names, class ids) + id2label.json
    accelerate launch --multi_gpu --num_processes 2 recipes/segment.py \
        --config recipes/configs/segmentation/quickstart.yaml
    accelerate launch recipes/segment.py --config recipes/configs/segmentation/instance-quickstart.yaml  # offline
    accelerate launch recipes/segment.py --subtask instance --dataset path/to/coco \
        --model facebook/mask2former-swin-tiny-coco-instance --strategy lora
        # folder: annotations.json (COCO polygons or RLE) + images, or train/ valid/ test/ each with one
    python recipes/segment.py --help          # every option, with its default and help text

Masks hold one class id per pixel. --reduce_labels true (0 = "other", ignored; k → k-1) and --ignore_index (default
255) say how to read them; --id2label names the classes; --mask_palette reads RGB colour masks. Options come from
a YAML file (--config) and are overridden by flags; see hftl/config.py. `main()` below shows each step of a run
(hftl/runner.py): copy this file and change the step you need.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl import runner  # noqa: E402
from hftl.config import parse_config  # noqa: E402
from hftl.exits import run_or_exit  # noqa: E402
from hftl.tasks import task_args  # noqa: E402

TASK = "segmentation"
BUNDLED = {"semantic": "hftl/shapes-segmentation", "instance": "hftl/shapes-instances"}
# the recipe's own defaults: a --config YAML file overrides them, flags override both
DEFAULTS = {"dataset": BUNDLED["semantic"], "model": "hftl/efficientnet-lite0"}


def main(argv: list[str] | None = None) -> dict:
    # ---- options: the shared dataclasses plus the task's own (hftl/config.py, hftl/tasks/<task>/) ---------------
    config = parse_config(argv, DEFAULTS, task_args(TASK))
    if config.data.dataset == BUNDLED["semantic"]:
        config.data.dataset = BUNDLED[config.task.subtask]  # the bundled set follows --subtask

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

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
a YAML file (--config) and are overridden by flags; see hftl/config.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl.config import parse_config  # noqa: E402
from hftl.exits import run_or_exit  # noqa: E402
from hftl.runner import run_config  # noqa: E402
from hftl.tasks import task_args  # noqa: E402

BUNDLED = {"semantic": "hftl/shapes-segmentation", "instance": "hftl/shapes-instances"}


def main() -> dict:
    config = parse_config(
        defaults={"dataset": BUNDLED["semantic"], "model": "hftl/efficientnet-lite0"},
        task_args=task_args("segmentation"),
    )
    if config.data.dataset == BUNDLED["semantic"]:
        config.data.dataset = BUNDLED[config.task.subtask]  # the bundled set follows --subtask
    return run_config("segmentation", config)


if __name__ == "__main__":
    run_or_exit(main)

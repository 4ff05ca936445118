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
file (--config) and are overridden by flags; see hftl/config.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl.exits import run_or_exit  # noqa: E402
from hftl.runner import run  # noqa: E402

if __name__ == "__main__":
    run_or_exit(run, "detection", defaults={"dataset": "hftl/shapes-detection", "model": "hftl/efficientnet-lite0"})

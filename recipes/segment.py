"""Fine-tune a pretrained semantic-segmentation model (SegFormer, UperNet, DPT, … or a timm encoder in UperNet).

Usage:
    accelerate launch recipes/segment.py --config recipes/configs/segmentation/quickstart.yaml       # offline
    accelerate launch recipes/segment.py --dataset scene_parse_150 --model nvidia/mit-b0
    accelerate launch recipes/segment.py --dataset path/to/folder --model nvidia/mit-b0 --strategy lora
        # folder: [train|validation|test/]images/*.jpg + masks/*.png (same names, class ids) + id2label.json
    accelerate launch --multi_gpu --num_processes 2 recipes/segment.py \
        --config recipes/configs/segmentation/quickstart.yaml
    python recipes/segment.py --help          # every option, with its default and help text

Masks hold one class id per pixel. --reduce_labels true (0 = "other", ignored; k → k-1) and --ignore_index (default
255) say how to read them; --id2label names the classes; --mask_palette reads RGB colour masks. Options come from
a YAML file (--config) and are overridden by flags; see hftl/config.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl.exits import run_or_exit  # noqa: E402
from hftl.runner import run  # noqa: E402

if __name__ == "__main__":
    run_or_exit(
        run, "segmentation", defaults={"dataset": "hftl/shapes-segmentation", "model": "hftl/efficientnet-lite0"}
    )

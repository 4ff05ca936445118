"""Options only semantic segmentation reads; the recipe's parser adds them to the shared ones (hftl/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SegmentationArgs:
    subtask: Literal["semantic", "instance"] = field(
        default="semantic",
        metadata={
            "help": "semantic: a class per pixel; instance: a mask per object, COCO mAP "
            "(hftl/tasks/instance_segmentation/)."
        },
    )
    id2label: str | None = field(
        default=None,
        metadata={"help": "Class id → name JSON (a file, or repo_id:file in a Hub dataset repo)."},
    )
    reduce_labels: bool | None = field(
        default=None,
        metadata={
            "help": "Mask value 0 is 'other/background' to ignore, k becomes k-1 (ADE20k). Unset: the dataset's "
            "known convention, else off."
        },
    )
    ignore_index: int = field(default=255, metadata={"help": "Mask value never counted in loss or metrics."})
    mask_palette: str | None = field(
        default=None, metadata={"help": "JSON {class: [r, g, b]} to read RGB colour masks."}
    )

"""Options only object detection reads; the recipe's parser adds them to the shared ones (hftl/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

BoxFormat = Literal["coco", "xyxy", "cxcywh"]
BOX_FORMATS = get_args(BoxFormat)


@dataclass
class DetectionArgs:
    box_format: BoxFormat = field(
        default="coco",
        metadata={"help": "Box layout in the objects column: coco [x, y, w, h], xyxy, or cxcywh (pixels)."},
    )

"""Options only instance segmentation reads. Run through `recipes/segment.py --subtask instance`, the task gets the
recipe's `SegmentationArgs` instead, whose fields include these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class InstanceSegmentationArgs:
    id2label: str | None = field(
        default=None,
        metadata={"help": "Class id → name JSON (a file, or repo_id:file in a Hub dataset repo)."},
    )

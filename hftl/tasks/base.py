"""The task contract: every hook the runner, the strategies and the trainer call, each defined here.

A task subclasses `Task` and overrides what differs for it. Required hooks raise `NotImplementedError` here;
optional ones have a documented default that does nothing, so callers never ask whether a hook exists (the pattern
of Lightning's `core/hooks.py`). What data preparation learns about a dataset comes back as a `DataSpec` value.

    Evaluator.update(accelerator, batch, outputs)   gathers across ranks itself (accelerator.gather_for_metrics)
    Evaluator.compute() -> dict[str, float]
    Evaluator.save_artifacts(output_dir, prefix)    confusion matrix / sample predictions PNG + JSON
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from datasets import Dataset, DatasetDict


@dataclass(frozen=True)
class DataSpec:
    """What data preparation found: the label names (index = class id) and the columns the task reads."""

    label_names: list[str]
    image_column: str | None = None
    # a per-image class label (classification); None where there is none, so few-shot sampling does not apply
    label_column: str | None = None
    # what only this task found and its transforms need (segmentation: its MaskSpec); `prepare` receives it here
    task_data: Any = None

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


class Evaluator(Protocol):
    def update(self, accelerator, batch, outputs) -> None: ...
    def compute(self) -> dict[str, float]: ...
    def save_artifacts(self, output_dir: str | Path, prefix: str) -> list[Path]: ...


class Task:
    name: str = ""  # "classification" | "detection" | "segmentation"
    pipeline_tag: str = ""  # "image-classification" | "object-detection" | "image-segmentation"
    main_metric: str = ""  # default metric for best-model selection / early stopping (e.g. "accuracy", "map_50")
    greater_is_better: bool = True  # for main_metric; metrics ending in "loss" are always lower-is-better
    # the dataclass of options only this task reads (e.g. hftl/tasks/detection/args.py); the recipe's parser adds
    # it to the shared ones and the run's `config.task` holds its values. None: the task has no options of its own.
    args: type | None = None

    # set by `label_names` (the columns it detected); read through `data_spec`
    image_column: str | None = None
    label_column: str | None = None

    def __init__(self, config=None):
        self.config = config
        # the task's own options: the run's, or the defaults when built without a config (tests, tools)
        given = config.task if config is not None else None
        self.options = given if given is not None or self.args is None else self.args()

    # --- data ------------------------------------------------------------------------------------------------
    def load_local(self, path: str, data_args) -> DatasetDict:
        """The task's local-folder format (imagefolder, COCO json, image + mask folders)."""
        raise NotImplementedError

    def label_names(self, dsd: DatasetDict, data_args) -> list[str]:
        """Validates the columns early (clear errors before any model loads) and returns the label names."""
        raise NotImplementedError

    def data_spec(self, dsd: DatasetDict, data_args) -> DataSpec:
        """`label_names` and the columns it found, as one value for the steps that follow."""
        names = self.label_names(dsd, data_args)
        return DataSpec(list(names), self.image_column, self.label_column)

    def encode_labels(self, dsd: DatasetDict, names: list[str]) -> DatasetDict:
        """Labels → one shared encoding across splits. Default: unchanged."""
        return dsd

    def prepare(self, dsd: DatasetDict, processor, data_args, spec: DataSpec | None = None) -> DatasetDict:
        """The splits with their train / eval transforms set; `spec` is what `data_spec` returned for them (a task
        whose transforms need its `task_data` requires it)."""
        raise NotImplementedError

    def deterministic_splits(self, data_args) -> list[str]:
        """Splits whose processed tensors the runner may cache (hftl/fastpaths/processed_cache.py). Default: none."""
        return []

    def decoded_train_split(self, train: Dataset, processor, data_args) -> Dataset | None:
        """Augmented train items from images decoded once (hftl/fastpaths/decoded_images.py), or None for the
        ordinary path. Default: None."""
        return None

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        """A batch dict (tensors, or lists for detection targets)."""
        raise NotImplementedError

    def train_collate(self, data_args, num_classes: int):
        """The collate function for train batches (batch-level augmentation such as MixUp). Default: `collate`."""
        return self.collate

    # --- model -----------------------------------------------------------------------------------------------
    def load_model(self, model_args, id2label: dict) -> tuple[Any, Any]:
        """(model, image processor) with a head for `id2label`."""
        raise NotImplementedError

    def forward(self, model, batch):
        """A ModelOutput with `.loss` (and whatever the evaluator reads)."""
        raise NotImplementedError

    def head_modules(self, model) -> list[str]:
        """Module names that stay trainable under frozen strategies (`modules_to_save` under LoRA)."""
        raise NotImplementedError

    def backbone(self, model):
        """The nn.Module that `frozen-backbone` / `linear-probe` freeze."""
        raise NotImplementedError

    def lora_targets(self, model) -> list[str]:
        """Module-name suffixes for PEFT LoRA, by model family."""
        raise NotImplementedError

    def new_evaluator(self, id2label: dict, processor=None) -> Evaluator:
        """A fresh evaluator; `processor` is the run's image processor (post-processing, un-normalising)."""
        raise NotImplementedError

"""Image classification: what differs from the other tasks, and nothing else."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import ClassLabel, DatasetDict, Image, Value

from hftl.data import IMAGE_COLUMN_NAMES
from hftl.image_check import UNREADABLE, decode_or_none, describe
from hftl.modeling import (
    ensure_rgb,
    load_model_and_processor,
    processor_input_size,
    resize_processor,
    resolve_model_path,
    train_crop,
)
from hftl.pixels import pixel_steps, processor_pixels
from hftl.strategies import last_linear_named, peft_base
from hftl.tasks.base import Task
from hftl.toolkit import (
    WithMixSeed,
    batch_mixer,
    draw_mix_seed,
    drop_path_kwargs,
    erasing_steps,
    item_augmentations,
    mixes,
    policy_steps,
)

LABEL_COLUMN_NAMES = ("label", "labels", "class", "category", "target", "fine_label", "coarse_label")

# LoRA targets: attention projections for transformers (names differ across transformers versions), the wide
# convolutions for CNNs. A name is used only where every module it matches is a plain Linear/Conv2d outside the
# head; with none, targets are derived from module types (hftl/lora.py).
ATTENTION_TARGETS = ["q_proj", "v_proj", "query", "value", "qkv"]
LORA_TARGETS = {
    "convnext": ["pwconv1", "pwconv2"],
    "resnet": ["convolution"],
    "timm_wrapper": ["qkv", "conv_pw", "conv_pwl", "conv1", "conv2", "conv_head"],
}


class ClassificationTask(Task):
    name = "classification"
    pipeline_tag = "image-classification"
    main_metric = "accuracy"
    greater_is_better = True

    def __init__(self, config=None):
        super().__init__(config)
        self.label_smoothing = config.train.label_smoothing if config is not None else 0.0
        self.image_column = None
        self.label_column = None

    # ---- data -------------------------------------------------------------------------------------------------
    def load_local(self, path: str, data_args) -> DatasetDict:
        from datasets.data_files import EmptyDatasetError

        from hftl.local_data import load_imagefolder

        layout = (
            f"imagefolder needs one sub-folder per class (e.g. {path}/cat/1.jpg, {path}/dog/2.jpg), optionally "
            f"under split folders ({path}/train/cat/1.jpg, {path}/test/...)"
        )
        try:
            dsd = load_imagefolder(path)
        except EmptyDatasetError:
            raise ValueError(f"Dataset folder {path!r} holds no image files. {layout}.") from None
        features = next(iter(dsd.values())).features
        labelled = any(isinstance(f, ClassLabel) for f in features.values()) or set(features) & set(LABEL_COLUMN_NAMES)
        if data_args.label_column is None and not labelled:
            # imagefolder drops the label column when every image sits in the same folder: there are no labels
            raise ValueError(
                f"Dataset folder {path!r} has no class sub-folders, so its images have no labels. {layout}; or add "
                "a metadata.csv with a label column and name it with --label_column."
            )
        return dsd

    def label_names(self, dsd: DatasetDict, data_args) -> list[str]:
        """Finds (or checks) the image and label columns and returns the class names; errors name the fix."""
        train = dsd["train"]
        features = train.features
        self.image_column = data_args.image_column or _detect(
            features, lambda f: isinstance(f, Image), IMAGE_COLUMN_NAMES, "image", "--image_column"
        )
        self.label_column = data_args.label_column or _detect(
            features, lambda f: isinstance(f, ClassLabel), LABEL_COLUMN_NAMES, "label", "--label_column"
        )
        for column, option in ((self.image_column, "--image_column"), (self.label_column, "--label_column")):
            if column not in features:
                raise ValueError(f"Column {column!r} ({option}) not in the dataset; columns: {list(features)}.")
        feature = features[self.label_column]
        if isinstance(feature, ClassLabel):
            return list(feature.names)
        if isinstance(feature, Value) and feature.dtype == "string":
            return sorted(set().union(*(set(split[self.label_column]) for split in dsd.values())))
        if isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")):
            top = max(max(split[self.label_column]) for split in dsd.values() if len(split))
            return [str(i) for i in range(top + 1)]
        raise ValueError(
            f"Label column {self.label_column!r} has type {feature!r}; it must be a ClassLabel, strings or integers. "
            "Pick another with --label_column."
        )

    def encode_labels(self, dsd: DatasetDict, names: list[str]) -> DatasetDict:
        """Cast string or integer labels to one ClassLabel shared by all splits (so ids agree across splits)."""
        feature = dsd["train"].features[self.label_column]
        if isinstance(feature, ClassLabel):
            for split, ds in dsd.items():
                if ds.features[self.label_column] != feature:
                    raise ValueError(
                        f"Split {split!r} has other class names than train: {ds.features[self.label_column]}."
                    )
            return dsd
        target = ClassLabel(names=names)
        if feature.dtype == "string":
            return dsd.cast_column(self.label_column, target)
        return DatasetDict({k: v.cast_column(self.label_column, target) for k, v in dsd.items()})

    # ---- model ------------------------------------------------------------------------------------------------
    def load_model(self, model_args, id2label: dict):
        from transformers import AutoModelForImageClassification

        from hftl import zeroshot
        from hftl.config import StrategyArgs

        strategy = self.config.strategy if self.config is not None else StrategyArgs()
        path = resolve_model_path(model_args.model, model_args.revision)
        if zeroshot.is_dual_encoder_path(path, model_args):  # CLIP / SigLIP: vision tower + text-initialisable head
            model, processor = zeroshot.load_classifier(path, model_args, id2label, strategy)
        else:
            zeroshot.check_needs_dual_encoder(strategy, model_args.model)
            model, processor = load_model_and_processor(
                AutoModelForImageClassification, model_args, id2label, **_drop_path_kwargs(model_args)
            )
        if self.config is not None and self.config.data.image_size:
            resize_processor(processor, model.config, self.config.data.image_size)
        return model, processor

    def head_modules(self, model) -> list[str]:
        """Every classifier the logits come from: timm's `pretrained_cfg["classifier"]` names them (LeViT's
        `head` and `head_dist`, averaged at eval); for transformers, each layer to `num_labels` outputs outside the
        base model (LeViT's `classifier` and `classifier_distill`); else the last such layer."""
        base = peft_base(model)
        if hasattr(base, "timm_model"):
            named = (getattr(base.timm_model, "pretrained_cfg", None) or {}).get("classifier")
            named = [named] if isinstance(named, str) else list(named or [])
            present = [f"timm_model.{n}" for n in named if _has_module(base, f"timm_model.{n}")]
            if present:
                return present
        else:
            body = getattr(base, base.base_model_prefix, None)
            inside = {id(m) for m in body.modules()} if body is not None else set()
            heads = [
                name
                for name, module in base.named_modules()
                if id(module) not in inside and _is_classifier(module, base.config.num_labels)
            ]
            if heads:
                return heads
        return [last_linear_named(base, base.config.num_labels)]

    def backbone(self, model):
        base = peft_base(model)
        return getattr(base, base.base_model_prefix, None) or base.timm_model

    def lora_targets(self, model) -> list[str]:
        from hftl.lora import derive_targets, usable_preset

        base = peft_base(model)
        heads = self.head_modules(base)
        preset = LORA_TARGETS.get(base.config.model_type, ATTENTION_TARGETS)
        return usable_preset(base, preset, heads) or derive_targets(base, heads)

    # ---- preprocessing ----------------------------------------------------------------------------------------
    def prepare(self, dsd: DatasetDict, processor, data_args, spec=None) -> DatasetDict:
        from torchvision.transforms import v2

        steps = pixel_steps(processor, processor_input_size(processor))
        if steps is None and data_args.augment:
            warnings.warn(
                f"{type(processor).__name__}: its pixel steps are not understood here, so augmented training calls "
                "the image processor itself on each cropped image (slower; the decoded-image cache is off).",
                stacklevel=2,
            )
        crop_and_flip = v2.Compose(_random_crop_and_flip(processor, data_args) + policy_steps(data_args))
        # erasing on the uint8 tensor, as on the decoded path, so both paths draw the same pixels
        erasing = erasing_steps(data_args)
        erase = v2.Compose(erasing) if erasing else (lambda pixels: pixels)
        image_col, label_col = self.image_column, self.label_column
        mixing = mixes(data_args)

        def augmented(image):
            if steps is None:
                return erase(processor_pixels(processor, [crop_and_flip(image)])[0])
            return steps(erase(v2.functional.pil_to_tensor(crop_and_flip(image))))

        def train_batch(batch):
            # train images are decoded here, so one that cannot be read is skipped (a large train split is not
            # checked before training: hftl/image_check.py); its row stays, naming the image (UNREADABLE), so a
            # single row is still a row and the name travels with the data to the training loop
            images = [decode_or_none(item) for item in batch[image_col]]
            good = [i for i, image in enumerate(images) if image is not None]
            readable = [ensure_rgb(images[i]) for i in good]
            if data_args.augment:
                pixels = [augmented(im) for im in readable]
            else:
                pixels = list(processor(readable, return_tensors="pt")["pixel_values"]) if readable else []
            out = {"pixel_values": [None] * len(images), "labels": list(batch[label_col])}
            for i, value in zip(good, pixels):
                out["pixel_values"][i] = value
            if mixing:
                out["mix_seed"] = [draw_mix_seed() if image is not None else None for image in images]
            if len(good) < len(images):
                names = [describe(item) for item in batch[image_col]]
                out[UNREADABLE] = [None if image is not None else name for image, name in zip(images, names)]
            return out

        def eval_batch(batch):
            # the saved image processor is what pipeline() will use, so evaluation uses exactly it
            pixels = processor([ensure_rgb(im) for im in batch[image_col]], return_tensors="pt")["pixel_values"]
            return {"pixel_values": list(pixels), "labels": batch[label_col]}

        out = {split: ds.with_transform(eval_batch) for split, ds in dsd.items() if split != "train"}
        train = dsd["train"].cast_column(image_col, Image(decode=False))
        return DatasetDict({"train": train.with_transform(train_batch), **out})

    def decoded_train_split(self, train, processor, data_args):
        """The train split decoded once and augmented as uint8 tensors (hftl/fastpaths/decoded_images.py), or None
        when it does not fit in --decoded_cache_max_mb or augmentation is off (then the processed-tensor cache serves
        it)."""
        from torchvision.transforms import v2

        from hftl.fastpaths.decoded_images import AugmentedDecodedSplit, crop_min_area, decode_images

        if not data_args.augment:
            return None
        steps = pixel_steps(processor, processor_input_size(processor))
        if steps is None:  # the processor must be called itself (prepare() warns)
            return None
        min_area = crop_min_area(processor_input_size(processor), data_args.crop_scale_min)
        images = decode_images(train, self.image_column, min_area, data_args.decoded_cache_max_mb)
        if images is None:
            return None
        augment = v2.Compose(_random_crop_and_flip(processor, data_args) + item_augmentations(data_args))
        labels = train.with_format("numpy")[self.label_column]  # one array, not a list of Python ints per row
        split = AugmentedDecodedSplit(images, labels, augment, steps)
        return WithMixSeed(split) if mixes(data_args) else split

    @staticmethod
    def deterministic_splits(data_args) -> list[str]:
        """Splits whose preprocessing has no randomness: the runner caches their tensors after the first pass."""
        # mixing draws new pairs every epoch (its seed comes with each item), so a mixed train split is not fixed
        return ["validation"] + ([] if data_args.augment or mixes(data_args) else ["train"])

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        batch = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
        }
        if "pixel_steps" in examples[0]:  # uint8 items (decoded_train_split) say how they become model input
            batch["pixel_steps"] = examples[0]["pixel_steps"]
        return batch

    def train_collate(self, data_args, num_classes: int):
        """`collate`, then MixUp/CutMix (soft labels) when asked for; train batches only."""
        mixer = batch_mixer(data_args, num_classes)
        if mixer is None:
            return self.collate
        return lambda examples: mixer(self.collate(examples), examples[0]["mix_seed"])

    def forward(self, model, batch):
        pixels = batch["pixel_values"]
        if pixels.dtype == torch.uint8:  # from decoded_train_split: its own steps, on the device, per batch
            pixels = batch["pixel_steps"](pixels)
        outputs = model(pixel_values=pixels)
        outputs.loss = F.cross_entropy(outputs.logits.float(), batch["labels"], label_smoothing=self.label_smoothing)
        return outputs

    def new_evaluator(self, id2label: dict, processor=None):
        return ClassificationEvaluator(id2label)


class ClassificationEvaluator:
    def __init__(self, id2label: dict):
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.preds, self.labels = [], []

    def update(self, accelerator, batch, outputs) -> None:
        preds, labels = accelerator.gather_for_metrics((outputs.logits.argmax(-1), batch["labels"]))
        self.preds.append(preds.cpu())
        self.labels.append(labels.cpu())

    def compute(self) -> dict:
        from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_stat_scores

        preds, labels = torch.cat(self.preds), torch.cat(self.labels)
        n = len(self.id2label)
        self.confusion = multiclass_confusion_matrix(preds, labels, num_classes=n)
        # per-class counts from torchmetrics, averaged here in float64: torchmetrics' float32 macro mean reported
        # balanced_accuracy 1.0000001 for a perfect run; no metric may leave its range
        tp, fp, _, fn, _ = multiclass_stat_scores(preds, labels, num_classes=n, average=None).double().unbind(-1)
        seen = (tp + fp + fn) > 0  # torchmetrics' macro rule: a class absent from labels and predictions is skipped

        def macro(numerator, denominator) -> float:
            per_class = torch.where(denominator > 0, numerator / denominator.clamp(min=1), 0.0)
            return min(1.0, float(per_class[seen].mean())) if seen.any() else 0.0

        recall = macro(tp, tp + fn)
        return {
            "accuracy": float((preds == labels).double().mean()),
            "balanced_accuracy": recall,
            "precision_macro": macro(tp, tp + fp),
            "recall_macro": recall,
            "f1_macro": macro(2 * tp, 2 * tp + fp + fn),
            "num_samples": int(labels.numel()),
        }

    def save_artifacts(self, output_dir: str | Path, prefix: str) -> list[Path]:
        """Confusion matrix as JSON (counts, rows = true class) and PNG."""
        from hftl.plotting import pyplot

        plt = pyplot()

        names = [self.id2label[i] for i in range(len(self.id2label))]
        matrix = self.confusion.tolist()
        out = Path(output_dir)
        json_path = out / f"{prefix}_confusion_matrix.json"
        json_path.write_text(json.dumps({"labels": names, "matrix": matrix, "rows": "true", "columns": "predicted"}))
        side = min(12, 2 + 0.5 * len(names))
        fig, ax = plt.subplots(figsize=(side, side))
        ax.imshow(self.confusion.numpy(), cmap="Blues")
        if len(names) <= 30:
            ax.set_xticks(range(len(names)), names, rotation=90)
            ax.set_yticks(range(len(names)), names)
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    if count:
                        ax.text(j, i, count, ha="center", va="center", fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{prefix} confusion matrix")
        fig.tight_layout()
        png_path = out / f"{prefix}_confusion_matrix.png"
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        return [json_path, png_path]


def _random_crop_and_flip(processor, data_args) -> list:
    """The train augmentation both data paths draw (PIL images per epoch, or uint8 tensors decoded once)."""
    from torchvision.transforms import v2

    steps = [train_crop(processor, processor_input_size(processor), data_args.crop_scale_min)]
    return steps + [v2.RandomHorizontalFlip()] if data_args.hflip else steps


def _drop_path_kwargs(model_args) -> dict:
    rate = getattr(model_args, "drop_path_rate", None)
    if rate is None:
        return {}
    from transformers import AutoConfig

    path = resolve_model_path(model_args.model, model_args.revision)
    return drop_path_kwargs(AutoConfig.from_pretrained(path, revision=model_args.revision), rate)


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _is_classifier(module, num_labels: int) -> bool:
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.out_features == num_labels
    return isinstance(module, nn.Conv2d) and module.out_channels == num_labels and module.kernel_size == (1, 1)


def _detect(features, is_kind, names, what: str, option: str) -> str:
    typed = [name for name, f in features.items() if is_kind(f)]
    if len(typed) == 1:
        return typed[0]
    named = [name for name in names if name in features]
    if named:
        return named[0]
    raise ValueError(f"Could not find the {what} column among {list(features)}; name it with {option}.")


TASK = ClassificationTask

"""Semantic segmentation: what differs from the other tasks, and nothing else.

Data: an image column and a mask column (one class id per pixel; `--label_column` names it), from the Hub, a
local folder (`images/` + `masks/` + `id2label.json`), or the bundled synthetic set `hftl/shapes-segmentation`.
Models: any `AutoModelForSemanticSegmentation` checkpoint (SegFormer, UperNet, DPT, BEiT, …) with its head resized
to the labels, or a timm classification model (e.g. the bundled `hftl/efficientnet-lite0`) used as the ImageNet
encoder of a transformers UperNet; either way the output folder loads with `pipeline("image-segmentation")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import DatasetDict

from hftl.bundled import register_dataset
from hftl.data import ROW_COLUMN, add_row_numbers
from hftl.log import get_logger
from hftl.modeling import (
    ensure_rgb,
    processor_input_size,
    processor_interpolation,
    processor_mean_std,
    resize_processor,
    train_crop,
)
from hftl.strategies import peft_base
from hftl.tasks import mask_classification as mc
from hftl.tasks.base import DataSpec, Task
from hftl.tasks.segmentation import data as sd
from hftl.tasks.segmentation.args import SegmentationArgs
from hftl.tasks.segmentation.eval import SegmentationEvaluator

logger = get_logger(__name__)

SHAPES_DATASET = "hftl/shapes-segmentation"
register_dataset(SHAPES_DATASET, "hftl.tasks.segmentation.data:load_shapes_segmentation")

# Class names and label conventions of known datasets, applied only when the user sets neither.
KNOWN_DATASETS = {
    SHAPES_DATASET: {"names": sd.shapes_class_names(), "reduce_labels": False},
    "scene_parse_150": {"id2label": "huggingface/label-files:ade20k-id2label.json", "reduce_labels": True},
    "zhoubolei/scene_parse_150": {"id2label": "huggingface/label-files:ade20k-id2label.json", "reduce_labels": True},
}
# LoRA targets are picked from these suffixes (first tier found in the encoder wins): attention projections for
# transformers, pointwise/bottleneck convolutions for CNNs. A name qualifies only where every module it matches is
# a plain Linear/Conv2d outside the heads; with none, targets are derived from module types (hftl/lora.py).
LORA_TIERS = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("qkv",),
    ("conv_pw", "conv_pwl"),
    ("pwconv1", "pwconv2"),
    ("convolution", "conv1", "conv2", "conv3"),
)
UPERNET_HIDDEN_SIZE = 128  # decode-head width for timm encoders: small enough for CPU, enough for few classes


class SegmentationTask(Task):
    name = "segmentation"
    pipeline_tag = "image-segmentation"
    main_metric = "mean_iou"
    greater_is_better = True

    args = SegmentationArgs

    def __init__(self, config=None):
        super().__init__(config)
        self.ignore_index = int(self.options.ignore_index)
        self.id2label_spec = self.options.id2label
        self.palette_spec = self.options.mask_palette
        self.local_label_file = None
        self.mask_classification = False  # Mask2Former / MaskFormer: class + mask queries, their own loss

    # ---- data -------------------------------------------------------------------------------------------------
    def load_local(self, path: str, data_args) -> DatasetDict:
        from pathlib import Path

        label_file = Path(path) / sd.LABEL_FILE
        if label_file.is_file():
            self.local_label_file = str(label_file)
        palette_file = Path(path) / sd.PALETTE_FILE
        if palette_file.is_file() and not self.palette_spec:
            self.palette_spec = str(palette_file)
        return sd.load_local_folder(path)

    def label_names(self, dsd: DatasetDict, data_args) -> list[str]:
        return self.data_spec(dsd, data_args).label_names

    def data_spec(self, dsd: DatasetDict, data_args) -> DataSpec:
        """Finds the image and mask columns, reads the class names, and checks masks (sizes, ids) row by row; how
        masks become ids (palette, reduce_labels) comes back as the spec's `task_data` (a MaskSpec) for `prepare`.
        No per-image class label: few-shot sampling does not apply."""
        train = dsd["train"]
        image_column, mask_column = sd.detect_columns(train.features, data_args.image_column, data_args.label_column)
        known = KNOWN_DATASETS.get(data_args.dataset, {})
        reduce_labels = self.options.reduce_labels
        if reduce_labels is None:
            reduce_labels = bool(known.get("reduce_labels", False))
            if reduce_labels:
                logger.info(f"{data_args.dataset}: reduce_labels=True (its convention; set --reduce_labels).")
        label_file = self.id2label_spec or self.local_label_file or known.get("id2label")
        palette = sd.read_palette(self.palette_spec, []) if self.palette_spec and not label_file else None
        if label_file:
            names = sd.read_label_file(label_file)
        elif "names" in known:
            names = list(known["names"])
        else:
            top = max(sd.scan_max_id(ds, mask_column, palette, sd.EAGER_CHECK_ROWS) for ds in dsd.values())
            if reduce_labels:
                top -= 1
            names = [str(i) for i in range(top + 1)]
            logger.info(
                f"No label file: classes named by id, 0..{top}. Name them with --id2label file.json (or "
                "repo_id:file.json in a Hub dataset repo)."
            )
        if len(names) < 2:
            raise ValueError(f"Segmentation needs at least 2 classes; the labels are {names}.")
        masks = sd.MaskSpec(
            mask_column, sd.read_palette(self.palette_spec, names), len(names), reduce_labels, self.ignore_index
        )
        for split, ds in dsd.items():
            sd.check_split(ds, split, image_column, masks)
        return DataSpec(list(names), image_column, None, masks)

    def encode_labels(self, dsd: DatasetDict, names: list[str]) -> DatasetDict:
        # rows keep their original number through subsampling, so errors found during training name them
        return add_row_numbers(dsd)

    # ---- model ------------------------------------------------------------------------------------------------
    def load_model(self, model_args, id2label: dict):
        from transformers import AutoConfig, AutoModelForSemanticSegmentation

        from hftl.modeling import load_model_and_processor, resolve_model_path

        path = resolve_model_path(model_args.model, model_args.revision)
        config = AutoConfig.from_pretrained(
            path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code
        )
        if mc.is_mask_classification(config):
            self.mask_classification = True
            image_size = self.config.data.image_size if self.config is not None else None
            if image_size:
                mc.check_image_size(image_size)
            model, processor = mc.load_universal(model_args, id2label, image_size)
            model.config.hftl_subtask = "semantic"  # pipeline()'s default for these models is panoptic
        elif config.model_type == "timm_wrapper":
            from hftl.tasks.segmentation.models import upernet_from_timm

            model, processor = upernet_from_timm(path, config, id2label, UPERNET_HIDDEN_SIZE, self.ignore_index)
        else:
            try:
                model, processor = load_model_and_processor(AutoModelForSemanticSegmentation, model_args, id2label)
            except ValueError as error:
                if "Unrecognized configuration class" not in str(error):
                    raise
                raise ValueError(
                    f"{model_args.model!r} ({config.model_type}) is not a semantic-segmentation architecture. Use a "
                    "SegFormer/UperNet/DPT/BEiT/Mask2Former/MaskFormer checkpoint (e.g. nvidia/mit-b0) or a timm "
                    "model (UperNet encoder)."
                ) from None
        for attribute in ("semantic_loss_ignore_index", "loss_ignore_index"):
            if hasattr(model.config, attribute):
                setattr(model.config, attribute, self.ignore_index)
        if hasattr(processor, "do_reduce_labels"):
            processor.do_reduce_labels = False  # labels are reduced by the task's transforms, by option
        if self.config is not None and self.config.data.image_size and not self.mask_classification:
            resize_processor(processor, model.config, self.config.data.image_size)
        return model, processor

    def backbone(self, model):
        if self.mask_classification:
            return mc.backbone(model)
        base = peft_base(model)
        return getattr(base, "backbone", None) or getattr(base, base.base_model_prefix)

    def head_modules(self, model) -> list[str]:
        """Every top-level part that is not the encoder: decode head, auxiliary head, neck."""
        if self.mask_classification:
            return mc.head_modules(model)
        base = peft_base(model)
        encoder = self.backbone(base)
        return [
            name
            for name, child in base.named_children()
            if child is not encoder and any(True for _ in child.parameters())
        ]

    def lora_targets(self, model) -> list[str]:
        if self.mask_classification:
            return mc.lora_targets(model)
        from hftl.lora import derive_targets, usable_preset

        base = peft_base(model)
        heads = self.head_modules(base)
        for tier in LORA_TIERS:
            found = usable_preset(base, tier, heads)
            if found:
                return found
        return derive_targets(base, heads, body=self.backbone(base))

    # ---- preprocessing ----------------------------------------------------------------------------------------
    def prepare(self, dsd: DatasetDict, processor, data_args, spec: DataSpec | None = None) -> DatasetDict:
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        size = processor_input_size(processor)
        mean, std = processor_mean_std(processor)
        # Geometric steps see the image and its mask together: the same crop and flip; the image resized as the saved
        # processor (evaluation, pipeline()) resizes it, the mask by nearest neighbour.
        geometric = [train_crop(processor, size, data_args.crop_scale_min)]
        if data_args.hflip:
            geometric.append(v2.RandomHorizontalFlip())
        to_model = [
            v2.ToDtype(dtype={tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean, std),
        ]
        augment = v2.Compose(geometric + to_model)
        plain = v2.Compose([v2.Resize((size, size), processor_interpolation(processor), antialias=True)] + to_model)
        assert spec is not None and isinstance(spec.task_data, sd.MaskSpec), "prepare needs data_spec()'s DataSpec"
        masks = spec.task_data
        image_col, mask_col = spec.image_column, masks.mask_column

        def pairs(batch, split):
            rows = batch.get(ROW_COLUMN) or [None] * len(batch[image_col])
            for image, mask, row in zip(batch[image_col], batch[mask_col], rows):
                where = f"{split} split, row {row}"
                image, mask = sd.to_pil(image), sd.to_pil(mask)
                sd.check_pair(image, mask, where)
                yield ensure_rgb(image), torch.from_numpy(masks.to_ids(mask, where))

        def train_batch(batch, split="train"):
            pixels, labels = [], []
            for image, ids in pairs(batch, split):
                image_tv = tv_tensors.Image(torch.from_numpy(_hwc(image)).permute(2, 0, 1))
                x, y = (augment if data_args.augment else plain)(image_tv, tv_tensors.Mask(ids))
                pixels.append(x.as_subclass(torch.Tensor))
                labels.append(y.as_subclass(torch.Tensor))
            return {"pixel_values": pixels, "labels": labels}

        def eval_batch(batch, split):
            # the saved image processor is what pipeline() will use, so evaluation uses exactly it; labels stay
            # at full resolution and predictions are upsampled to them
            images, labels = zip(*pairs(batch, split)) if len(batch[image_col]) else ((), ())
            pixels = processor(list(images), return_tensors="pt")["pixel_values"]
            return {"pixel_values": list(pixels), "labels": list(labels)}

        return DatasetDict(
            {
                split: ds.with_transform(train_batch if split == "train" else (lambda b, s=split: eval_batch(b, s)))
                for split, ds in dsd.items()
            }
        )

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        labels = [e["labels"] for e in examples]
        if len({tuple(label.shape) for label in labels}) == 1:
            labels = torch.stack(labels)
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "labels": labels}

    def forward(self, model, batch):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        if self.mask_classification:
            return mask_classification_forward(model, pixel_values, labels, self.ignore_index)
        if isinstance(labels, torch.Tensor) and labels.shape[-2:] == pixel_values.shape[-2:]:
            # the model's own loss also trains auxiliary heads (UperNet, BEiT, DPT), which DDP needs to see used
            return model(pixel_values=pixel_values, labels=labels)
        outputs = model(pixel_values=pixel_values)
        outputs.loss = full_resolution_loss(outputs.logits, list(labels), self.ignore_index)
        return outputs

    def new_evaluator(self, id2label: dict, processor=None):
        mean_std = processor_mean_std(processor) if processor is not None else ()
        return SegmentationEvaluator(id2label, self.ignore_index, *mean_std)


def mask_classification_forward(model, pixel_values: torch.Tensor, labels, ignore_index: int):
    """The model's own loss on one binary mask per class present; `.logits` holds per-class scores for metrics."""
    size = pixel_values.shape[-2:]
    mask_labels, class_labels = [], []
    for label in labels:
        if label.shape[-2:] != size:  # evaluation keeps labels at full resolution
            label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        masks, classes = mc.semantic_targets(label, ignore_index)
        mask_labels.append(masks.to(pixel_values.dtype))
        class_labels.append(classes)
    outputs = model(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    outputs.logits = mc.semantic_scores(outputs)
    return outputs


def full_resolution_loss(logits: torch.Tensor, labels: list[torch.Tensor], ignore_index: int) -> torch.Tensor:
    """Pixel-averaged cross-entropy with each image's logits upsampled to its label's size."""
    total, counted = logits.new_zeros((), dtype=torch.float32), 0
    for i, label in enumerate(labels):
        upsampled = F.interpolate(
            logits[i : i + 1].float(), size=label.shape[-2:], mode="bilinear", align_corners=False
        )
        total = total + F.cross_entropy(upsampled, label[None], ignore_index=ignore_index, reduction="sum")
        counted += int((label != ignore_index).sum())
    return total / max(counted, 1)


def _hwc(image):
    import numpy as np

    return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy shares memory


TASK = SegmentationTask

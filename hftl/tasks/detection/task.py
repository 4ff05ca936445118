"""Object detection: what differs from the other tasks, and nothing else.

Data: an image column and an `objects` column (`{"bbox": [[x, y, w, h], ...], "category": [...]}`, COCO boxes in
pixels) from the Hub (cppe-5 and the transformers examples' sets), a local COCO folder (`annotations.json` + images),
or the bundled synthetic set `hftl/shapes-detection`. Models: any `AutoModelForObjectDetection` checkpoint (DETR,
Conditional DETR, Deformable DETR, RT-DETR, YOLOS, …) with its class head resized to the labels, or a timm
classifier (e.g. the bundled `hftl/efficientnet-lite0`) whose ImageNet weights become the backbone of a fresh
Conditional DETR. The output folder loads with `pipeline("object-detection")`.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
from datasets import DatasetDict

from hftl.bundled import register_dataset
from hftl.data import ROW_COLUMN, add_row_numbers
from hftl.log import get_logger
from hftl.modeling import ensure_rgb, processor_mean_std
from hftl.strategies import peft_base
from hftl.tasks.base import Task
from hftl.tasks.detection import data as dd
from hftl.tasks.detection.args import DetectionArgs
from hftl.tasks.detection.eval import DetectionEvaluator

logger = get_logger(__name__)


SHAPES_DATASET = "hftl/shapes-detection"
register_dataset(SHAPES_DATASET, "hftl.tasks.detection.data:load_shapes_detection")

# LoRA targets: the first tier whose names exist outside the heads wins. Attention projections in DETR,
# Conditional DETR, RT-DETR (q/v_proj); YOLOS (ViT query/value); Deformable attention's value/output projections.
# With none, targets are derived from module types (hftl/lora.py).
LORA_TIERS = (("q_proj", "v_proj"), ("query", "value"), ("value_proj", "output_proj"), ("qkv",))


class DetectionTask(Task):
    name = "detection"
    pipeline_tag = "object-detection"
    main_metric = "map_50"
    greater_is_better = True

    args = DetectionArgs

    def __init__(self, config=None):
        super().__init__(config)
        self.box_format = self.options.box_format
        self.image_column = None
        self.objects_column = None
        self.label_column = None  # no per-image class: few-shot sampling does not apply
        self.dropped_boxes = 0

    # ---- data -------------------------------------------------------------------------------------------------
    def load_local(self, path: str, data_args) -> DatasetDict:
        return dd.load_coco_folder(path)

    def label_names(self, dsd: DatasetDict, data_args) -> list[str]:
        """Finds the image and objects columns, reads the class names and checks every row's boxes and classes."""
        features = dsd["train"].features
        self.image_column, self.objects_column = dd.detect_columns(
            features, data_args.image_column, data_args.label_column
        )
        names = dd.category_names(features, self.objects_column, dsd)
        for split, ds in dsd.items():
            if self.objects_column not in ds.column_names:
                raise ValueError(f"The {split} split has no {self.objects_column!r} column; it has {ds.column_names}.")
            stats = dd.check_split(ds, split, self.image_column, self.objects_column, len(names), self.box_format)
            notes = []
            if stats["clipped"]:
                notes.append(f"{stats['clipped']} box(es) reach outside their image and will be clipped")
            if stats["empty_images"]:
                notes.append(f"{stats['empty_images']} image(s) without objects are kept as negatives")
            if notes:
                logger.info(f"{split}: " + "; ".join(notes) + ".")
        return names

    def encode_labels(self, dsd: DatasetDict, names: list[str]) -> DatasetDict:
        return add_row_numbers(dsd)

    # ---- model ------------------------------------------------------------------------------------------------
    def load_model(self, model_args, id2label: dict):
        from transformers import AutoConfig, AutoModelForObjectDetection

        from hftl.modeling import load_model_and_processor, resolve_model_path

        path = resolve_model_path(model_args.model, model_args.revision)
        common = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(path, **common)
        except (OSError, ValueError):
            config = None  # load_model_and_processor raises the explanatory error
        image_size = self.config.data.image_size if self.config is not None else None
        if config is not None and config.model_type == "timm_wrapper":
            from hftl.tasks.detection.models import detector_from_timm

            model, processor = detector_from_timm(path, config, id2label, image_size)
        else:
            try:
                model, processor = load_model_and_processor(AutoModelForObjectDetection, model_args, id2label)
            except ValueError as error:
                if "Unrecognized configuration class" not in str(error):
                    raise
                raise ValueError(
                    f"{model_args.model!r} is not an object-detection architecture. Use a DETR-family / YOLOS "
                    "checkpoint (e.g. facebook/detr-resnet-50) or a timm classifier (used as the backbone)."
                ) from None
            if image_size:
                set_processor_size(processor, image_size)
        mark_backbone_offline(model.config)
        return model, processor

    def backbone(self, model):
        base = peft_base(model)
        inner = getattr(base, base.base_model_prefix)
        return getattr(inner, "backbone", None) or inner  # YOLOS: the whole ViT is the backbone

    def head_modules(self, model) -> list[str]:
        """Class and box heads, found from the model's structure: every top-level part besides the base model
        (DETR, Conditional/Deformable/DAB-DETR, YOLOS, D-FINE), plus the label-sized predictors inside it
        (RT-DETR / D-FINE's per-decoder-layer `class_embed`, `enc_score_head`, `denoising_class_embed`) and the
        box predictors laid out like them. A head shared under two names is listed once."""
        base = peft_base(model)
        inner = getattr(base, base.base_model_prefix)
        # inner predictors first: where a top-level head is an alias of one the decoder uses (D-FINE ties its
        # class_embed / bbox_embed to model.decoder.*), the one the forward pass runs is the one to train and wrap
        heads = [f"{base.base_model_prefix}.{name}" for name in predictor_modules(inner, base.config)]
        heads += [name for name, child in base.named_children() if child is not inner and _has_parameters(child)]
        seen, unique = set(), []
        for name in heads:
            params = frozenset(id(p) for p in base.get_submodule(name).parameters())
            if params not in seen and not any(name.startswith(h + ".") for h in unique):
                seen.add(params)
                unique.append(name)
        return sorted(unique)

    def lora_targets(self, model) -> list[str]:
        from hftl.lora import derive_targets, usable_preset

        base = peft_base(model)
        heads = self.head_modules(base)
        for tier in LORA_TIERS:
            found = usable_preset(base, tier, heads)
            if found:
                return found
        return derive_targets(base, heads)

    # ---- preprocessing ----------------------------------------------------------------------------------------
    def prepare(self, dsd: DatasetDict, processor, data_args, spec=None) -> DatasetDict:
        augment = box_augmentation(data_args) if data_args.augment else None
        image_col, objects_col = self.image_column, self.objects_column

        def transform(batch, train: bool):
            ids = batch["image_id"] if "image_id" in batch else batch[ROW_COLUMN]
            out = {"pixel_values": [], "labels": [], "targets": [], "orig_size": [], "image_id": []}
            for image, objects, image_id in zip(batch[image_col], batch[objects_col], ids):
                image = ensure_rgb(image)
                width, height = image.size
                boxes, classes, dropped = dd.clean_boxes(objects, self.box_format, width, height)
                target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(classes)}
                if train and augment is not None:
                    image, boxes, classes, dropped_now = apply_box_augmentation(augment, image, boxes, classes)
                    dropped += dropped_now
                if dropped:
                    self._count_dropped(dropped)
                pixel_values, labels = encode(processor, image, boxes, classes, int(image_id))
                out["pixel_values"].append(pixel_values)
                out["labels"].append(labels)
                out["targets"].append(target)
                out["orig_size"].append((height, width))
                out["image_id"].append(int(image_id))
            return out

        return DatasetDict(
            {
                split: ds.with_transform(lambda batch, train=(split == "train"): transform(batch, train))
                for split, ds in dsd.items()
            }
        )

    def _count_dropped(self, count: int) -> None:
        before = self.dropped_boxes
        self.dropped_boxes += count
        if before == 0 or len(str(self.dropped_boxes)) > len(str(before)):  # first time, then each power of ten
            logger.warning(
                "%d degenerate box(es) dropped so far (clipped to nothing or augmented off the image).",
                self.dropped_boxes,
            )

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        """Pads images to the batch's largest (bottom/right) with a pixel mask; boxes stay relative to each
        unpadded image, the convention the pipeline's single-image inference matches."""
        heights = [e["pixel_values"].shape[1] for e in examples]
        widths = [e["pixel_values"].shape[2] for e in examples]
        pixels = torch.zeros(len(examples), 3, max(heights), max(widths))
        mask = torch.zeros(len(examples), max(heights), max(widths), dtype=torch.long)
        for i, e in enumerate(examples):
            pixels[i, :, : heights[i], : widths[i]] = e["pixel_values"]
            mask[i, : heights[i], : widths[i]] = 1
        return {
            "pixel_values": pixels,
            "pixel_mask": mask,
            "labels": [e["labels"] for e in examples],
            "targets": [e["targets"] for e in examples],
            "orig_sizes": torch.tensor([e["orig_size"] for e in examples], dtype=torch.long),
            "image_ids": [e["image_id"] for e in examples],
        }

    def forward(self, model, batch):
        inputs = {"pixel_values": batch["pixel_values"], "labels": batch["labels"]}
        if takes_pixel_mask(model):
            inputs["pixel_mask"] = batch["pixel_mask"]
        return model(**inputs)

    def new_evaluator(self, id2label: dict, processor=None):
        return DetectionEvaluator(id2label, processor, *processor_mean_std(processor))


# ---- processor and config helpers ----------------------------------------------------------------------------------
def encode(processor, image, boxes: np.ndarray, classes: np.ndarray, image_id: int):
    """The image processor's own resize, normalisation and COCO box conversion."""
    annotations = [
        {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": int(c), "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        for (x0, y0, x1, y1), c in zip(np.asarray(boxes, np.float64).tolist(), classes.tolist())
    ]
    encoded = processor(
        images=image, annotations={"image_id": image_id, "annotations": annotations}, return_tensors="pt"
    )
    label = encoded["labels"][0]
    return encoded["pixel_values"][0], {"class_labels": label["class_labels"], "boxes": label["boxes"]}


def takes_pixel_mask(model) -> bool:
    """Whether the detector's forward reads a pixel mask (DETR family) or not (YOLOS), looked through the DDP,
    compile and PEFT wrappers the trainer may have put around it."""
    from accelerate.utils import extract_model_from_parallel

    return _forward_takes(type(peft_base(extract_model_from_parallel(model))), "pixel_mask")


@functools.cache
def _forward_takes(model_class: type, name: str) -> bool:
    return name in inspect.signature(model_class.forward).parameters


def set_processor_size(processor, size: int) -> None:
    """Longest side `size`, aspect kept (fixed square for processors that only know height/width)."""
    if "height" in (processor.size or {}):
        processor.size = {"height": size, "width": size}
    else:
        processor.size = {"shortest_edge": size, "longest_edge": size}


def mark_backbone_offline(config) -> None:
    """The saved config must never ask a hub for backbone weights: they are in the checkpoint."""
    for holder in (config, getattr(config, "backbone_config", None)):
        if holder is not None and getattr(holder, "use_pretrained_backbone", False):
            holder.use_pretrained_backbone = False


# ---- augmentation ------------------------------------------------------------------------------------------------
def box_augmentation(data_args):
    """Photometric distortion, horizontal flip and scale jitter (with a small shift); boxes move with the pixels,
    are clipped to the image, and those left degenerate are dropped."""
    from torchvision.transforms import v2

    low = max(0.3, data_args.crop_scale_min**0.5)
    steps = [v2.RandomPhotometricDistort(p=0.5)]
    if data_args.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(low, 1 / low)),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1),
    ]
    return v2.Compose(steps)


def apply_box_augmentation(augment, image, boxes: np.ndarray, classes: np.ndarray, extra: dict | None = None):
    """Returns (image tensor CHW uint8, xyxy boxes, classes, number of boxes dropped); with `extra` (more
    tv_tensors, e.g. masks, transformed alongside) a fifth item holds them transformed."""
    from torchvision import tv_tensors

    pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous())
    sample = {
        "image": pixels,
        "boxes": tv_tensors.BoundingBoxes(
            torch.as_tensor(boxes).reshape(-1, 4), format="XYXY", canvas_size=tuple(pixels.shape[-2:])
        ),
        "labels": torch.as_tensor(classes, dtype=torch.long),
        **(extra or {}),
    }
    out = augment(sample)
    kept = out["boxes"].as_subclass(torch.Tensor).numpy().astype(np.float32)
    result = (out["image"].as_subclass(torch.Tensor), kept, out["labels"].numpy(), len(boxes) - len(kept))
    return result + ({k: out[k] for k in extra},) if extra else result


def _has_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def predictor_modules(root: torch.nn.Module, config) -> list[str]:
    """Label-sized predictors under `root` (Linear to `num_labels` outputs, the denoising label Embedding with
    `num_labels + 1` rows) outside its backbone, each taken whole with its ModuleList when it is one per decoder
    layer; then the box predictors laid out the same way beside them (an all-Linear MLP, or a ModuleList of them
    of the same length, whose output is a multiple of 4)."""
    nn = torch.nn
    num_labels = config.num_labels
    width = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
    backbone = getattr(root, "backbone", None)
    skip = {id(m) for m in backbone.modules()} if backbone is not None else set()
    modules = dict(root.named_modules())
    units: list[str] = []
    for name, module in modules.items():
        if id(module) in skip or not name:
            continue
        is_label = (
            isinstance(module, nn.Linear)
            and module.out_features == num_labels
            and module.in_features != module.out_features
            and module.out_features != width
        ) or (isinstance(module, nn.Embedding) and module.num_embeddings in (num_labels, num_labels + 1))
        if not is_label:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        unit = parent if isinstance(modules.get(parent), nn.ModuleList) else name
        if unit not in units:
            units.append(unit)
    for unit in list(units):
        parent_name = unit.rsplit(".", 1)[0] if "." in unit else ""
        parent, like = modules[parent_name], modules[unit]
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full in units or id(child) in skip:
                continue
            if isinstance(like, nn.ModuleList):
                fits = isinstance(child, nn.ModuleList) and len(child) == len(like) and all(map(_box_mlp, child))
            else:
                fits = not isinstance(child, nn.ModuleList) and _box_mlp(child)
            if fits:
                units.append(full)
    return units


def _box_mlp(module: torch.nn.Module) -> bool:
    layers = [m for m in module.modules() if _has_parameters(m) and not any(True for _ in m.children())]
    return bool(layers) and all(isinstance(m, torch.nn.Linear) for m in layers) and layers[-1].out_features % 4 == 0


TASK = DetectionTask

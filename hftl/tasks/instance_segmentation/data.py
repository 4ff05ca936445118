"""Instance-segmentation data: per-instance masks from COCO annotations or two-channel PNGs, checks, bundled set.

Two row layouts are read, from the Hub or a local folder:
- COCO: an `objects` column `{"segmentation": [...], "category": [...], "iscrowd": [...]}` where each segmentation
  is a polygon list, an RLE dict (compressed or not), either as a JSON string, or a binary mask image of its own
  (`{"mask": [Image, ...], "category": [...]}`, as Hub sets with one mask image per instance store them; any
  non-zero pixel is the instance); a local folder holds `annotations.json` (+ images), or one per split folder
  (train/, valid/, test/), as for detection.
- Two-channel PNG (the transformers instance-segmentation example's format): an `annotation` image whose first
  channel is the class id + 1 (0: no instance) and whose second channel is the instance id (0: none).
Every row decodes to (masks (k, H, W) bool, classes (k,), crowd (k,) bool). Rows without instances are kept as
negatives. Errors name the split and row, before any model loads.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from hftl.data import IMAGE_COLUMN_NAMES
from hftl.log import get_logger
from hftl.synthetic import SHAPE_CLASSES, make_shapes
from hftl.tasks.detection import data as detection_data

logger = get_logger(__name__)

OBJECTS_COLUMN_NAMES = ("objects", "annotations", "segments")
ANNOTATION_COLUMN_NAMES = ("annotation", "instance_mask", "label", "mask")
SEGMENTATION_KEYS = ("segmentation", "segmentations", "mask", "masks")
CATEGORY_KEYS = ("category", "category_id", "categories", "label", "labels", "class")
EAGER_CHECK_ROWS = 500  # rows per split decoded and checked before training; the rest as they load

SHAPES_DATASET = "hftl/shapes-instances"
SHAPES_SPLITS = (("train", 480), ("validation", 60), ("test", 100))
SHAPES_SEEDS = {"train": 20, "validation": 21, "test": 22}
SHAPES_IMAGE_SIZE = 96
SHAPES_OVERLAP = 0.3  # same-class shapes touch or overlap: what makes it instance, not semantic, segmentation


# ---- layouts -----------------------------------------------------------------------------------------------------
def detect_layout(features, image_column: str | None, label_column: str | None) -> tuple[str, str, str]:
    """(image column, label column, layout "coco" | "two_channel")."""
    images = [n for n, f in features.items() if isinstance(f, ImageFeature)]
    image = image_column or next((n for n in IMAGE_COLUMN_NAMES if n in images), images[0] if images else None)
    if image is None or image not in features:
        raise ValueError(f"No image column found among {list(features)}; name it with --image_column.")
    label = label_column or next((n for n in OBJECTS_COLUMN_NAMES if n in features and n != image), None)
    label = label or next((n for n in ANNOTATION_COLUMN_NAMES if n in images and n != image), None)
    if label is None or label not in features:
        raise ValueError(
            f"No instance annotations among {list(features)}: rows need an 'objects' column "
            '({"segmentation": [polygons | RLE], "category": [...]}) or a two-channel "annotation" image '
            "(class id + 1, instance id); name it with --label_column."
        )
    if isinstance(features[label], ImageFeature):
        return image, label, "two_channel"
    fields = _inner(features[label])
    if not any(k in fields for k in SEGMENTATION_KEYS) or not any(k in fields for k in CATEGORY_KEYS):
        raise ValueError(
            f"Column {label!r} has fields {sorted(fields)}; instance segmentation needs a 'segmentation' (polygons, "
            "RLE, or a 'mask' list of one binary mask image per instance) and a 'category' field per instance."
        )
    return image, label, "coco"


def _inner(feature) -> dict:
    feature = getattr(feature, "feature", feature)  # List({...}) → {...}
    return dict(feature) if isinstance(feature, dict) else {}


def category_names(features, label_column: str, layout: str, dsd: DatasetDict, id2label: list | None) -> list[str]:
    """Class names: --id2label, else the category ClassLabel, else ids 0..max seen in the first rows."""
    if id2label:
        return list(id2label)
    if layout == "coco":
        fields = _inner(features[label_column])
        category = (
            features[label_column][_key(fields, CATEGORY_KEYS)] if isinstance(features[label_column], dict) else None
        )
        category = getattr(category, "feature", category)
        if isinstance(category, ClassLabel):
            return list(category.names)
    top = -1
    for ds in dsd.values():
        for i in range(min(len(ds), EAGER_CHECK_ROWS)):
            row = ds[i]
            classes = _classes_only(row, label_column, layout)
            top = max([top, *classes])
    logger.info(f"No class names: classes named by id, 0..{max(top, 0)}. Name them with --id2label file.json.")
    return [str(i) for i in range(max(top, 0) + 1)]


def _classes_only(row, label_column: str, layout: str) -> list[int]:
    if layout == "coco":
        objects = _as_columns(row[label_column])
        return [int(c) for c in objects[_key(objects, CATEGORY_KEYS)]] if objects else []
    array = np.asarray(row[label_column])
    return [int(c) - 1 for c in np.unique(array[..., 0]) if c > 0] if array.ndim == 3 else []


def _key(mapping, keys) -> str:
    return next(k for k in keys if k in mapping)


def _as_columns(objects) -> dict:
    """Instances as {field: [per instance]}: a `List({...})` feature decodes to a list of dicts instead."""
    if isinstance(objects, list):
        return {k: [o[k] for o in objects] for k in objects[0]} if objects else {}
    return objects or {}


# ---- decoding ----------------------------------------------------------------------------------------------------
def decode_instances(row, image_size: tuple[int, int], label_column: str, layout: str, num_labels: int, where: str):
    """(masks (k, H, W) bool, classes (k,) int64, crowd (k,) bool) for one row; `image_size` is (width, height)."""
    width, height = image_size
    if layout == "two_channel":
        masks, classes = _from_two_channel(row[label_column], (width, height), where)
        crowd = np.zeros(len(classes), bool)
    else:
        objects = _as_columns(row[label_column])
        segs = objects.get(_key(objects, SEGMENTATION_KEYS), []) if objects else []
        classes = np.asarray(objects.get(_key(objects, CATEGORY_KEYS), []) if objects else [], np.int64)
        crowd = np.asarray(objects.get("iscrowd") or [0] * len(classes), bool)
        if len(segs) != len(classes):
            raise ValueError(f"{where}: {len(segs)} segmentations but {len(classes)} categories.")
        decoded = [segmentation_to_mask(s, height, width, f"{where}, instance {i}") for i, s in enumerate(segs)]
        masks = np.stack(decoded) if decoded else np.zeros((0, height, width), bool)
    bad = [int(c) for c in classes if not 0 <= c < num_labels]
    if bad:
        top = num_labels - 1
        raise ValueError(
            f"{where}: category ids {sorted(set(bad))[:10]} are outside the {num_labels} classes (0..{top})."
        )
    return masks, classes, crowd


def segmentation_to_mask(segmentation, height: int, width: int, where: str) -> np.ndarray:
    """One COCO segmentation (polygons, RLE dict, either as JSON, or a mask image) → (H, W) bool."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, Image.Image | np.ndarray):
        array = np.asarray(segmentation)
        array = array if array.ndim == 2 else array.max(axis=-1)  # an RGB(A) mask: any non-zero channel
        if array.shape != (height, width):
            raise ValueError(
                f"{where}: mask image size {array.shape[1]}×{array.shape[0]} differs from the image's "
                f"{width}×{height}; a mask must cover its image pixel for pixel."
            )
        return array > 0
    if isinstance(segmentation, str):
        segmentation = json.loads(segmentation)
    if isinstance(segmentation, dict):
        size = [int(v) for v in segmentation.get("size", [])]
        if size != [height, width]:
            raise ValueError(
                f"{where}: RLE mask size {size[1:2] + size[:1]} (width, height) differs from the image's "
                f"{[width, height]}; a mask must cover its image pixel for pixel."
            )
        counts = segmentation["counts"]
        rle = segmentation if isinstance(counts, str | bytes) else mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(rle.get("counts"), str):
            rle = {"size": size, "counts": rle["counts"].encode()}
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation, list) and segmentation and not isinstance(segmentation[0], list):
        segmentation = [segmentation]  # one flat polygon
    polygons = [list(map(float, p)) for p in segmentation or [] if len(p) >= 6]
    if not polygons:
        raise ValueError(f"{where}: the segmentation holds no polygon with 3 or more points: {str(segmentation)[:80]}")
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)


def mask_to_rle(mask: np.ndarray) -> dict:
    """(H, W) bool → COCO compressed RLE with a str `counts` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def _from_two_channel(annotation, image_size: tuple[int, int], where: str):
    array = np.asarray(annotation)
    if array.ndim != 3 or array.shape[2] < 2:
        raise ValueError(
            f"{where}: the annotation image has shape {array.shape}; it needs two channels: class id + 1 and "
            "instance id (an RGB PNG with R = class + 1, G = instance id)."
        )
    if (array.shape[1], array.shape[0]) != tuple(image_size):
        raise ValueError(
            f"{where}: annotation size {array.shape[1]}×{array.shape[0]} differs from the image's "
            f"{image_size[0]}×{image_size[1]}; a mask must cover its image pixel for pixel."
        )
    classes_map, instances = array[..., 0].astype(np.int64), array[..., 1].astype(np.int64)
    masks, classes = [], []
    for instance in np.unique(instances[instances > 0]):
        pixels = instances == instance
        values = np.unique(classes_map[pixels])
        values = values[values > 0]
        if len(values) != 1:
            raise ValueError(f"{where}: instance {instance} has class values {values.tolist()}; it needs one (>0).")
        masks.append(pixels)
        classes.append(int(values[0]) - 1)
    height, width = array.shape[:2]
    return (np.stack(masks) if masks else np.zeros((0, height, width), bool)), np.asarray(classes, np.int64)


def check_split(ds: Dataset, split: str, image_column: str, label_column: str, layout: str, num_labels: int) -> int:
    """Decodes the first EAGER_CHECK_ROWS rows; returns how many have no instance (kept as negatives)."""
    empty = 0
    for i in range(min(len(ds), EAGER_CHECK_ROWS)):
        row = ds[i]
        where = f"{split} split, row {i}"
        if row[image_column] is None:
            raise ValueError(f"{where}: the image is missing.")
        masks, _, _ = decode_instances(row, row[image_column].size, label_column, layout, num_labels, where)
        empty += len(masks) == 0
    return empty


# ---- local COCO folders ------------------------------------------------------------------------------------------
def instance_features(names) -> Features:
    return Features(
        {
            "image": ImageFeature(),
            "image_id": Value("int64"),
            "objects": {
                "segmentation": List(Value("string")),  # JSON: polygons and RLE dicts share one column
                "category": List(ClassLabel(names=list(names))),
                "iscrowd": List(Value("int8")),
            },
        }
    )


def load_coco_folder(path: str | Path) -> DatasetDict:
    """`path/annotations.json` (+ images), or one such folder per split (`train/`, `valid/`, `test/`)."""
    return detection_data.load_coco_folder(path, read=coco_json_to_dataset)


def _check_segmentation(ann: dict, where: str) -> None:
    if "segmentation" not in ann:
        raise ValueError(f"{where} has no 'segmentation' (polygons or RLE); this is a boxes-only file.")


def coco_json_to_dataset(json_path: str | Path) -> Dataset:
    """A COCO instances file → rows; categories become class ids 0..K-1 in id order; images without annotations
    are kept."""
    names, class_of, entries = detection_data.read_coco(json_path, "instances", check=_check_segmentation)
    rows = {"image": [], "image_id": [], "objects": []}
    for image_id, _, file, anns in entries:
        rows["image"].append(str(file))
        rows["image_id"].append(int(image_id))
        rows["objects"].append(
            {
                "segmentation": [json.dumps(a["segmentation"]) for a in anns],
                "category": [class_of[a["category_id"]] for a in anns],
                "iscrowd": [int(a.get("iscrowd", 0)) for a in anns],
            }
        )
    return Dataset.from_dict(rows, features=instance_features(names))


# ---- the bundled synthetic set -----------------------------------------------------------------------------------
def two_channel_annotation(instance_masks: np.ndarray, labels: np.ndarray) -> Image.Image:
    """(k, H, W) non-overlapping masks → RGB PNG: R = class + 1, G = instance id (1..k), B = 0."""
    height, width = instance_masks.shape[1:] if instance_masks.ndim == 3 else (0, 0)
    array = np.zeros((height, width, 3), np.uint8)
    for k, (pixels, label) in enumerate(zip(instance_masks, labels), start=1):
        array[pixels, 0] = int(label) + 1
        array[pixels, 1] = k
    return Image.fromarray(array)


@lru_cache(maxsize=2)  # generated once per process: datasets are immutable, so sharing them is safe
def load_shapes_instances(size: int = SHAPES_IMAGE_SIZE, split_sizes: tuple = SHAPES_SPLITS) -> DatasetDict:
    """`hftl/shapes-instances`: seeded shapes (hftl.synthetic) where same-class shapes touch and overlap, stored
    in the two-channel annotation layout."""
    features = Features({"image": ImageFeature(), "annotation": ImageFeature()})
    splits = {}
    for split, count in split_sizes:
        samples = make_shapes(count, size, SHAPES_SEEDS.get(split, 23), max_shapes=4, overlap=SHAPES_OVERLAP)
        data = {
            "image": [s.image for s in samples],
            "annotation": [two_channel_annotation(s.instance_masks, s.labels) for s in samples],
        }
        splits[split] = Dataset.from_dict(data, features=features)
    return DatasetDict(splits)


def shapes_class_names() -> list[str]:
    return list(SHAPE_CLASSES)

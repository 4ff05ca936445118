"""Detection data: the bundled shapes set, local COCO folders, column detection, row checks, box conversion.

The canonical row holds an image and an `objects` column like the Hub's detection sets (cppe-5 and the
transformers examples): `{"bbox": [[x, y, w, h], ...], "category": [id, ...]}` (COCO boxes, in pixels). Other box
formats are read with `--box_format xyxy|cxcywh`. Every row is checked before any model loads; errors name the split
and row.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image

from hftl.data import IMAGE_COLUMN_NAMES
from hftl.log import get_logger
from hftl.synthetic import SHAPE_CLASSES, make_shapes
from hftl.tasks.detection.args import BOX_FORMATS

logger = get_logger(__name__)

SHAPES_SPLITS = {"train": 600, "validation": 80, "test": 120}
SHAPES_SEEDS = {"train": 10, "validation": 11, "test": 12}
SHAPES_IMAGE_SIZE = 96
SHAPES_EMPTY_FRACTION = 0.05  # a few images with no objects: negatives, as in real data

OBJECTS_COLUMN_NAMES = ("objects", "annotations", "objects_", "labels")
BOX_KEYS = ("bbox", "bboxes", "boxes", "box")
CATEGORY_KEYS = ("category", "category_id", "categories", "label", "labels", "class")
COCO_FILE_NAMES = ("annotations.json", "_annotations.coco.json", "instances.json")
SPLIT_FOLDERS = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
# A COCO box may poke out of the image by annotation slop; beyond this share of the image it is a format mistake.
OVERFLOW_TOLERANCE = 0.1


def detection_features(names: list[str] | tuple[str, ...]) -> Features:
    return Features(
        {
            "image": ImageFeature(),
            "image_id": Value("int64"),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": {
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=list(names))),
                "area": List(Value("float32")),
            },
        }
    )


def load_shapes_detection(image_size: int = SHAPES_IMAGE_SIZE, split_sizes: dict | None = None) -> DatasetDict:
    """The bundled `hftl/shapes-detection` set: circles, squares, triangles with exact COCO boxes, seeded."""
    splits, next_id = {}, 0
    for split, count in (split_sizes or SHAPES_SPLITS).items():
        samples = make_shapes(count, image_size, SHAPES_SEEDS.get(split, 13), empty_fraction=SHAPES_EMPTY_FRACTION)
        rows = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
        for sample in samples:
            rows["image"].append(sample.image)
            rows["image_id"].append(next_id)
            rows["width"].append(image_size)
            rows["height"].append(image_size)
            boxes = sample.boxes.tolist()
            rows["objects"].append(
                {"bbox": boxes, "category": sample.labels.tolist(), "area": [w * h for _, _, w, h in boxes]}
            )
            next_id += 1
        splits[split] = Dataset.from_dict(rows, features=detection_features(SHAPE_CLASSES))
    return DatasetDict(splits)


# ---- local COCO folders ------------------------------------------------------------------------------------------
def load_coco_folder(path: str | Path, read=None) -> DatasetDict:
    """`path/annotations.json` (+ images), or one such folder per split (`train/`, `valid/`, `test/`); each file
    is read by `read` (default: `coco_json_to_dataset`, boxes)."""
    read = read or coco_json_to_dataset
    root = Path(path)
    own = _coco_file(root)
    if own is not None:
        return DatasetDict({"train": read(own)})
    splits = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            found = _coco_file(root / name) if (root / name).is_dir() else None
            if found is not None:
                splits[split] = read(found)
                break
    if "train" not in splits:
        raise FileNotFoundError(
            f"{root} holds no COCO annotations: expected {root}/annotations.json next to the images, or split "
            f"folders (train/, valid/, test/) each with an annotations.json ({', '.join(COCO_FILE_NAMES)})."
        )
    return DatasetDict(splits)


def _coco_file(folder: Path) -> Path | None:
    return next((folder / n for n in COCO_FILE_NAMES if (folder / n).is_file()), None)


def read_coco(json_path: str | Path, what: str, check=None) -> tuple[list[str], dict, list]:
    """Reads and checks a COCO `what` ("detection", "instances") file: (class names, category id → class id
    0..K-1 in id order, [(image_id, image file, annotations), ...] for every image, annotated or not).
    `check(annotation, where)` raises on an annotation the caller cannot use. Errors name the file and the
    annotation or image."""
    json_path = Path(json_path)
    try:
        coco = json.loads(json_path.read_text())
    except ValueError as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from None
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise ValueError(f"{json_path} has no {key!r} list; it must be a COCO {what} file.")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    class_of = {c["id"]: i for i, c in enumerate(categories)}
    images = {image["id"]: image for image in coco["images"]}
    by_image: dict = {image_id: [] for image_id in images}
    for ann in coco["annotations"]:
        where = f"{json_path}: annotation {ann.get('id')}"
        if ann.get("image_id") not in images:
            raise ValueError(f"{where} refers to an unknown image_id {ann.get('image_id')}.")
        if ann.get("category_id") not in class_of:
            raise ValueError(
                f"{where} (image {images[ann['image_id']].get('file_name')}) has category_id "
                f"{ann.get('category_id')}, not among the categories {sorted(class_of)}."
            )
        if check is not None:
            check(ann, where)
        by_image[ann["image_id"]].append(ann)
    entries = []
    for image_id, image in images.items():
        file = json_path.parent / image["file_name"]
        if not file.is_file() and (json_path.parent / "images" / image["file_name"]).is_file():
            file = json_path.parent / "images" / image["file_name"]
        if not file.is_file():
            raise FileNotFoundError(f"{json_path}: image {image['file_name']!r} (id {image_id}) not found at {file}.")
        entries.append((image_id, image, file, by_image[image_id]))
    return [str(c["name"]) for c in categories], class_of, entries


def coco_json_to_dataset(json_path: str | Path) -> Dataset:
    """Reads a COCO detection file into the canonical rows; categories become class ids 0..K-1 in id order.
    Images without annotations are kept (negatives)."""
    names, class_of, entries = read_coco(json_path, "detection")
    rows = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    for image_id, image, file, anns in entries:
        rows["image"].append(str(file))
        rows["image_id"].append(int(image_id))
        rows["width"].append(int(image.get("width") or 0))
        rows["height"].append(int(image.get("height") or 0))
        rows["objects"].append(
            {
                "bbox": [[float(v) for v in a["bbox"]] for a in anns],
                "category": [class_of[a["category_id"]] for a in anns],
                "area": [float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns],
            }
        )
    return Dataset.from_dict(rows, features=detection_features(names))


# ---- columns, labels, checks -------------------------------------------------------------------------------------
def detect_columns(features, image_column: str | None, objects_column: str | None) -> tuple[str, str]:
    image = image_column or next((n for n, f in features.items() if isinstance(f, ImageFeature)), None)
    image = image or next((n for n in IMAGE_COLUMN_NAMES if n in features), None)
    objects = objects_column or next((n for n in OBJECTS_COLUMN_NAMES if n in features and n != image), None)
    if image is None or image not in features:
        raise ValueError(f"No image column found among {list(features)}; name it with --image_column.")
    if objects is None or objects not in features:
        raise ValueError(
            f"No objects column found among {list(features)}: detection rows need a column like 'objects' holding "
            "{'bbox': [[x, y, w, h], ...], 'category': [...]}; name it with --label_column."
        )
    _field_name(_inner(features[objects]), BOX_KEYS, objects, "box")
    _field_name(_inner(features[objects]), CATEGORY_KEYS, objects, "category")
    return image, objects


def _inner(feature):
    """The dict of fields inside an objects column, whether stored as a dict of lists or a list of dicts."""
    while not isinstance(feature, dict) and hasattr(feature, "feature"):
        feature = feature.feature
    return feature


def _field_name(fields, keys, column: str, what: str) -> str:
    if not isinstance(fields, dict):
        raise ValueError(f"Column {column!r} is not a dict of object fields (it is {fields!r}).")
    found = next((k for k in keys if k in fields), None)
    if found is None:
        raise ValueError(f"Column {column!r} has no {what} field (looked for {keys}); it has {list(fields)}.")
    return found


def category_names(features, objects_column: str, dsd: DatasetDict) -> list[str]:
    fields = _inner(features[objects_column])
    category = _inner(fields[_field_name(fields, CATEGORY_KEYS, objects_column, "category")])
    if isinstance(category, ClassLabel):
        return list(category.names)
    top = -1
    for ds in dsd.values():
        for value in ds[objects_column]:
            top = max([top, *row_objects(value)[1]])
    if top < 0:
        raise ValueError("The dataset has no objects at all, so its categories are unknown.")
    logger.info(f"Categories have no names: classes named by id, 0..{top}.")
    return [str(i) for i in range(top + 1)]


def row_objects(value) -> tuple[list, list]:
    """(boxes, categories) of one row's objects, stored either as a dict of lists or a list of dicts."""
    if value is None:
        return [], []
    if isinstance(value, dict):
        box_key = next((k for k in BOX_KEYS if k in value), None)
        cat_key = next((k for k in CATEGORY_KEYS if k in value), None)
        return list(value.get(box_key) or []), list(value.get(cat_key) or [])
    boxes, categories = [], []
    for obj in value:
        boxes.append(obj[next(k for k in BOX_KEYS if k in obj)])
        categories.append(obj[next(k for k in CATEGORY_KEYS if k in obj)])
    return boxes, categories


def to_xyxy(box, box_format: str) -> list[float]:
    a, b, c, d = (float(v) for v in box)
    if box_format == "coco":
        return [a, b, a + c, b + d]
    if box_format == "cxcywh":
        return [a - c / 2, b - d / 2, a + c / 2, b + d / 2]
    return [a, b, c, d]


def image_sizes(ds: Dataset, image_column: str) -> list[tuple[int, int]]:
    """(width, height) per row: from width/height columns when all are set, else from image headers only."""
    if "width" in ds.column_names and "height" in ds.column_names:
        widths, heights = ds["width"], ds["height"]
        if all(widths) and all(heights):
            return list(zip(widths, heights))
    raw = ds.cast_column(image_column, ImageFeature(decode=False))[image_column]
    sizes = []
    for item in raw:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        with Image.open(source) as image:
            sizes.append(image.size)
    return sizes


def check_split(
    ds: Dataset, split: str, image_column: str, objects_column: str, num_labels: int, box_format: str
) -> dict:
    """Raises on rows no transform can repair (wrong shapes, negative sizes, unknown classes, a box that only fits
    the image in another format); returns counts of what transforms will repair (clipped boxes, empty images)."""
    sizes = image_sizes(ds, image_column)
    stats = {"rows": len(ds), "boxes": 0, "clipped": 0, "empty_images": 0}
    for row, (value, (width, height)) in enumerate(zip(ds[objects_column], sizes)):
        boxes, categories = row_objects(value)
        where = f"{split} split, row {row}"
        if len(boxes) != len(categories):
            raise ValueError(f"{where}: {len(boxes)} boxes but {len(categories)} categories.")
        if not boxes:
            stats["empty_images"] += 1
        for index, (box, category) in enumerate(zip(boxes, categories)):
            _check_box(box, index, where, width, height, box_format)
            if not isinstance(category, int | np.integer) or not 0 <= category < num_labels:
                raise ValueError(
                    f"{where}: object {index} has category {category!r}, not a class id in 0..{num_labels - 1}. "
                    "Fix the row or the category list."
                )
            x0, y0, x1, y1 = to_xyxy(box, box_format)
            stats["clipped"] += int(x0 < 0 or y0 < 0 or x1 > width or y1 > height)
        stats["boxes"] += len(boxes)
    return stats


def _check_box(box, index: int, where: str, width: int, height: int, box_format: str) -> None:
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ValueError(f"{where}: box {index} is {box!r}; boxes need 4 numbers ({box_format} format).")
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: box {index} {box} holds a non-finite or non-numeric value.")
    x0, y0, x1, y1 = to_xyxy(box, box_format)
    if x1 < x0 or y1 < y0:
        hint = " (it looks like [x, y, w, h]: pass --box_format coco)" if box_format == "xyxy" else ""
        raise ValueError(f"{where}: box {index} {box} has a negative width or height{hint}.")
    slack_x, slack_y = OVERFLOW_TOLERANCE * width, OVERFLOW_TOLERANCE * height
    if x1 > width + slack_x or y1 > height + slack_y or x0 < -slack_x or y0 < -slack_y:
        a, b, c, d = box
        if box_format == "coco" and a < c <= width and b < d <= height:
            raise ValueError(
                f"{where}: box {index} {box} reaches past the {width}x{height} image as [x, y, w, h] but fits as "
                "[x0, y0, x1, y1]: pass --box_format xyxy if the whole dataset uses corner boxes, or fix this row."
            )
        raise ValueError(
            f"{where}: box {index} {box} ({box_format}) lies far outside the {width}x{height} image. Fix the row "
            f"or check --box_format ({', '.join(BOX_FORMATS)})."
        )


def clean_boxes(value, box_format: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(xyxy boxes clipped to the image, category ids, number dropped as degenerate after clipping)."""
    boxes, categories = row_objects(value)
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), 0
    xyxy = np.array([to_xyxy(b, box_format) for b in boxes], np.float32)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    keep = (xyxy[:, 2] - xyxy[:, 0] >= 1) & (xyxy[:, 3] - xyxy[:, 1] >= 1)
    return xyxy[keep], np.array(categories, np.int64)[keep], int((~keep).sum())

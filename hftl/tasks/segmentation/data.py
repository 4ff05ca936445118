"""Semantic-segmentation data: mask columns, label files, local image/mask folders, and mask checks.

A mask is a single-channel image whose pixel values are class ids (PNG mode L, P or I). Colour masks (RGB) are
accepted only with a palette that maps each colour to a class, or when all three channels are equal. Every error
names the split and row (or file) so the user can fix the data before any model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from hftl.data import IMAGE_COLUMN_NAMES

MASK_COLUMN_NAMES = ("annotation", "label", "mask", "segmentation_mask", "semantic_segmentation", "labels", "seg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LABEL_FILE = "id2label.json"
PALETTE_FILE = "palette.json"
# Rows per split whose masks are fully checked before training; the rest are checked as they are loaded.
EAGER_CHECK_ROWS = 500


@dataclass(frozen=True)
class MaskSpec:
    """How a dataset's masks become class ids, as `SegmentationTask.data_spec` found it (`DataSpec.task_data`)."""

    mask_column: str
    palette: dict | None  # RGB colour -> class id, for colour masks
    num_labels: int
    reduce_labels: bool  # ADE20K's convention: 0 is "other" (ignored), ids shift down by one
    ignore_index: int

    def to_ids(self, mask, where: str) -> np.ndarray:
        return encode_ids(
            mask_to_ids(mask, self.palette, where), self.num_labels, self.reduce_labels, self.ignore_index, where
        )


def detect_columns(features, image_column: str | None, mask_column: str | None) -> tuple[str, str]:
    """The image and mask columns: named by the user, or the only/first image columns by conventional name."""
    image_like = [name for name, f in features.items() if isinstance(f, ImageFeature)]
    if image_column is None:
        image_column = next((n for n in IMAGE_COLUMN_NAMES if n in image_like), None)
        image_column = image_column or (image_like[0] if image_like else None)
    if mask_column is None:
        mask_column = next((n for n in MASK_COLUMN_NAMES if n in features and n != image_column), None)
        others = [n for n in image_like if n != image_column]
        mask_column = mask_column or (others[0] if len(others) == 1 else None)
    for column, option in ((image_column, "--image_column"), (mask_column, "--label_column")):
        if column is None or column not in features:
            raise ValueError(
                f"Could not find the {'image' if option == '--image_column' else 'mask'} column "
                f"({column!r}) among {list(features)}; name it with {option}."
            )
    if not isinstance(features[mask_column], ImageFeature):
        raise ValueError(
            f"Mask column {mask_column!r} has type {features[mask_column]!r}; semantic segmentation needs an image "
            "of class ids per row. Pick the mask column with --label_column."
        )
    return image_column, mask_column


def read_label_file(spec: str) -> list[str]:
    """Class names from an id → name JSON: a local file, or `repo_id:filename` in a Hub dataset repo."""
    if os.path.isfile(spec):
        text = Path(spec).read_text()
    elif ":" in spec and not os.path.exists(spec):
        from huggingface_hub import hf_hub_download

        repo_id, filename = spec.split(":", 1)
        text = Path(hf_hub_download(repo_id, filename, repo_type="dataset")).read_text()
    else:
        raise FileNotFoundError(f"Label file {spec!r} not found (--id2label: a JSON file, or repo_id:filename).")
    return names_from_mapping(json.loads(text), spec)


def names_from_mapping(mapping, source: str) -> list[str]:
    if isinstance(mapping, list):
        return [str(name) for name in mapping]
    try:
        by_id = {int(k): str(v) for k, v in mapping.items()}
    except (AttributeError, ValueError):
        raise ValueError(f'{source}: expected a JSON object of class id → name, e.g. {{"0": "background"}}.') from None
    missing = sorted(set(range(max(by_id) + 1)) - set(by_id))
    if missing:
        raise ValueError(f"{source}: class ids must be 0..{max(by_id)} without gaps; missing {missing[:10]}.")
    return [by_id[i] for i in range(len(by_id))]


def read_palette(spec: str | None, names: list[str]) -> dict[tuple, int] | None:
    """`{"class name or id": [r, g, b]}` → {(r, g, b): class id}."""
    if not spec:
        return None
    mapping = json.loads(Path(spec).read_text())
    index = {name: i for i, name in enumerate(names)}
    palette = {}
    for key, colour in mapping.items():
        class_id = index.get(key, int(key) if str(key).isdigit() else None)
        if class_id is None:
            raise ValueError(f"Palette {spec}: {key!r} is neither a class name nor an id; classes: {names}.")
        palette[tuple(int(c) for c in colour[:3])] = class_id
    return palette


def load_local_folder(path: str) -> DatasetDict:
    """`root/[split/]images/x.jpg` paired with `root/[split/]masks/x.png` by file stem."""
    root = Path(path)
    split_dirs = [d for d in sorted(root.iterdir()) if (d / "images").is_dir()] if root.is_dir() else []
    if (root / "images").is_dir():
        split_dirs = [root]
    if not split_dirs:
        raise ValueError(
            f"{path}: expected images/ and masks/ folders (or train/images, train/masks, …) with matching file "
            f"names, and an {LABEL_FILE} mapping class id → name."
        )
    splits = {}
    for split_dir in split_dirs:
        images = {p.stem: p for p in sorted((split_dir / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        masks_dir = split_dir / "masks"
        masks = {p.stem: p for p in sorted(masks_dir.iterdir())} if masks_dir.is_dir() else {}
        unpaired = sorted(set(images) - set(masks))
        if unpaired:
            raise ValueError(f"{split_dir}: no mask in {masks_dir} for image(s) {unpaired[:5]} (masks pair by name).")
        stems = sorted(images)
        data = {"image": [str(images[s]) for s in stems], "annotation": [str(masks[s]) for s in stems]}
        ds = Dataset.from_dict(data).cast_column("image", ImageFeature()).cast_column("annotation", ImageFeature())
        splits["train" if split_dir == root else split_dir.name] = ds
    return DatasetDict(splits)


def mask_to_ids(mask, palette: dict | None, where: str) -> np.ndarray:
    """Class ids (H, W int64) from a mask image; colour masks need a palette (or three equal channels)."""
    if isinstance(mask, np.ndarray):
        array = mask
    elif mask.mode in ("RGB", "RGBA"):
        array = np.asarray(mask.convert("RGB"))
    elif mask.mode in ("L", "P", "I", "I;16", "1"):
        array = np.asarray(mask)
    else:
        raise ValueError(f"{where}: mask has image mode {mask.mode!r}; masks must be class ids (PNG mode L, P or I).")
    if array.ndim == 3:
        if palette is not None:
            return _apply_palette(array[..., :3], palette, where)
        if (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all():
            array = array[..., 0]
        else:
            raise ValueError(
                f"{where}: mask is an RGB colour image, and there is no palette to turn colours into class ids. "
                f"Save masks as single-channel PNGs of class ids, or pass --mask_palette {PALETTE_FILE} "
                '({"class name": [r, g, b], …}).'
            )
    return array.astype(np.int64)


def _apply_palette(rgb: np.ndarray, palette: dict, where: str) -> np.ndarray:
    flat = rgb.reshape(-1, 3).astype(np.int64)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    lookup = {(r << 16) | (g << 8) | b: cid for (r, g, b), cid in palette.items()}
    unique, inverse = np.unique(codes, return_inverse=True)
    unknown = [tuple(int(x) for x in ((u >> 16) & 255, (u >> 8) & 255, u & 255)) for u in unique if u not in lookup]
    if unknown:
        raise ValueError(f"{where}: mask colours {unknown[:5]} are not in the palette (--mask_palette).")
    return np.array([lookup[u] for u in unique], dtype=np.int64)[inverse].reshape(rgb.shape[:2])


def encode_ids(ids: np.ndarray, num_labels: int, reduce_labels: bool, ignore_index: int, where: str) -> np.ndarray:
    """Applies reduce_labels (0 → ignore, k → k-1) and checks every id is a class or the ignore index."""
    if reduce_labels:
        ignored = (ids == 0) | (ids == ignore_index)
        ids = np.where(ignored, ignore_index, ids - 1)
    bad = (ids != ignore_index) & ((ids < 0) | (ids >= num_labels))
    if bad.any():
        values = sorted(set(np.unique(ids[bad]).tolist()))
        raise ValueError(
            f"{where}: mask values {values[:10]} are outside the {num_labels} classes (ids 0..{num_labels - 1}) "
            f"and are not the ignore index {ignore_index}. Check --id2label, --reduce_labels and --ignore_index."
        )
    return ids


def check_pair(image, mask, where: str) -> None:
    if image.size != mask.size:
        raise ValueError(
            f"{where}: mask size {mask.size[0]}×{mask.size[1]} differs from image size "
            f"{image.size[0]}×{image.size[1]}; a mask must have one class id per image pixel."
        )


def scan_max_id(ds: Dataset, mask_column: str, palette, rows: int) -> int:
    """Largest id in the first `rows` masks: class names default to "0".."max" when no label file is given."""
    top = 0
    for i, mask in enumerate(ds.select(range(min(rows, len(ds))))[mask_column]):
        top = max(top, int(mask_to_ids(mask, palette, f"row {i}").max()))
    return top


def check_split(ds: Dataset, split: str, image_column: str, masks: MaskSpec) -> None:
    """Opens the first EAGER_CHECK_ROWS image/mask pairs of a split and checks sizes and class ids."""
    rows = min(len(ds), EAGER_CHECK_ROWS)
    for i in range(rows):
        example = ds[i]
        where = f"{split} split, row {i}"
        image, mask = example[image_column], example[masks.mask_column]
        if image is None or mask is None:
            raise ValueError(f"{where}: the {'image' if image is None else 'mask'} is missing.")
        check_pair(image, mask, where)
        masks.to_ids(mask, where)


def to_pil(image) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


# ---- the bundled synthetic set ------------------------------------------------------------------------------------
SHAPES_SPLIT_SIZES = (("train", 480), ("validation", 80), ("test", 120))
SHAPES_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


def shapes_class_names() -> list[str]:
    from hftl.synthetic import SHAPE_CLASSES

    return ["background", *SHAPE_CLASSES]


@lru_cache(maxsize=2)  # generated once per process: datasets are immutable, so sharing them is safe
def load_shapes_segmentation(size: int = 96, split_sizes: tuple = SHAPES_SPLIT_SIZES) -> DatasetDict:
    """`hftl/shapes-segmentation`: seeded shapes (hftl.synthetic) with exact class-id masks, 0 = background.
    `split_sizes`: ((split, count), …)."""
    from hftl.synthetic import make_shapes

    features = Features({"image": ImageFeature(), "annotation": ImageFeature()})
    splits = {}
    for split, count in split_sizes:
        samples = make_shapes(count, size, seed=SHAPES_SPLIT_SEEDS.get(split, 3))
        data = {"image": [s.image for s in samples], "annotation": [Image.fromarray(s.mask) for s in samples]}
        splits[split] = Dataset.from_dict(data, features=features)
    return DatasetDict(splits)

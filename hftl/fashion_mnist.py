"""`hftl/fashion-mnist`: Zalando's Fashion-MNIST from Debian's `dataset-fashion-mnist` package, offline.

The package ships the original idx files (60,000 train / 10,000 test 28x28 grayscale images). They are converted
once into an Arrow dataset in the hftl cache (PNG bytes in an `Image` feature, a `ClassLabel` with the 10 official
names) and memory-mapped on every later load, so nothing holds a whole split in memory. The official test set is
the test split; validation is a fixed stratified carve-out of train, the same on every machine.
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_from_disk
from datasets import Image as ImageFeature

NAME = "hftl/fashion-mnist"
APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# 5,000 of the 60,000 official train images, 500 per class
VALIDATION_SHARE = 1 / 12
SPLIT_SEED = 0
# Bump when the cached layout or the split changes, so stale caches are rebuilt rather than reused.
_FORMAT_VERSION = 1
_MARKER = "hftl_fashion_mnist.json"


def source_dir() -> Path:
    """Where the idx files are: $HFTL_FASHION_MNIST_DIR, else the Debian package's folder."""
    return Path(os.environ.get("HFTL_FASHION_MNIST_DIR") or DEFAULT_DIR)


def check_source(folder: Path) -> None:
    missing = [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{NAME} is built from Debian's {APT_PACKAGE} package, but {folder} lacks {', '.join(missing)}. "
            f"Install it with `apt-get install -y {APT_PACKAGE}` (or point HFTL_FASHION_MNIST_DIR at a folder "
            "holding the four original idx .gz files)."
        )


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip'd) as a uint8 array: magic 0x0000 08 <ndim>, big-endian int32 dims, then the bytes."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {array.size} bytes.")
    return array.reshape(shape)


def validation_indices(labels: np.ndarray) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    _, validation = train_test_split(
        np.arange(len(labels)),
        test_size=round(len(labels) * VALIDATION_SHARE),
        stratify=labels,
        random_state=SPLIT_SEED,
    )
    return np.sort(validation)


def _features() -> Features:
    return Features({"image": ImageFeature(), "label": ClassLabel(names=LABELS)})


def _split(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, cache: str) -> Dataset:
    from PIL import Image

    def rows():
        for i in indices:
            buffer = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buffer, format="PNG")
            yield {"image": {"bytes": buffer.getvalue(), "path": None}, "label": int(labels[i])}

    return Dataset.from_generator(rows, features=_features(), cache_dir=cache)


def build(folder: Path, target: Path) -> None:
    """Converts the idx files in `folder` into a DatasetDict saved at `target` (a fresh directory)."""
    arrays = {
        split: (read_idx(folder / images), read_idx(folder / labels)) for split, (images, labels) in FILES.items()
    }
    train_images, train_labels = arrays["train"]
    held_out = validation_indices(train_labels)
    keep = np.setdiff1d(np.arange(len(train_labels)), held_out)
    with tempfile.TemporaryDirectory(prefix="hftl-fmnist-", dir=target.parent) as cache:
        DatasetDict(
            {
                "train": _split(train_images, train_labels, keep, cache),
                "validation": _split(train_images, train_labels, held_out, cache),
                "test": _split(*arrays["test"], np.arange(len(arrays["test"][1])), cache),
            }
        ).save_to_disk(str(target))


def load_fashion_mnist() -> DatasetDict:
    """train 55,000 / validation 5,000 (stratified, fixed) / test 10,000 (official); built into the cache once."""
    from hftl.bundled import build_once, cache_dir, is_complete

    target = cache_dir() / "datasets" / NAME
    if not is_complete(target, _MARKER, _FORMAT_VERSION):
        folder = source_dir()
        check_source(folder)  # before any work: a missing package is named, not a half-built cache
        build_once(target, NAME, lambda staging: build(folder, staging / "data"), _MARKER, _FORMAT_VERSION)
    return load_from_disk(str(target / "data"))

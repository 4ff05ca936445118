"""hftl/fashion-mnist: idx files → cached Arrow dataset, official names and test split, fixed stratified validation,
one clear message without the Debian package, seeded into the local Hub."""

import gzip
import struct

import numpy as np
import pytest

from hftl import fashion_mnist
from hftl.bundled import load_bundled_dataset


def _write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """The four idx files with 12 train / 3 test images per class; pixel (0, 0) holds the row number."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, per_class in (("train", 12), ("test", 3)):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        images[:, 0, 0] = np.arange(len(labels))
        image_file, label_file = fashion_mnist.FILES[split]
        _write_idx(folder / image_file, images)
        _write_idx(folder / label_file, labels)
    monkeypatch.setenv("HFTL_FASHION_MNIST_DIR", str(folder))
    monkeypatch.setenv("HFTL_CACHE", str(tmp_path / "cache"))
    return folder


def test_builds_official_names_test_split_and_stratified_validation(tiny_source):
    dsd = load_bundled_dataset("hftl/fashion-mnist")
    assert {name: len(split) for name, split in dsd.items()} == {"train": 110, "validation": 10, "test": 30}
    features = dsd["train"].features
    assert features["label"].names[0] == "T-shirt/top" and features["label"].names[9] == "Ankle boot"
    assert sorted(dsd["validation"]["label"]) == list(range(10))  # one per class: stratified
    source_labels = fashion_mnist.read_idx(tiny_source / "t10k-labels-idx1-ubyte.gz")
    assert dsd["test"]["label"] == source_labels.tolist()  # the official test set, in its order
    first = np.asarray(dsd["test"][0]["image"])
    assert first.shape == (28, 28) and first[0, 0] == 0
    rows = sorted(np.asarray(row["image"])[0, 0] for split in ("train", "validation") for row in dsd[split])
    assert rows == list(range(120))  # train and validation partition the official train set


def test_is_converted_once_then_memory_mapped(tiny_source):
    first = load_bundled_dataset("hftl/fashion-mnist")
    for path in tiny_source.iterdir():
        path.unlink()  # the cache alone must serve the second load
    again = load_bundled_dataset("hftl/fashion-mnist")
    assert again["validation"]["label"] == first["validation"]["label"]
    assert again["train"].cache_files  # on disk, not in memory


def test_missing_package_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HFTL_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("HFTL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_bundled_dataset("hftl/fashion-mnist")
    assert not (tmp_path / "cache" / "datasets" / "hftl" / "fashion-mnist").exists()


def test_read_idx_refuses_other_files(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x00\x00\x0d\x01" + struct.pack(">i", 2) + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an idx file"):
        fashion_mnist.read_idx(path)


@pytest.mark.slow
def test_real_package_splits():
    if not (fashion_mnist.source_dir() / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    dsd = load_bundled_dataset("hftl/fashion-mnist")
    assert {name: len(split) for name, split in dsd.items()} == {"train": 55000, "validation": 5000, "test": 10000}
    assert np.bincount(dsd["validation"]["label"]).tolist() == [500] * 10


def test_hub_seed_serves_it_by_its_id(tiny_source, local_hub):
    from datasets import load_dataset

    from hftl.hub.seed import seed_hub

    urls = seed_hub(models=[], datasets=["hftl/fashion-mnist"], log=lambda _: None)
    assert urls == [f"{local_hub.url}/datasets/hftl/fashion-mnist"]
    served = load_dataset("hftl/fashion-mnist")
    assert {name: len(split) for name, split in served.items()} == {"train": 110, "validation": 10, "test": 30}
    assert served["train"].features["label"].names == fashion_mnist.LABELS


def test_default_hub_seed_skips_it_with_the_apt_command_when_absent(tmp_path, monkeypatch, local_hub):
    from hftl.hub.seed import seed_hub

    monkeypatch.setenv("HFTL_FASHION_MNIST_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("HFTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("hftl.hub.seed.bundled_dataset_names", lambda: ["hftl/fashion-mnist"])
    lines = []
    assert seed_hub(models=[], log=lines.append) == []
    assert len(lines) == 1 and "apt-get install -y dataset-fashion-mnist" in lines[0], lines

"""Local folders: imagefolders listed by os.scandir as datasets would read them, remembered between launches; folders
in the Hub's own layout load as that dataset."""

import os

import datasets
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from datasets.data_files import EmptyDatasetError
from PIL import Image

import hftl.local_data as local_data
from hftl.config import DataArgs
from hftl.data import load_dataset_dict
from hftl.tasks.classification.task import ClassificationTask
from tests.fixtures.data import make_colour_images


def _rows(ds):
    raw = ds.cast_column("image", ImageFeature(decode=False))
    labels = ds.features["label"].names
    return sorted((item["path"], labels[label]) for item, label in zip(raw["image"], raw["label"]))


@pytest.mark.parametrize("splits", [("train", "val", "test"), (None,)])
def test_imagefolder_listing_matches_datasets(tmp_path, splits):
    for i, split in enumerate(splits):
        make_colour_images(tmp_path / "data", per_class=3, size=8, seed=i, split=split)
    ours = local_data.load_imagefolder(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"))
    assert sorted(ours) == sorted(theirs)
    for split in theirs:
        assert ours[split].features == theirs[split].features
        assert _rows(ours[split]) == _rows(theirs[split])


def test_imagefolder_listing_is_reused_until_a_folder_changes(tmp_path, monkeypatch):
    make_colour_images(tmp_path / "data", per_class=3, size=8)
    cache = str(tmp_path / "cache")
    first = local_data.load_imagefolder(str(tmp_path / "data"), cache_dir=cache)
    scans = []
    real_scan = local_data._scan
    monkeypatch.setattr(local_data, "_scan", lambda root: scans.append(root) or real_scan(root))
    again = local_data.load_imagefolder(str(tmp_path / "data"), cache_dir=cache)
    assert scans == [] and _rows(again["train"]) == _rows(first["train"])
    Image.new("RGB", (8, 8), "red").save(tmp_path / "data" / "red" / "new.png")
    changed = local_data.load_imagefolder(str(tmp_path / "data"), cache_dir=cache)
    assert len(scans) == 1 and len(changed["train"]) == len(first["train"]) + 1


def test_imagefolder_with_metadata_or_no_images(tmp_path):
    make_colour_images(tmp_path / "meta", per_class=2, size=8)
    names = sorted(p.name for p in (tmp_path / "meta" / "red").iterdir())
    (tmp_path / "meta" / "red" / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},x\n" for n in names))
    with_meta = local_data.load_imagefolder(str(tmp_path / "meta"), cache_dir=str(tmp_path / "cache"))
    assert "caption" in with_meta["train"].features  # datasets' builder read the metadata
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match="No image files in .*one sub-folder per class"):
        local_data.load_imagefolder(str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def _hub_dataset(n=6):
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(n)]
    return Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hub_layout_folder_loads_as_that_dataset(tmp_path, layout):
    train, test = _hub_dataset(6), _hub_dataset(4)
    root = tmp_path / "ds"
    if layout == "save_to_disk":
        DatasetDict({"train": train, "test": test}).save_to_disk(str(root))
    else:  # what snapshot_download(repo_type="dataset") leaves
        (root / "data").mkdir(parents=True)
        train.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
        test.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
        (root / "README.md").write_text("# a dataset card\n")
    dsd = load_dataset_dict(DataArgs(dataset=str(root)), ClassificationTask())
    assert sorted(dsd) == ["test", "train"]
    assert (len(dsd["train"]), len(dsd["test"])) == (6, 4)
    assert dsd["train"].features["label"].names == ["a", "b"]
    assert dsd["test"][3]["image"].getpixel((0, 0)) == (120, 0, 0)


def test_imagefolder_is_not_mistaken_for_tables(tmp_path):
    make_colour_images(tmp_path / "data", per_class=2, size=8, split="train")
    assert not local_data._has_tables(tmp_path / "data")
    os.makedirs(tmp_path / "data" / "train" / "red" / "deep")
    assert local_data.load_hub_layout(str(tmp_path / "data")) is None


def test_parquet_folder_cache_holds_small_images_in_few_record_batches(tmp_path):
    # opening datasets' cache reads each record batch's header; at its default for images (100 rows a batch) small
    # images put a header on every 64 KB mapped around, and the whole file counted in RSS
    train = _hub_dataset(250)
    (tmp_path / "ds" / "data").mkdir(parents=True)
    pq.write_table(train.data.table, tmp_path / "ds" / "data" / "train-00000-of-00001.parquet")  # one row group
    loaded = local_data.load_hub_layout(str(tmp_path / "ds"))["train"]
    assert len(loaded.data.to_batches()) == 1
    assert loaded[249]["image"].getpixel((0, 0)) == train[249]["image"].getpixel((0, 0))

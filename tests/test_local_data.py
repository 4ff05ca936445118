"""Local folders: imagefolders listed by os.scandir as datasets would read them, remembered between launches; folders
in the Hub's own layout load as that dataset."""

import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from datasets.data_files import EmptyDatasetError
from PIL import Image

import hftl.folder_listing as folder_listing
import hftl.local_data as local_data
from hftl.config import DataArgs
from hftl.data import load_dataset_dict
from hftl.folder_listing import IMAGE_EXTENSIONS
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


def _by_the_rules(root) -> list[str]:
    """The listing file by file, as the rules read: image extensions in any case, hidden folders skipped, symlinked
    folders followed, rows in the order of their paths."""
    paths = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        paths += [os.path.join(folder, f) for f in files if f[f.rfind(".") :].lower() in IMAGE_EXTENSIONS]
    return sorted(paths)


def _touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _odd_tree(root):
    """Names that each take another path through the vectorised listing."""
    for i in range(300):  # a large folder: its path is put before all its names in one call
        _touch(root / "cat" / f"{i}.png")
    for name in ["n01440764_10026.JPEG", "n01440764_9.JPEG", "n01440764_100.jpeg", "x.Png", "a.ps", ".hidden.jpg"]:
        _touch(root / "dog" / name)  # shared prefixes, upper-case and short extensions
    for i in range(3):  # the same first 8 bytes after the shared prefix: sorted by all bytes
        _touch(root / "dog" / f"abcdefghijk{i}.png")
    for name in ["ñandú.png", "Ñ.png", "日本.jpg", "e\u0301.png", "z.J2\u212a", "q.\u0130co"]:
        _touch(root / "ünïcode" / name)  # code point order; str.lower()'s Kelvin sign and dotted capital I
    for i in (7, 30, 100):  # long names past their folder's shared prefix: their bytes there in one pass
        _touch(root / "long" / f"shared_prefix_{i}_and_a_tail.png")
    for i in range(10):  # more non-images than are checked one by one
        _touch(root / "notes" / f"note{i}.txt")
    _touch(root / "notes" / "kept.bmp")
    _touch(root / "cat-2" / "sub" / "deep.png")  # a sub-folder in a class folder: files at two depths
    _touch(root / "cat-2" / "sub.png")
    _touch(root / "cat-2" / "sub-a.png")
    _touch(root / "cat.b" / "x.tiff")
    _touch(root / ".hidden" / "h.png")
    (root / "dog" / "linked").symlink_to(root / "cat.b")  # a symlinked folder among a leaf folder's files
    (root / "notes" / "linked").symlink_to(root / "cat.b")


def test_imagefolder_listing_follows_the_rules_in_path_order(tmp_path):
    _odd_tree(tmp_path / "data")
    root = os.path.realpath(tmp_path / "data")
    listed = local_data.load_imagefolder(root, cache_dir=str(tmp_path / "cache"))
    paths = listed["train"].cast_column("image", ImageFeature(decode=False))["image"]
    assert [image["path"] for image in paths] == _by_the_rules(root)
    assert "label" not in listed["train"].features  # files at two depths: datasets gives no labels


def test_eight_bytes_of_names_at_any_offset():
    long = [b"n01440764_10026.JPEG", b"n01440764_9.JPEG", b"abcdefghijklmnopqrstuvwxyz"]
    for names in (long, long[1:], [b"a.ps", *long]):  # no name to pad, and one to pad
        for array in (pa.array(names, pa.binary()), pa.array([b"x", *names], pa.binary()).slice(1)):
            for start in (-8, 0, 3, 8, 10, 16):
                got = folder_listing._eight_bytes(array, start).tobytes()
                if start < 0:
                    assert got == b"".join(name[-8:].rjust(8, b"\0") for name in names)
                else:
                    assert got == b"".join(name[start : start + 8].ljust(8, b"\0") for name in names)


def test_imagefolder_listing_labels_and_splits_in_path_order(tmp_path):
    for split in ("train", "val", "validation"):  # val and validation are both datasets' validation split
        for folder in ("Cat", "cat", "cat-2", "dog"):
            for name in ("b.PNG", "a.jpg", "a.txt", "B.png", "10.png", "9.png"):
                _touch(tmp_path / "data" / split / folder / f"{split}{name}")
    _touch(tmp_path / "data" / "loose.png")  # beside split folders: in no split, as datasets reads it
    root = os.path.realpath(tmp_path / "data")
    listed = local_data.load_imagefolder(root, cache_dir=str(tmp_path / "cache"))
    assert list(listed) == ["train", "validation"]
    names = listed["train"].features["label"].names
    assert names == ["Cat", "cat", "cat-2", "dog"]
    for split, folders in (("train", ["train"]), ("validation", ["val", "validation"])):
        rows = listed[split].cast_column("image", ImageFeature(decode=False))
        expected = sorted(p for folder in folders for p in _by_the_rules(os.path.join(root, folder)))
        assert [image["path"] for image in rows["image"]] == expected
        assert [names[label] for label in rows["label"]] == [os.path.basename(os.path.dirname(p)) for p in expected]


@pytest.mark.parametrize(
    ("name", "builder"),
    [("train_001.png", True), ("cat.TEST.jpg", True), ("a\u3000val.png", True), ("contest.png", False),
     ("train2.png", False), ("TEST\u0130.jpg", False), ("val.png.bak", False)],
)  # fmt: skip
def test_split_keywords_in_file_names_go_to_datasets(tmp_path, name, builder):
    _touch(tmp_path / "a" / name)
    _touch(tmp_path / "b" / "x.png")
    assert (local_data._scan(tmp_path) is None) == builder


def test_file_names_that_are_not_utf8(tmp_path):
    _touch(tmp_path / "data" / "a" / "x.png")
    _touch(tmp_path / "data" / "b" / "y.png")
    (tmp_path / "data" / "a").joinpath(os.fsdecode(b"caf\xe9.txt")).write_bytes(b"")  # not an image: ignored
    listed = local_data.load_imagefolder(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert len(listed["train"]) == 2
    (tmp_path / "data" / "a").joinpath(os.fsdecode(b"caf\xe9.PNG")).write_bytes(b"")
    with pytest.raises(ValueError, match=r"caf\\xe9.PNG' in .*/a is not UTF-8: rename it"):
        local_data.load_imagefolder(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))

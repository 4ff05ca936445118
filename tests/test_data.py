"""Data loading and validation: every bad input fails early with a message that names the fix."""

import io
import logging

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from hftl.config import DataArgs
from hftl.data import few_shot, load_dataset_dict, standard_splits, subsample
from hftl.image_check import SKIPPED, UNREADABLE, check_images, collate_readable
from hftl.modeling import ensure_rgb
from hftl.tasks.classification.task import ClassificationTask
from hftl.trainer import SeededItems, make_loader


def _images(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _dataset(labels, label_feature=None):
    features = Features({"image": ImageFeature(), "label": label_feature or ClassLabel(names=["a", "b", "c"])})
    return Dataset.from_dict({"image": _images(len(labels)), "label": labels}, features=features)


def test_bundled_digits_with_detected_columns():
    task = ClassificationTask()
    dsd = load_dataset_dict(DataArgs(dataset="hftl/digits"), task)
    names = task.label_names(standard_splits(dsd, DataArgs(), seed=0), DataArgs())
    assert names == [str(i) for i in range(10)]
    assert (task.image_column, task.label_column) == ("image", "label")


def test_validation_split_is_carved_stratified_and_test_falls_back():
    labels = [0] * 20 + [1] * 20 + [2] * 20
    dsd = standard_splits(DatasetDict({"train": _dataset(labels)}), DataArgs(validation_fraction=0.25), seed=0)
    assert len(dsd["validation"]) == 15 and len(dsd["train"]) == 45
    assert sorted(np.bincount(dsd["validation"]["label"])) == [5, 5, 5]  # stratified
    assert dsd["test"] is dsd["validation"]


def test_missing_split_and_empty_split_errors():
    with pytest.raises(ValueError, match="--train_split"):
        standard_splits(DatasetDict({"training": _dataset([0, 1])}), DataArgs(), seed=0)
    empty = _dataset([]).select([])
    dsd = DatasetDict({"train": _dataset([0, 1, 2, 0, 1, 2]), "validation": empty})
    with pytest.raises(ValueError, match="validation split is empty"):
        standard_splits(dsd, DataArgs(), seed=0)


def test_unknown_column_is_named():
    dsd = DatasetDict({"train": _dataset([0, 1, 2])})
    with pytest.raises(ValueError, match="'species'.*--label_column"):
        ClassificationTask().label_names(dsd, DataArgs(label_column="species"))


def test_label_column_of_wrong_type_is_rejected():
    features = Features({"image": ImageFeature(), "label": Value("float32")})
    ds = Dataset.from_dict({"image": _images(3), "label": [0.5, 1.5, 2.5]}, features=features)
    with pytest.raises(ValueError, match="must be a ClassLabel, strings or integers"):
        ClassificationTask().label_names(DatasetDict({"train": ds}), DataArgs())


def test_string_labels_become_one_shared_classlabel():
    features = Features({"image": ImageFeature(), "label": Value("string")})
    train = Dataset.from_dict({"image": _images(4), "label": ["cat", "dog", "cat", "emu"]}, features=features)
    test = Dataset.from_dict({"image": _images(2), "label": ["emu", "dog"]}, features=features)
    task = ClassificationTask()
    dsd = DatasetDict({"train": train, "test": test})
    names = task.label_names(dsd, DataArgs())
    assert names == ["cat", "dog", "emu"]
    encoded = task.encode_labels(dsd, names)
    assert encoded["test"]["label"] == [2, 1]  # same ids as train for the same names


def test_few_shot_is_seeded_balanced_and_checked():
    ds = _dataset([0] * 10 + [1] * 10 + [2] * 3)
    picked = few_shot(ds, "label", 3, seed=1)
    assert sorted(np.bincount(picked["label"])) == [3, 3, 3]
    assert few_shot(ds, "label", 3, seed=1)["label"] == picked["label"]
    with pytest.raises(ValueError, match=r"--shots 5 is more than some classes have.*'c': 3"):
        few_shot(ds, "label", 5, seed=1)
    dsd = DatasetDict({"train": ds, "validation": ds, "test": ds})
    limited = subsample(dsd, DataArgs(max_train_samples=4, max_eval_samples=2), seed=0, label_column="label")
    assert (len(limited["train"]), len(limited["validation"])) == (4, 2)


def _with_bad_files(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), "red").save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    truncated = tmp_path / "truncated.jpg"  # a valid header: only decoding the data finds it
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
    train = Dataset.from_dict({"image": [str(good), str(bad), str(good)], "label": [0, 1, 0]}, features=features)
    validation = Dataset.from_dict({"image": [str(truncated), str(good)], "label": [1, 0]}, features=features)
    return DatasetDict({"train": train, "validation": validation, "test": validation})


def test_corrupt_images_of_every_split_are_named_together(tmp_path):
    dsd = _with_bad_files(tmp_path)
    with pytest.raises(ValueError) as caught:
        check_images(dsd, "image")
    message = str(caught.value)
    assert "train: 1 unreadable: row 1 (" in message and "broken.jpg" in message
    assert "validation: 1 unreadable: row 0 (" in message and "truncated.jpg" in message
    assert "--on_bad_image skip" in message


def test_skipped_images_are_named_and_shared_rows_counted_once(tmp_path, caplog):
    dsd = _with_bad_files(tmp_path)
    with caplog.at_level(logging.INFO, logger="hftl"):
        kept, skipped = check_images(dsd, "image", on_bad_image="skip")
    assert [len(kept[s]) for s in ("train", "validation", "test")] == [2, 1, 1]
    assert kept["validation"] is kept["test"]  # still the same rows
    assert skipped == {
        "train": [str(tmp_path / "broken.jpg")],
        "validation": [str(tmp_path / "truncated.jpg")],
        "test": [str(tmp_path / "truncated.jpg")],
    }
    assert "Skipping 2 unreadable image(s)" in caplog.text


def test_image_check_reads_an_arrow_split_in_batches(tmp_path, monkeypatch):
    """A split of encoded images in an Arrow file is checked batch by batch, never read into memory whole."""
    import hftl.image_check as image_check

    blobs = []
    for i in range(40):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i, 0, 0)).save(buffer, "PNG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    blobs[33] = {"bytes": b"not an image", "path": None}
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a"])})
    Dataset.from_dict({"image": blobs, "label": [0] * 40}, features=features).save_to_disk(tmp_path / "ds")
    ds = Dataset.load_from_disk(str(tmp_path / "ds"))
    biggest = []
    real_iter = Dataset.iter

    def spying_iter(self, batch_size, drop_last_batch=False):
        for batch in real_iter(self, batch_size, drop_last_batch):
            biggest.append(len(next(iter(batch.values()))))
            yield batch

    monkeypatch.setattr(image_check, "BATCH_ROWS", 16)
    monkeypatch.setattr(Dataset, "iter", spying_iter)
    assert image_check.find_bad_images(DatasetDict({"train": ds}), "image") == {"train": [(33, "12 bytes")]}
    assert biggest == [16, 16, 8]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_become_rgb(mode):
    image = Image.new("RGB", (6, 4), (10, 200, 30)).convert(mode)
    out = ensure_rgb(image)
    assert out.mode == "RGB" and out.size == (6, 4)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    assert ensure_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_missing_dataset_names_the_ways_to_get_one(tmp_path):
    with pytest.raises(ValueError, match="bundled name.*local folder"):
        load_dataset_dict(DataArgs(dataset="nobody/no-such-dataset-xyz"), ClassificationTask())
    with pytest.raises(FileNotFoundError):
        load_dataset_dict(DataArgs(dataset=str(tmp_path / "missing")), ClassificationTask())


def test_record_batch_rows_come_from_the_card_sizes_of_the_config_that_loads():
    from huggingface_hub.hf_api import DatasetInfo as HubDatasetInfo

    from hftl.data import _rows_per_record_batch_from_card
    from hftl.local_data import ARROW_BATCH_BYTES

    def split(name, rows, size):
        return {"name": name, "num_examples": rows, "num_bytes": size}

    thumbnails = {"config_name": "thumbnails", "splits": [split("train", 900, 450_000), split("test", 100, 50_000)]}
    photos = {"config_name": "photos", "splits": [split("train", 100, 100_000_000)]}
    configs = [{"config_name": "photos", "data_files": "p/*"}, {"config_name": "thumbnails", "data_files": "t/*"}]
    card = {"dataset_info": [thumbnails, photos], "configs": configs}
    repo = HubDatasetInfo(id="user/two-configs", cardData=card)
    assert _rows_per_record_batch_from_card(repo, "thumbnails") == ARROW_BATCH_BYTES // 500
    assert _rows_per_record_batch_from_card(repo, "photos") == 100  # 1 MB images: datasets' default
    assert _rows_per_record_batch_from_card(repo, None) is None  # no default config: datasets asks for a name
    configs[1]["default"] = True
    flagged = HubDatasetInfo(id="user/flagged", cardData={"dataset_info": [thumbnails, photos], "configs": configs})
    assert _rows_per_record_batch_from_card(flagged, None) == ARROW_BATCH_BYTES // 500
    single = HubDatasetInfo(id="user/one", cardData={"dataset_info": {"splits": [split("train", 1000, 500_000)]}})
    assert _rows_per_record_batch_from_card(single, None) == ARROW_BATCH_BYTES // 500
    for unsized in ({"license": "mit"}, {"dataset_info": {"features": [{"name": "x", "dtype": "int64"}]}}, None):
        assert _rows_per_record_batch_from_card(HubDatasetInfo(id="user/unsized", cardData=unsized), None) is None
    assert _rows_per_record_batch_from_card(None, None) is None  # the repo check was skipped (offline)


def test_single_image_class_stays_in_train_and_the_rest_is_still_stratified():
    labels = [0] * 10 + [1] * 10 + [2]  # class "c" has one image
    for seed in range(30):  # with stratification off for all, some seeds put "c" in validation only
        with pytest.warns(UserWarning, match="single training image .*: c\\."):
            dsd = standard_splits(
                DatasetDict({"train": _dataset(labels)}), DataArgs(validation_fraction=0.2), seed, "label"
            )
        assert dsd["train"]["label"].count(2) == 1
        assert sorted(np.bincount(dsd["validation"]["label"], minlength=3)) == [0, 2, 2]  # stratified: 2 a, 2 b
        assert len(dsd["train"]) + len(dsd["validation"]) == len(labels)


def test_a_large_train_split_is_checked_as_it_is_read(tmp_path):
    """Over the up-front limit the train split is not opened before training; its bad images are skipped when read
    and named, while the other splits are still checked first."""
    dsd = _with_bad_files(tmp_path)
    kept, skipped = check_images(dsd, "image", on_bad_image="skip", up_front_max_rows=2)
    assert len(kept["train"]) == 3 and skipped == {
        "validation": [str(tmp_path / "truncated.jpg")],
        "test": [str(tmp_path / "truncated.jpg")],
    }
    from transformers import ViTImageProcessor

    task = ClassificationTask()
    task.image_column, task.label_column = "image", "label"
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    train = task.prepare(kept, processor, DataArgs(image_size=8))["train"]
    items = train.__getitems__([0, 1, 2])  # a row stays a row (one alone too): the bad one names its image
    assert train[1] == {"pixel_values": None, "labels": 1, UNREADABLE: str(tmp_path / "broken.jpg")}
    batch = collate_readable(task.collate)(items)
    assert batch["labels"].tolist() == [0, 0] and batch[SKIPPED] == [str(tmp_path / "broken.jpg")]
    # DataLoader workers: the name comes back with the batch, not on the workers' copies of the task
    loader = make_loader(SeededItems(train, seed=0), collate_readable(task.collate), 2, False, 0, num_workers=2)
    batches = list(loader)
    assert [b["labels"].tolist() for b in batches] == [[0], [0]]
    assert [b[SKIPPED] for b in batches] == [[str(tmp_path / "broken.jpg")], []]


def test_a_batch_of_only_unreadable_images_is_a_readable_stand_in_or_nothing(tmp_path):
    """A batch of unreadable images alone: the last readable item collated stands in (every rank keeps stepping);
    before any, the batch holds only the names."""
    dsd = _with_bad_files(tmp_path)
    task = ClassificationTask()
    task.image_column, task.label_column = "image", "label"
    from transformers import ViTImageProcessor

    train = task.prepare(dsd, ViTImageProcessor(size={"height": 8, "width": 8}), DataArgs(image_size=8))["train"]
    collate, broken = collate_readable(task.collate), str(tmp_path / "broken.jpg")
    assert collate(train.__getitems__([1])) == {SKIPPED: [broken]}
    first = collate(train.__getitems__([0]))
    again = collate(train.__getitems__([1]))
    assert again[SKIPPED] == [broken] and again["labels"].tolist() == [0]
    assert torch.equal(again["pixel_values"], first["pixel_values"])


def test_a_run_names_a_train_image_found_unreadable_in_a_loader_worker(
    tiny_vit_dir, colour_folder, tmp_path, monkeypatch, caplog
):
    """A train split checked as it is read (over the up-front limit; decoded every epoch) with two DataLoader
    workers: the unreadable image is skipped in a worker and named at the end of the epoch and in the results."""
    import shutil

    import hftl.image_check
    from hftl.runner import run
    from tests.fixtures.data import classification_argv

    monkeypatch.setattr(hftl.image_check, "UP_FRONT_MAX_ROWS", 0)
    data = shutil.copytree(colour_folder, tmp_path / "data")
    broken = data / "train" / "red" / "red_9.png"
    broken.write_bytes(b"not a png")
    extra = ["--num_epochs", "1", "--image_size", "32", "--num_workers", "2", "--decoded_cache_max_mb", "0"]
    args = classification_argv(data, tiny_vit_dir, tmp_path / "out", *extra, "--validation_split", "test")
    with caplog.at_level(logging.INFO, logger="hftl"):
        results = run("classification", args)
    assert results["skipped_images"] == {"train": [str(broken)]}
    assert results["num_samples"]["train"] == 48 and np.isfinite(results["history"][0]["train_loss"])
    assert f"epoch 1: skipped 1 unreadable train image(s): {broken}" in caplog.text


def test_a_run_with_batches_of_only_unreadable_images_trains_on(tiny_vit_dir, colour_folder, tmp_path, monkeypatch):
    """Batch size 1 and one readable train image: the unreadable ones read before it are skipped (no step), those
    after it take a step on it again; all are named."""
    import shutil

    import hftl.image_check
    from hftl.runner import run
    from tests.fixtures.data import classification_argv

    monkeypatch.setattr(hftl.image_check, "UP_FRONT_MAX_ROWS", 0)
    data = shutil.copytree(colour_folder, tmp_path / "data")
    broken = sorted(data.glob("train/*/*.png"))[1:]
    for path in broken:
        path.write_bytes(b"not a png")
    extra = ["--num_epochs", "1", "--image_size", "32", "--batch_size", "1", "--decoded_cache_max_mb", "0"]
    args = classification_argv(data, tiny_vit_dir, tmp_path / "out", *extra, "--validation_split", "test")
    results = run("classification", [*args, "--num_workers", "0"])
    assert results["skipped_images"] == {"train": sorted(map(str, broken))}
    assert 1 < results["train"]["steps"] < 48 and np.isfinite(results["history"][0]["train_loss"])

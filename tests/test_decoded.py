"""The decoded-image fast path: the same augmentation as the per-epoch PIL path, bounded memory, RGB, fallbacks."""

import io

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import ExifTags, Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2

from hftl.config import parse_config
from hftl.fastpaths.decoded_images import crop_min_area, decode_images, normalize_uint8, stored_size
from hftl.image_check import SKIPPED, collate_readable
from hftl.tasks import get_task
from hftl.trainer import SeededItems, make_loader
from tests.fixtures.data import launch_two_ranks


def _dataset(images: list[Image.Image], fmt: str = "PNG") -> Dataset:
    def encode(image):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return {"bytes": buffer.getvalue(), "path": None}

    features = Features({"image": ImageFeature(), "label": Value("int64")})
    return Dataset.from_dict({"image": [encode(im) for im in images], "label": [i % 2 for i in range(len(images))]},
                             features=features)  # fmt: skip


def _photos(size: tuple[int, int], count: int = 6) -> list[Image.Image]:
    """Crops of sklearn's sample photos: real texture, so a different crop box shows as a large difference."""
    out, photos = [], load_sample_images().images
    for i in range(count):
        photo = photos[i % 2]
        top, left = 37 * i, 53 * i
        out.append(Image.fromarray(photo[top : top + size[1], left : left + size[0]]))
    return out


def _task_and_processor(*args: str):
    from transformers import ViTImageProcessor

    config = parse_config(["--image_size", "32", "--crop_scale_min", "0.5", *args])
    task = get_task("classification", config)
    task.image_column, task.label_column = "image", "label"
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]
    )
    return task, processor, config


def test_decoded_items_match_the_per_epoch_pil_path():
    """Same seed, epoch and index: the same random crop and flip; pixels equal up to resampling rounding."""
    dataset = _dataset(_photos((48, 40)))  # smaller than the crop bound, so nothing is downscaled
    task, processor, config = _task_and_processor()
    pil = SeededItems(task.prepare(DatasetDict({"train": dataset}), processor, config.data)["train"], seed=3)
    decoded = SeededItems(task.decoded_train_split(dataset, processor, config.data), seed=3)
    assert decoded.dataset.images.megabytes == pytest.approx(6 * 3 * 48 * 40 / 2**20)
    for epoch in (0, 1):
        pil.set_epoch(epoch), decoded.set_epoch(epoch)
        for index in range(len(dataset)):
            want, got = pil[index], decoded[index]
            assert got["pixel_values"].dtype == torch.uint8 and got["labels"] == want["labels"]
            pixels = decoded.dataset.pixel_steps(got["pixel_values"][None])[0]
            difference = (pixels - want["pixel_values"]).abs()
            # torchvision's uint8 resize rounds like PIL's: at most a step of 1/255 (÷ std ≈ 0.02) apart here,
            # where another crop of a photo differs by ~1 on average
            assert difference.mean() < 0.002 and difference.max() < 0.03, (epoch, index, difference.mean())
    # and the draws differ between epochs (augmentation is not frozen by the cache)
    decoded.set_epoch(0)
    first = decoded[0]["pixel_values"]
    decoded.set_epoch(1)
    assert not torch.equal(first, decoded[0]["pixel_values"])


def test_train_crops_upsample_with_the_processors_interpolation():
    """Small images (Fashion-MNIST's 28 px) upsampled for training as the saved processor upsamples them for
    evaluation and pipeline(): bicubic here. Bilinear train crops against a bicubic processor cost 0.7 points."""
    from transformers import ViTImageProcessor

    dataset = _dataset(_photos((20, 20)))
    config = parse_config(["--image_size", "32", "--crop_scale_min", "1.0", "--hflip", "false"])
    task = get_task("classification", config)
    task.image_column, task.label_column = "image", "label"
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, resample=Image.Resampling.BICUBIC)
    decoded = SeededItems(task.decoded_train_split(dataset, processor, config.data), seed=0)
    decoded.set_epoch(0)
    for index, image in enumerate(_photos((20, 20))):
        train = decoded.dataset.pixel_steps(decoded[index]["pixel_values"][None])[0]
        evaluation = processor(image, return_tensors="pt")["pixel_values"][0]
        bilinear = v2.functional.resize(v2.functional.pil_to_tensor(image), [32, 32], antialias=True)
        old = decoded.dataset.pixel_steps(bilinear[None])[0]
        assert (train - evaluation).abs().mean() < 0.01, index
        assert (old - evaluation).abs().mean() > 3 * (train - evaluation).abs().mean(), index


@pytest.mark.device
def test_normalize_uint8_equals_torchvision_normalize():
    pixels = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    want = v2.Normalize(mean, std)(v2.ToDtype(torch.float32, scale=True)(pixels))
    assert torch.equal(normalize_uint8(pixels, mean, std), want)  # bit for bit: both paths train identically


def test_large_images_are_kept_only_as_large_as_the_smallest_crop_needs():
    min_area = crop_min_area(32, 0.5)  # 32² / (0.5 · 3/4)
    assert min_area == 2731
    photo = _photos((600, 400), count=1)[0]
    small = Image.new("RGB", (20, 30), (10, 200, 30))
    for fmt in ("PNG", "JPEG"):  # JPEG goes through draft(): decoded at a reduced scale
        images = decode_images(_dataset([photo, small], fmt), "image", min_area, max_mb=100)
        big = images[0]
        height, width = big.shape[1:]
        assert (width, height) == stored_size(600, 400, min_area)
        assert min_area <= width * height <= 1.05 * min_area and abs(width / height - 1.5) < 0.05
        # the smallest random crop (area 0.5, aspect 3:4) still has ≥ 32 pixels on its short side
        assert (0.5 * 0.75 * width * height) ** 0.5 >= 32
        reference = np.asarray(photo.resize((width, height), Image.Resampling.BOX)).transpose(2, 0, 1)
        assert np.abs(big.numpy().astype(int) - reference).mean() < 12, fmt
        assert tuple(images[1].shape) == (3, 30, 20) and images[1][:, 0, 0].tolist() == [10, 200, 30]


def test_grayscale_palette_and_transparent_images_become_rgb():
    gray = Image.new("L", (8, 8), 77)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: composited on white
    palette = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    images = decode_images(_dataset([gray, rgba, palette]), "image", 10_000, max_mb=1)
    assert [tuple(images[i].shape) for i in range(3)] == [(3, 8, 8)] * 3
    assert images[0][:, 4, 4].tolist() == [77, 77, 77]
    assert images[1][:, 4, 4].tolist() == [255, 255, 255]
    assert images[2][:, 4, 4].tolist() == [0, 0, 255]


def test_too_large_or_turned_off_falls_back_before_decoding():
    dataset = _dataset(_photos((48, 40)))
    assert decode_images(dataset, "image", 10_000, max_mb=0.01) is None  # 6 · 3 · 48 · 40 B = 0.03 MB
    assert decode_images(dataset, "image", 10_000, max_mb=0) is None
    assert decode_images(dataset, "image", 10_000, max_mb=0.05) is not None
    task, processor, config = _task_and_processor("--augment", "false")
    assert task.decoded_train_split(dataset, processor, config.data) is None  # the processed-tensor cache serves it
    arrays = Dataset.from_dict({"image": [[1, 2]], "label": [0]})  # not an encoded-image column
    assert decode_images(arrays, "image", 10_000, max_mb=100) is None


@pytest.mark.device
def test_loader_workers_give_the_same_augmented_batches_every_epoch():
    """Persistent DataLoader workers hold copies of the dataset: they must still see each new epoch's draws."""
    dataset = _dataset(_photos((48, 40), count=8))
    task, processor, config = _task_and_processor()
    epochs = {}
    for workers in (0, 2):
        split = SeededItems(task.decoded_train_split(dataset, processor, config.data), seed=0)
        loader = make_loader(split, task.collate, 4, False, 0, workers)
        epochs[workers] = []
        for epoch in range(3):
            split.set_epoch(epoch)
            epochs[workers].append(torch.cat([batch["pixel_values"] for batch in loader]))
    assert all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[2]))
    assert not torch.equal(epochs[2][0], epochs[2][1]) and not torch.equal(epochs[2][1], epochs[2][2])


@pytest.mark.device
def test_a_run_records_the_decoded_path_and_learns(tiny_vit_dir, colour_folder, tmp_path):
    from hftl.runner import run

    common = ["--dataset", str(colour_folder), "--model", str(tiny_vit_dir), "--num_epochs", "3", "--batch_size", "8",
              "--learning_rate", "3.0e-3", "--report_to", "none", "--seed", "0"]  # fmt: skip
    fast = run("classification", [*common, "--output_dir", str(tmp_path / "fast")])
    slow = run("classification", [*common, "--output_dir", str(tmp_path / "slow"), "--decoded_cache_max_mb", "0"])
    assert fast["train"]["decoded_images_mb"] > 0 and slow["train"]["decoded_images_mb"] is None
    assert fast["test"]["accuracy"] >= 0.9 and slow["test"]["accuracy"] >= 0.9
    # same crops, same arithmetic: the same training, loss for loss (these 32 px PNGs resample identically)
    fast_losses = [r["train_loss"] for r in fast["history"]]
    slow_losses = [r["train_loss"] for r in slow["history"]]
    assert fast_losses == slow_losses


def test_exif_orientation_is_applied_as_datasets_does():
    """A phone photo stored sideways with an EXIF orientation tag is kept the way datasets shows it."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    _photos((60, 40), count=1)[0].save(buffer, format="JPEG", exif=exif)
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict(
        {"image": [{"bytes": buffer.getvalue(), "path": None}], "label": [0]}, features=features
    )
    shown = np.asarray(dataset[0]["image"].convert("RGB")).transpose(2, 0, 1)
    assert shown.shape == (3, 60, 40)
    kept = decode_images(dataset, "image", 10_000, max_mb=1)[0].numpy()
    assert np.array_equal(kept, shown)


def test_images_are_decoded_as_first_read_and_an_unreadable_one_is_skipped_and_named(monkeypatch):
    """Nothing is decoded before training; the first epoch fills the buffer (the same pixels a replay reads from
    it, so a resumed epoch trains on identical tensors), and an image that cannot be decoded is dropped from its
    batch and named."""
    import hftl.fastpaths.decoded_images as decoded

    monkeypatch.setattr(decoded, "SAMPLE_ROWS", 2)  # the broken row is not among the headers read up front
    dataset = _dataset(_photos((48, 40), count=6))
    rows = dataset.to_dict()
    rows["image"][4] = {"bytes": b"not an image", "path": "broken.png"}
    dataset = Dataset.from_dict(rows, features=dataset.features)
    task, processor, config = _task_and_processor()
    split = SeededItems(task.decoded_train_split(dataset, processor, config.data), seed=0)
    images = split.dataset.images
    assert not images.shapes.any()  # not one image decoded yet
    loader = make_loader(split, collate_readable(task.collate), 4, False, 0, 0)
    batches = list(loader)
    first = [batch["pixel_values"] for batch in batches]
    assert [len(b) for b in first] == [4, 1]  # row 4 dropped from the second batch, and named with it
    assert [batch[SKIPPED] for batch in batches] == [[], ["broken.png"]]
    assert images.shapes[4].tolist() == [-1, -1] and (images.shapes[[0, 1, 2, 3, 5], 0] == 40).all()
    assert np.shares_memory(images[0].numpy(), images.buffer)  # later reads view the filled buffer
    replay = [batch["pixel_values"] for batch in loader]  # epoch 0 again, now from the buffer
    assert all(torch.equal(a, b) for a, b in zip(first, replay))


SHARED_CACHE_SCRIPT = """
import json, os, sys
from accelerate import Accelerator
import numpy as np
from PIL import Image
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
import hftl.fastpaths.decoded_images as decoded

accelerator = Accelerator(cpu=True)
writes = []
real_write = decoded._write
decoded._write = lambda *args: writes.append(1) or real_write(*args)
rng = np.random.default_rng(0)  # the same rows on both ranks
images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(10)]
features = Features({"image": ImageFeature(), "label": Value("int64")})
dataset = Dataset.from_dict({"image": images, "label": list(range(10))}, features=features)
kept = decoded.decode_images(dataset, "image", 10_000, max_mb=1)
accelerator.wait_for_everyone()  # the main process unlinks the file once every rank has mapped it
kept.fill(range(accelerator.process_index, 10, 2))  # each rank decodes half of the rows
accelerator.wait_for_everyone()
record = {
    "all_filled": bool((kept.shapes[:, 0] == 20).all()),  # the other rank's half included
    "writes": len(writes),
    "file": str(kept.buffer.filename),
    "left_on_disk": os.path.exists(kept.buffer.filename),
    "pixels_equal": all(np.array_equal(kept[i].numpy(), np.asarray(images[i]).transpose(2, 0, 1)) for i in range(10)),
}
with open(os.path.join(sys.argv[1], f"rank{accelerator.process_index}.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.mark.slow
def test_two_ranks_share_one_decoded_file_written_once(tmp_path):
    import json

    script = tmp_path / "shared.py"
    script.write_text(SHARED_CACHE_SCRIPT)
    launch_two_ranks(script, tmp_path, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["writes"] for r in ranks] == [1, 0]  # decoded once, by the node's main process
    assert ranks[0]["file"] == ranks[1]["file"]  # and both ranks map that one file
    assert not any(r["left_on_disk"] for r in ranks)  # unlinked once mapped: nothing left behind
    assert all(r["pixels_equal"] for r in ranks)
    assert all(r["all_filled"] for r in ranks)  # what one rank decoded, the other reads

"""The train split's data path alone (no model): the docs' per-epoch PIL pipeline vs hftl's, on photo-sized JPEGs.

Usage:
    python bench/train_data_path.py [--images 256 --image_size 224 --epochs 3]

On a GPU the model step of a small or medium network takes a few milliseconds per batch, so how many augmented
images per second the CPU side delivers decides the training speed. This times one DataLoader pass per epoch (one
process, no workers: per-core figures) over JPEG photos of 500x375 (crops of scikit-learn's sample photos), for:
- the transformers docs' recipe the baseline uses: decode, RandomResizedCrop, ToTensor, Normalize, every epoch;
- hftl with --decoded_cache_max_mb 0: the same work through hftl's seeded per-epoch path;
- hftl's default: images decoded once (booked to the first epoch), then uint8 crops and a per-batch normalisation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK  # noqa: E402


def write_photo_folder(root: Path, count: int) -> Path:
    """An imagefolder of `count` 500x375 JPEG crops (two classes: the two sample photos)."""
    marker = root / ".complete"
    if marker.exists():
        return root
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    photos = load_sample_images().images  # 427 x 640 each
    for i in range(count):
        label = i % 2
        top, left = rng.integers(0, 427 - 375), rng.integers(0, 640 - 500)
        crop = photos[label][top : top + 375, left : left + 500]
        folder = root / "train" / ("china" if label == 0 else "flower")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop[:, ::-1] if rng.random() < 0.5 else crop).save(folder / f"{i}.jpg", quality=90)
    marker.touch()
    return root


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    from datasets import load_dataset
    from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor
    from transformers import ViTImageProcessor

    from hftl.config import parse_config
    from hftl.fastpaths.decoded_images import normalize_uint8
    from hftl.tasks import get_task
    from hftl.trainer import SeededItems, make_loader

    data = write_photo_folder(WORK / "data" / f"photos-jpeg-{args.images}", args.images)
    train = load_dataset("imagefolder", data_dir=str(data))["train"]
    size = args.image_size
    processor = ViTImageProcessor(size={"height": size, "width": size})
    mean, std = processor.image_mean, processor.image_std
    config = parse_config(["--image_size", str(size)])
    task = get_task("classification", config)
    task.image_column, task.label_column = "image", "label"

    crop = RandomResizedCrop(size, scale=(config.data.crop_scale_min, 1.0))
    docs = Compose([crop, ToTensor(), Normalize(mean, std)])

    def docs_transform(batch):
        return {"pixel_values": [docs(image.convert("RGB")) for image in batch["image"]], "labels": batch["label"]}

    from datasets import DatasetDict

    per_epoch = task.prepare(DatasetDict({"train": train}), processor, config.data)["train"]
    timings = {}

    def passes(name: str, dataset, setup_seconds: float = 0.0) -> None:
        items = SeededItems(dataset, 0) if name != "docs recipe" else dataset
        seconds = []
        for epoch in range(args.epochs):
            if hasattr(items, "set_epoch"):
                items.set_epoch(epoch)
            started = time.perf_counter()
            for batch in make_loader(items, task.collate, args.batch_size, True, epoch, 0):
                if batch["pixel_values"].dtype == torch.uint8:  # what the device does in hftl's forward
                    normalize_uint8(batch["pixel_values"], mean, std)
            seconds.append(time.perf_counter() - started)
        seconds[0] += setup_seconds
        timings[name] = seconds

    passes("docs recipe", train.with_transform(docs_transform))
    passes("hftl per-epoch", per_epoch)
    started = time.perf_counter()
    decoded = task.decoded_train_split(train, processor, config.data)
    passes("hftl decoded once", decoded, time.perf_counter() - started)

    n = len(train)
    reference = timings["docs recipe"]
    print(f"{n} JPEG photos 500x375 → {size} px, batch {args.batch_size}, one process; images/s per epoch")
    print(f"decoded once: {decoded.images.megabytes:.0f} MB (stored at {tuple(decoded.images[0].shape[1:])} px)\n")
    print("| pipeline | first epoch | later epochs | later × docs |")
    print("|---|---|---|---|")
    for name, seconds in timings.items():
        later = sum(seconds[1:]) / max(1, len(seconds) - 1)
        ratio = (sum(reference[1:]) / max(1, len(reference) - 1)) / later
        print(f"| {name} | {n / seconds[0]:.0f} | {n / later:.0f} | {ratio:.2f} |")
    return timings


if __name__ == "__main__":
    main()

"""`--streaming`: train on a `datasets.IterableDataset` that never has to fit on disk or in memory.

Each rank reads its own shards (`split_dataset_by_node`) through a shuffle buffer whose order `set_epoch` reseeds.
An epoch is a number of samples (the split's row count, or --max_train_samples), the same on every rank, so the
ranks step together; a rank whose shards run out early reads them again. Everything is decided by (seed, epoch,
rank, position), so resuming skips exactly the samples already trained on. Images are decoded here, one by one: an
unreadable one is skipped, counted, and named at the end of the epoch (and in all_results.json). Evaluation uses a
fixed, non-streamed split: the dataset's own validation/test split when it has one, else the first rows of the
stream, held out of training.
"""

from __future__ import annotations

import math
import os

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict, IterableDataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node

from hftl.data import TEST_NAMES, VALIDATION_NAMES
from hftl.image_check import check_images, describe, image_ok
from hftl.log import get_logger

logger = get_logger(__name__)

HELD_OUT_ROWS = 1000  # rows of the stream kept for validation when the dataset has no validation split


def load_streams(data_args, seed: int):
    """(train IterableDataset, {"validation": Dataset, "test": Dataset}, rows per epoch)."""
    name, split = data_args.dataset, data_args.train_split
    if os.path.isdir(name):  # local files are memory-mapped: streaming them only changes how train is read
        from hftl.local_data import load_hub_layout, load_imagefolder

        local = load_hub_layout(name) or load_imagefolder(name)
        streams = {k: v.to_iterable_dataset(num_shards=min(len(v), 64)) for k, v in local.items()}
        rows = {k: len(v) for k, v in local.items()}
    else:
        streams = datasets.load_dataset(
            name, data_args.dataset_config, revision=data_args.dataset_revision, streaming=True
        )
        splits = streams[next(iter(streams))].info.splits or {}
        rows = {k: v.num_examples for k, v in splits.items()}
    if split not in streams:
        raise ValueError(f"Split {split!r} not found; the dataset has {list(streams)} (--train_split).")
    train = streams[split]
    limit = data_args.max_eval_samples
    fixed = {}
    for key, requested, names in (
        ("validation", data_args.validation_split, VALIDATION_NAMES),
        ("test", data_args.test_split, TEST_NAMES),
    ):
        found = requested or next((n for n in names if n in streams), None)
        if found is not None:
            fixed[key] = _materialize(streams[found], limit)
    held_out = 0
    if "validation" not in fixed:
        held_out = limit or HELD_OUT_ROWS
        if rows.get(split):
            held_out = min(held_out, math.ceil(data_args.validation_fraction * rows[split]))
        fixed["validation"] = _materialize(train, held_out)
        train = train.skip(held_out)
        logger.info(f"No validation split: the first {held_out} streamed rows are held out for validation.")
    fixed.setdefault("test", fixed["validation"])
    epoch_rows = data_args.max_train_samples or (rows.get(split) and rows[split] - held_out)
    if not epoch_rows:
        raise ValueError(
            "--streaming needs the train split's row count to define an epoch, and the dataset does not record it: "
            "pass --max_train_samples N (samples per epoch)."
        )
    return train, fixed, epoch_rows


def prepare_streaming(task, config, skipped: dict):
    """The streaming counterpart of runner.prepare_data: (DatasetDict whose train is a small head of the stream,
    for column detection and the transforms, DataSpec, (train stream, rows per epoch))."""
    data_args = config.data
    if task.name != "classification":
        raise ValueError(f"--streaming is implemented for classification, not {task.name}.")
    train, fixed, epoch_rows = load_streams(data_args, config.train.seed)
    head = _materialize(train, 16)
    dsd = DatasetDict({"train": head, **fixed})
    spec = task.data_spec(dsd, data_args)
    if not isinstance(head.features.get(spec.label_column), ClassLabel):
        raise ValueError(
            f"--streaming needs class names in the dataset's features (a ClassLabel column); {spec.label_column!r} "
            "is not one, and finding every name would read the whole stream."
        )
    fixed_checked, dropped = check_images(DatasetDict(fixed), spec.image_column, data_args.on_bad_image)
    skipped.update(dropped)
    dsd = DatasetDict({"train": head, **fixed_checked})
    return dsd, spec, (train, epoch_rows)


class StreamedSplit(torch.utils.data.IterableDataset):
    """This rank's share of a streamed split: `rows // world_size` transformed items per epoch."""

    def __init__(self, stream, transform, image_column, rows, seed, buffer_size, rank=0, world_size=1):
        stream = stream.cast_column(image_column, ImageFeature(decode=False))  # decoded here: bad ones skipped
        self.stream = split_dataset_by_node(stream.shuffle(seed=seed, buffer_size=buffer_size), rank, world_size)
        self.transform, self.image_column = transform, image_column
        self.per_rank, self.seed, self.rank = rows // world_size, seed, rank
        self.epoch, self.start, self.skipped = 0, 0, []

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0
        self.stream.set_epoch(epoch)

    def resume_at(self, samples: int) -> None:
        """The next epoch iterated starts after `samples` samples (those trained on before a checkpoint)."""
        self.start = samples

    def _good_rows(self):
        while True:
            produced = False
            for row in self.stream:
                item = row[self.image_column]
                if not image_ok(item):
                    if describe(item) not in self.skipped:
                        self.skipped.append(describe(item))
                    continue
                produced = True
                yield row
            if not produced:
                raise ValueError("The streamed train split gave no readable image on this rank.")

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("StreamedSplit reads in the main process: use num_workers 0 with --streaming.")
        rows = self._good_rows()
        bad_before = len(self.skipped)
        for position in range(self.per_rank):
            row = next(rows)
            if position < self.start:
                continue  # already trained on before the checkpoint: read (the order depends on it), not used
            row[self.image_column] = ImageFeature().decode_example(row[self.image_column])  # as datasets decodes
            with torch.random.fork_rng(devices=[]):
                key = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + position) * 1009 + self.rank
                torch.default_generator.manual_seed(key % (2**63))
                batch = self.transform({k: [v] for k, v in row.items()})
            yield {k: v[0] for k, v in batch.items()}
        self.start = 0
        if len(self.skipped) > bad_before:
            logger.info(
                f"rank {self.rank}, epoch {self.epoch}: skipped {len(self.skipped) - bad_before} unreadable streamed "
                f"image(s): {', '.join(self.skipped[bad_before:][:10])}",
                main_process_only=False,
            )


def _materialize(stream: IterableDataset, rows: int | None) -> Dataset:
    """The first `rows` rows (all when None) as a Dataset written to datasets' cache, not held in memory."""
    part = stream.take(rows) if rows else stream
    features = stream.features

    def generate():
        yield from part

    return Dataset.from_generator(generate, features=features, keep_in_memory=False)

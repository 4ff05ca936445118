"""`--streaming`: train on a `datasets.IterableDataset` that never has to fit on disk or in memory.

Each rank reads its own shards (`split_dataset_by_node`), dealt into lanes, each through a shuffle buffer whose order
`set_epoch` reseeds. An epoch is a number of samples (the split's row count, or --max_train_samples), the same on
every rank, so the ranks step together; a lane whose shards run out early reads them again. Batch b of a rank is
the next rows of lane b % lanes and DataLoader worker w makes the batches b % num_workers == w: with a worker count
that divides the lanes each worker reads only its own shards, and with any count the batches, and the seed of each
sample's augmentation (seed, epoch, rank, position), are what they are without workers, so resuming skips exactly
the samples already trained on. Images are decoded in the workers: an unreadable one is skipped and its name sent
with the batch (hftl/image_check.py), to be named at the end of the epoch and in all_results.json. Evaluation uses
a fixed, non-streamed split: the dataset's own validation/test split when it has one, else the first rows of the
stream, held out of training.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset
from datasets import Image as ImageFeature
from datasets.distributed import split_dataset_by_node

from hftl.data import TEST_NAMES, VALIDATION_NAMES
from hftl.image_check import UNREADABLE, describe, image_ok
from hftl.log import get_logger

logger = get_logger(__name__)

HELD_OUT_ROWS = 1000  # rows of the stream kept for validation when the dataset has no validation split
LANES = (8, 4, 2)  # lane counts tried, most first: then 1, 2, 4 or 8 workers each read shards of their own
LANE_BATCHES = 4  # fewest batches a lane makes per epoch (fewer lanes on tiny splits: a lane's supply is uneven)
CHUNK_ROWS = 64  # rows read from a lane at a time


def load_streams(data_args, seed: int):
    """(train IterableDataset, {"validation": Dataset, "test": Dataset}, rows per epoch)."""
    name, split = data_args.dataset, data_args.train_split
    if os.path.isdir(name):  # local files are memory-mapped: streaming them only changes how train is read
        from hftl.local_data import load_hub_layout, load_imagefolder

        local = load_hub_layout(name) or load_imagefolder(name)
        streams = {k: _local_stream(v) for k, v in local.items()}
        rows = {k: len(v) for k, v in local.items()}
    else:
        local = None
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
        # exact either way: skip(n) on a sharded stream skips n / shards rows of every shard, not the first n
        if local is not None:
            fixed["validation"] = local[split].select(range(held_out))
            train = _local_stream(local[split].select(range(held_out, len(local[split]))))
        else:
            fixed["validation"], train = hold_out(train, held_out)
        logger.info(f"No validation split: the first {held_out} streamed rows are held out for validation.")
    fixed.setdefault("test", fixed["validation"])
    epoch_rows = data_args.max_train_samples or (rows.get(split) and rows[split] - held_out)
    if not epoch_rows:
        raise ValueError(
            "--streaming needs the train split's row count to define an epoch, and the dataset does not record it: "
            "pass --max_train_samples N (samples per epoch)."
        )
    return train, fixed, epoch_rows


def prepare_streaming(task, config):
    """The streaming counterpart of runner.prepare_data: (DatasetDict whose train is a small head of the stream,
    for column detection and the transforms, DataSpec, (train stream, rows per epoch)). The fixed splits' images are
    checked by the caller, as on the non-streamed path (once, on the main process: runner.load_data)."""
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
    return dsd, spec, (train, epoch_rows)


class StreamedSplit(torch.utils.data.IterableDataset):
    """This rank's share of a streamed split: `rows // world_size` transformed items per epoch, yielded as lists of
    `batch_size` items (the last one shorter) that the loader's collate function makes into batches
    (DataLoader(batch_size=None)); a list also holds an item naming each image skipped while filling it."""

    def __init__(self, stream, transform, image_column, rows, seed, buffer_size, batch_size, rank=0, world_size=1):
        stream = stream.cast_column(image_column, ImageFeature(decode=False))  # decoded here: bad ones skipped
        self.per_rank, self.batch_size = rows // world_size, batch_size
        count = lane_count(stream.num_shards, world_size, math.ceil(self.per_rank / batch_size))
        lanes = [stream.shard(count, lane, contiguous=False) for lane in range(count)] if count > 1 else [stream]
        buffer = max(1, buffer_size // count)  # the lanes' buffers together hold --shuffle_buffer_size rows
        self.lanes = [
            split_dataset_by_node(lane.shuffle(seed=seed + i, buffer_size=buffer), rank, world_size)
            for i, lane in enumerate(lanes)
        ]
        self.transform, self.image_column, self.seed, self.rank = transform, image_column, seed, rank
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0
        for lane in self.lanes:
            lane.set_epoch(epoch)

    def resume_at(self, samples: int) -> None:
        """The next epoch iterated starts after `samples` samples (those trained on before a checkpoint)."""
        assert samples % self.batch_size == 0, "a stream resumes at a batch boundary"
        self.start = samples

    def _rows(self, lane: int):
        """The lane's rows, read again when they run out: a readable row, or the name of an unreadable image."""
        while True:
            readable = False
            # .iter, not a for loop over the dataset: inside a DataLoader worker that would split the lane's shards
            # among the workers again (datasets' own rule), and the lanes already decide who reads what
            for chunk in self.lanes[lane].iter(batch_size=CHUNK_ROWS):
                for i, item in enumerate(chunk[self.image_column]):
                    if image_ok(item):
                        readable = True
                        yield {k: v[i] for k, v in chunk.items()}
                    else:
                        yield describe(item)
            if not readable:
                raise ValueError("The streamed train split gave no readable image on this rank.")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches, count = math.ceil(self.per_rank / self.batch_size), len(self.lanes)
        # the lanes this worker makes batches from; it reads every batch of those lanes to know where its own start
        # (only its own, when the worker count divides the lanes)
        rows = {b % count: self._rows(b % count) for b in range(worker, batches, workers)}
        for b in range(batches):
            if b % count not in rows:
                continue
            size = min(self.batch_size, self.per_rank - b * self.batch_size)
            taken, bad = [], []
            while len(taken) < size:
                row = next(rows[b % count])
                (bad if isinstance(row, str) else taken).append(row)
            if b % workers != worker or b * self.batch_size < self.start:
                continue  # another worker's batch, or trained on before the checkpoint: read (it decides the order)
            positions = range(b * self.batch_size, b * self.batch_size + size)
            yield [{UNREADABLE: name} for name in bad] + [self._item(r, p) for r, p in zip(taken, positions)]

    def _item(self, row: dict, position: int) -> dict:
        row[self.image_column] = ImageFeature().decode_example(row[self.image_column])  # as datasets decodes
        with torch.random.fork_rng(devices=[]):
            key = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + position) * 1009 + self.rank
            torch.default_generator.manual_seed(key % (2**63))
            batch = self.transform({k: [v] for k, v in row.items()})
        return {k: v[0] for k, v in batch.items()}


def lane_count(num_shards: int, world_size: int, batches: int) -> int:
    """The most LANES that split the stream's shards evenly among ranks and lanes and each make LANE_BATCHES
    batches an epoch; 1 when none does (then each rank reads as `split_dataset_by_node` decides, and every worker
    reads all of its rank's shards, decoding only its own batches)."""
    fits = (n for n in LANES if num_shards % (n * world_size) == 0 and n * LANE_BATCHES <= batches)
    return next(fits, 1)


def hold_out(stream: IterableDataset, rows: int) -> tuple[Dataset, IterableDataset]:
    """(the first `rows` rows of the stream, the stream without them). Rows are told apart by a digest of their
    stored content (image bytes or path, every other column), so the split holds however the stream is later
    sharded across ranks, lanes and workers; a row identical to a held-out one is left out of training too."""
    images = [k for k, v in stream.features.items() if isinstance(v, ImageFeature)]
    raw = stream.cast(
        Features({k: ImageFeature(decode=False) if k in images else v for k, v in stream.features.items()})
    )
    held = _materialize(raw, rows)  # the stored bytes, not re-encoded images
    digests = frozenset(_digest(row) for row in held)
    train = raw.filter(functools.partial(_not_in, digests)).cast(stream.features)
    return held.cast(stream.features), train


def _digest(row: dict) -> bytes:
    return hashlib.blake2b(pickle.dumps(row, protocol=5), digest_size=16).digest()


def _not_in(digests: frozenset, row: dict) -> bool:
    return _digest(row) not in digests


def _local_stream(dataset: Dataset) -> IterableDataset:
    # a power of two, so that ranks and lanes (LANES) split the shards evenly
    return dataset.to_iterable_dataset(num_shards=min(64, 1 << max(0, len(dataset).bit_length() - 1)))


def _materialize(stream: IterableDataset, rows: int | None) -> Dataset:
    """The first `rows` rows (all when None) as a Dataset written to datasets' cache, not held in memory."""
    part = stream.take(rows) if rows else stream
    features = stream.features

    def generate():
        yield from part

    return Dataset.from_generator(generate, features=features, keep_in_memory=False)

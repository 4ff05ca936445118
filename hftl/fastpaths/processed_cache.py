"""Keep processed tensors of deterministic splits in memory: decode, resize and normalise each image once.

Evaluation transforms (the saved image processor) give the same tensor every epoch, so the validation split is
processed on first use and served from memory afterwards; so is the train split when augmentation is off. Items
are cached lazily, one by one, so every rank (and every persistent DataLoader worker) processes only the rows it
reads, and the first epoch costs what it did before. Splits whose tensors would exceed `CACHE_MAX_MB` are left as
they are.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

CACHE_MAX_MB = 2048  # per split and process; 0 turns caching off


class CachedSplit(Dataset):
    """Wraps a dataset (e.g. `datasets.Dataset.with_transform(...)`) whose items are deterministic."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.items: list = [None] * len(dataset)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if item is None:
            item = self.items[index] = self.dataset[index]
        return item

    def __getitems__(self, indices: list[int]) -> list:
        """Batched fetch (DataLoader uses it): missing rows are processed in one call, as without the cache."""
        missing = [i for i in indices if self.items[i] is None]
        if missing:
            fetch = getattr(self.dataset, "__getitems__", None)
            fetched = fetch(missing) if fetch else [self.dataset[i] for i in missing]
            for index, item in zip(missing, fetched):
                self.items[index] = item
        return [self.items[i] for i in indices]


def _item_megabytes(item) -> float:
    values = item.values() if isinstance(item, dict) else [item]
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)) / 2**20


def cache_processed(splits: dict, names: list[str], max_mb: float | None = None) -> dict:
    """A copy of `splits` where each named split whose processed tensors fit in `max_mb` is a `CachedSplit`."""
    if not names:
        return splits
    max_mb = CACHE_MAX_MB if max_mb is None else max_mb
    out = dict(splits)
    for name in names:
        dataset = splits.get(name)
        if dataset is None or not len(dataset) or max_mb <= 0:
            continue
        if _item_megabytes(dataset[0]) * len(dataset) <= max_mb:
            out[name] = CachedSplit(dataset)
    return out

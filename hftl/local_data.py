"""Local dataset folders: the Hub's own layout (parquet/arrow shards, `save_to_disk` output), and imagefolders
listed fast and remembered between launches.

`datasets`' imagefolder builder resolves its file list through fsspec pattern matching, ~0.5 ms per file, repeated on
every launch even when its cache is warm: 11 s at 20k images, over 10 minutes at ImageNet's 1.28M. Here the tree is
read once (`hftl.folder_listing`: little more than what walking it costs), with the same rules (split folders,
one sub-folder per class, datasets' image extensions), and the list is kept as an Arrow file next to datasets' cache.
The next launch reuses it when no folder's modification time changed (adding, removing or renaming a file changes
its folder's), which costs one `stat` per folder. Folders with metadata files (`metadata.csv`, …) or split keywords
only in file names go to datasets' builder, which owns those rules.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict
from datasets.data_files import EmptyDatasetError
from datasets.table import InMemoryTable

from hftl.folder_listing import IMAGE_EXTENSIONS, to_tables
from hftl.folder_listing import scan as _scan

TABLE_EXTENSIONS = (".parquet", ".arrow")
LISTING_VERSION = 1
# datasets writes image datasets 100 rows per Arrow record batch; opening its memory-mapped cache reads every batch's
# header, and the kernel maps 64 KB around each, so with small images (Fashion-MNIST: ~50 KB a batch) every page of
# the file counts in the process's RSS (bench/README.md's scale section). Batches of ~32 MB keep that to a few pages.
ARROW_BATCH_BYTES = 32 << 20


def load_hub_layout(path: str) -> DatasetDict | None:
    """The dataset a folder in the Hub's layout holds (save_to_disk output, or parquet/arrow shards as
    `snapshot_download(repo_type="dataset")` leaves them), or None when the folder is not one."""
    root = Path(path)
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
    elif _has_tables(root):
        # datasets infers the builder and the splits from the file names (train-00000-of-00004.parquet, data/…)
        loaded = datasets.load_dataset(str(root), writer_batch_size=_rows_per_record_batch(root))
    else:
        return None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})


def load_imagefolder(path: str, cache_dir: str | None = None) -> DatasetDict:
    """An imagefolder as datasets would read it (columns image, and label when there are class folders)."""
    root = Path(path).resolve()
    cache = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "hftl_imagefolder"
    cache = cache / hashlib.sha256(str(root).encode()).hexdigest()[:16]
    cached = _cached_listing(cache)
    if cached is not None:
        return cached
    listing = _scan(root)
    if listing is None:
        return datasets.load_dataset("imagefolder", data_dir=str(root))
    splits, folders = listing
    if not any(splits.values()):
        raise EmptyDatasetError(  # as datasets' builder does: callers name the layout
            f"No image files in {root} (none of datasets' image extensions). An imagefolder holds "
            "one sub-folder per class (optionally under train/, validation/, test/)."
        )
    tables = _named(to_tables(splits), folders)
    if _save_listing(tables, folders, cache):
        try:
            return _open_listing(cache, list(tables))
        except OSError:  # another launch replaced it meanwhile
            pass
    return DatasetDict({split: Dataset(InMemoryTable(table)) for split, table in tables.items()})


def _named(tables: dict[str, pa.Table], folders: dict[str, int]) -> dict[str, pa.Table]:
    """The tables with a fingerprint in datasets' metadata, which Dataset() then takes instead of hashing the whole
    dataset (the in-memory table) or its info (from a file: 60 ms with 1000 class names). It names what decides
    whether the listing is still valid: the folders and their modification times."""
    named = {}
    for split, table in tables.items():
        state = json.dumps([LISTING_VERSION, split, sorted(folders.items())]).encode()
        metadata = json.loads(table.schema.metadata[b"huggingface"])
        metadata["fingerprint"] = hashlib.sha256(state).hexdigest()[:16]
        named[split] = table.replace_schema_metadata({"huggingface": json.dumps(metadata)})
    return named


def _save_listing(tables: dict[str, pa.Table], folders: dict, cache: Path) -> bool:
    """Whether the listing was written (a read-only cache only costs the next launch a new scan)."""
    # plain Arrow files, not save_to_disk, which would copy every image's bytes into the cache
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split, table in tables.items():
            with pa.OSFile(str(tmp / f"{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
                out.write_table(table)
        record = {"version": LISTING_VERSION, "splits": list(tables), "folders": folders}
        (tmp / "listing.json").write_text(json.dumps(record))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        return True
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def _cached_listing(cache: Path) -> DatasetDict | None:
    try:
        record = json.loads((cache / "listing.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("version") != LISTING_VERSION:
        return None
    for folder, mtime in record["folders"].items():
        try:
            if os.stat(folder).st_mtime_ns != mtime:
                return None
        except OSError:
            return None
    return _open_listing(cache, record["splits"])


def _open_listing(cache: Path, splits: list[str]) -> DatasetDict:
    # memory-mapped: the listing costs no memory however many files it names
    return DatasetDict({split: Dataset.from_file(str(cache / f"{split}.arrow")) for split in splits})


def rows_per_record_batch(num_rows: int, num_bytes: int) -> int | None:
    """Rows per record batch of datasets' Arrow cache (its `writer_batch_size`) so that one batch holds
    ~ARROW_BATCH_BYTES, for data of `num_rows` rows and `num_bytes` uncompressed bytes; None (datasets' default) when
    either is unknown. datasets splits its readers' batches but never joins them: parquet files written in small row
    groups (older datasets releases wrote 100 rows for images) keep batches that small whatever this says (the
    parquet builder's `batch_size` option cannot join row groups either, and it would name another cache)."""
    if num_rows <= 0 or num_bytes <= 0:
        return None
    return int(min(max(ARROW_BATCH_BYTES * num_rows // num_bytes, 100), 100_000))


def _rows_per_record_batch(root: Path, sampled_files: int = 4) -> int | None:
    """`rows_per_record_batch` from the parquet footers' uncompressed sizes (a few files read, not the data); None
    for arrow shards."""
    rows = size = 0
    for file in sorted(root.rglob("*.parquet"))[:sampled_files]:
        metadata = pq.ParquetFile(file).metadata
        rows += metadata.num_rows
        size += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    return rows_per_record_batch(rows, size)


def _has_tables(root: Path, depth: int = 3) -> bool:
    """Whether parquet/arrow shards sit within `depth` folders of the root (data/, <config>/<split>/). A folder that
    holds an image file is an imagefolder's: the rest of its entries are not read."""
    level = [str(root)]
    for _ in range(depth):
        below = []
        for folder in level:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        below.append(entry.path)
                    elif entry.name.endswith(TABLE_EXTENSIONS):
                        return True
                    elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                        break
        level = below
    return False

"""Local dataset folders: the Hub's own layout (parquet/arrow shards, `save_to_disk` output), and imagefolders
listed fast and remembered between launches.

`datasets`' imagefolder builder resolves its file list through fsspec pattern matching, ~0.5 ms per file, repeated on
every launch even when its cache is warm: 11 s at 20k images, over 10 minutes at ImageNet's 1.28M. Here the tree is
walked once with `os.scandir` (what reading the file list costs and no more), with the same rules (split folders,
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
from datasets import ClassLabel, Dataset, DatasetDict, DatasetInfo, Features
from datasets import Image as ImageFeature
from datasets.data_files import EmptyDatasetError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from datasets.table import InMemoryTable

# datasets' split keywords for folder names (datasets/data_files.py), in its order of precedence
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)
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
    files, folders = listing
    if not any(files.values()):
        raise EmptyDatasetError(  # as datasets' builder does: callers name the layout
            f"No image files in {root} (none of datasets' image extensions). An imagefolder holds "
            "one sub-folder per class (optionally under train/, validation/, test/)."
        )
    dsd = _to_datasets(files)
    _save_listing(dsd, folders, cache)
    return _cached_listing(cache) or dsd


def _scan(root: Path):
    """({split: [file, ...]}, {folder: mtime_ns}) by os.scandir, or None when datasets' builder must decide."""
    # each folder is walked with the name of the root's entry it lies under: no per-file path arithmetic
    files: dict[str, list[str]] = {}
    folders = {}
    stack = [(str(root), None)]
    while stack:
        folder, top = stack.pop()
        folders[folder] = os.stat(folder).st_mtime_ns
        found = files.setdefault(top, []) if top is not None else None
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if entry.is_dir(follow_symlinks=True):
                    if not name.startswith("."):
                        stack.append((entry.path, name if top is None else top))
                elif name in ImageFolder.METADATA_FILENAMES:
                    return None
                elif name[name.rfind(".") :].lower() in IMAGE_EXTENSIONS:
                    (found if found is not None else files.setdefault("", [])).append(entry.path)
    split_of = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
    splits: dict[str, list[str]] = {}
    if any(top in split_of for top in files if top):
        for top, paths in files.items():
            if top in split_of:
                splits.setdefault(split_of[top], []).extend(paths)
    else:
        every = [f for paths in files.values() for f in paths]
        if any(_keyword_in_name(os.path.basename(f), split_of) for f in every):
            return None
        splits["train"] = every
    return {split: sorted(paths) for split, paths in splits.items()}, folders


def _keyword_in_name(name: str, keywords) -> bool:
    """datasets also splits by keywords in file names (train_001.png, cat.test.jpg): leave those to it."""
    stem = os.path.splitext(name)[0].lower()
    for sep in "-._ ":
        stem = stem.replace(sep, " ")
    return any(word in keywords for word in stem.split())


def _to_datasets(files: dict[str, list[str]]) -> DatasetDict:
    # datasets' rule: a label column when files sit at one depth in more than one folder
    folder_of = {split: [p.rsplit(os.sep, 2)[-2] for p in paths] for split, paths in files.items()}
    labels = sorted({name for names in folder_of.values() for name in names})
    depths = {f.count(os.sep) for paths in files.values() for f in paths}
    with_labels = len(labels) > 1 and len(depths) == 1
    features = Features({"image": ImageFeature(), **({"label": ClassLabel(names=labels)} if with_labels else {})})
    index = {name: i for i, name in enumerate(labels)}
    out = {}
    for split, paths in files.items():
        # Arrow columns built at once, in datasets' storage for the Image feature (struct of bytes, path): encoding
        # row by row (Dataset.from_dict) costs ~10x the walk that found the files
        image = pa.StructArray.from_arrays(
            [pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())], names=["bytes", "path"]
        )
        columns = {"image": image}
        if with_labels:
            columns["label"] = pa.array([index[name] for name in folder_of[split]], pa.int64())
        # named by its file list: datasets would otherwise hash the whole table to name it
        fingerprint = hashlib.sha256("\n".join([*labels, *paths]).encode()).hexdigest()[:16]
        out[split] = Dataset(InMemoryTable(pa.table(columns)), DatasetInfo(features=features), fingerprint=fingerprint)
    return DatasetDict(out)


def _save_listing(dsd: DatasetDict, folders: dict, cache: Path) -> None:
    # written as plain Arrow files, not save_to_disk, which would copy every image's bytes into the cache
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split, ds in dsd.items():
            table = ds.data.table
            with pa.OSFile(str(tmp / f"{split}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
                out.write_table(table)
        record = {"version": LISTING_VERSION, "splits": list(dsd), "folders": folders}
        (tmp / "listing.json").write_text(json.dumps(record))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    except OSError:  # a read-only cache only costs the next launch a new scan
        shutil.rmtree(tmp, ignore_errors=True)


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
    # memory-mapped: the listing costs no memory however many files it names
    return DatasetDict({split: Dataset.from_file(str(cache / f"{split}.arrow")) for split in record["splits"]})


def _rows_per_record_batch(root: Path, sampled_files: int = 4) -> int | None:
    """Rows per record batch of datasets' Arrow cache so that one batch holds ~ARROW_BATCH_BYTES, from the parquet
    footers' uncompressed sizes (a few files read, not the data); None (datasets' default) for arrow shards.
    datasets splits the parquet reader's batches but never joins them: files written in small row groups (datasets'
    own `to_parquet` writes 100 rows for images) keep batches that small."""
    rows = size = 0
    for file in sorted(root.rglob("*.parquet"))[:sampled_files]:
        metadata = pq.ParquetFile(file).metadata
        rows += metadata.num_rows
        size += sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    if not rows:
        return None
    return int(min(max(ARROW_BATCH_BYTES * rows // max(size, 1), 100), 100_000))


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

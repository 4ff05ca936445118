"""An imagefolder's file list, by datasets' rules, for little more than what walking the tree costs.

Every file is handled by Arrow and numpy kernels, never by a Python statement per file: the folders of one depth of
the tree are listed, then all their names are checked (extension), sorted (per folder) and joined to paths at once.
A Python loop per file (building the path, the extension check, sorted()) cost 3-5x the walk itself at 100k files
(bench/README.md, "Scale"). Folders are read in the process's cores' threads: listing one releases the GIL
while the kernel reads it. Rows come in the order of their paths, as sorted() gives them.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Features
from datasets import Image as ImageFeature
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from hftl.system import cores_per_local_process

# datasets' split keywords for folder names (datasets/data_files.py), in its order of precedence
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)
# as sorted big-endian integers by length (".ps" to ".jpeg"): all names' last bytes compared at once
_EXTENSIONS = {
    n: np.sort(np.array([int.from_bytes(e.encode(), "big") for e in IMAGE_EXTENSIONS if len(e) == n], np.uint64))
    for n in sorted({len(e) for e in IMAGE_EXTENSIONS})
}
_HIGH_BITS = np.uint64(int.from_bytes(b"\x80" * max(_EXTENSIONS), "big"))  # a non-ASCII byte in the last ones
_METADATA = pa.array([name.encode() for name in ImageFolder.METADATA_FILENAMES], pa.binary())
# a split keyword as a whole word of a file name: words end at "-._", white space (str.split's) or the extension's dot
_SEPARATORS = r"-._\s\x0b\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_KEYWORDS = "|".join(name for names in SPLIT_FOLDERS.values() for name in names)
_KEYWORD_WORD = f"(?:^|[{_SEPARATORS}])(?:{_KEYWORDS})[{_SEPARATORS}]"
_CHUNKS = 32  # a depth's folders are read in this many tasks: a task per folder cost more than small folders' listing
_FEW = 8  # a leaf folder's non-image names are stat-ed up to this many, else the folder is read again by scandir

Runs = list[tuple[str, pa.StringArray]]  # (folder, the names of its image files), in the order of their paths


def scan(root) -> tuple[dict[str, Runs], dict[str, int]] | None:
    """({split: runs}, {folder: mtime_ns}), or None when datasets' builder must decide (metadata files, or split
    keywords only in file names). Splits are folders under the root named as datasets' split keywords, else all is
    "train"; folders whose name starts with "." are skipped (files are not), symlinked folders followed."""
    folders: dict[str, int] = {}
    listed: dict[str, tuple[pa.StringArray, list[str]]] = {}  # folder: (its image names, sorted; its sub-folders)
    depth = [str(root)]
    with ThreadPoolExecutor(cores_per_local_process()) as pool:
        while depth:
            found = _list_folders(depth, folders, pool.map if len(depth) > 1 else map)
            if found is None:
                return None
            listed.update(found)
            depth = [
                prefix + sub for folder in depth if (prefix := os.path.join(folder, "")) for sub in listed[folder][1]
            ]

    runs: list[tuple[str | None, str, pa.StringArray]] = []  # (the root's entry it lies under, folder, names)

    def in_path_order(folder: str, top: str | None) -> None:
        names, subfolders = listed[folder]
        done, prefix = 0, os.path.join(folder, "")
        for sub in sorted(subfolders, key=lambda name: name + os.sep):  # a folder's paths sort as its name + "/"
            end = pc.sum(pc.less(names, sub + os.sep)).as_py() or 0 if len(names) else 0
            runs.append((top, folder, names[done:end]))
            done = end
            in_path_order(prefix + sub, sub if top is None else top)
        runs.append((top, folder, names[done:]))

    in_path_order(str(root), None)
    tops = listed[str(root)][1]
    runs = [run for run in runs if len(run[2])]
    split_of = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}
    if any(top in split_of for top in tops):
        splits = {split: [] for split in SPLIT_FOLDERS if split in {split_of.get(top) for top in tops}}
        for top, folder, names in runs:
            if top in split_of:
                splits[split_of[top]].append((folder, names))
        return splits, folders
    if runs and pc.any(pc.match_substring_regex(pc.ascii_lower(_concat(runs)), _KEYWORD_WORD)).as_py():
        return None  # train_001.png, cat.test.jpg: datasets splits by keywords in file names too
    return {"train": [(folder, names) for _, folder, names in runs]}, folders


def to_tables(splits: dict[str, Runs]) -> dict[str, pa.Table]:
    """Each split's Arrow table in datasets' storage (image: struct of bytes and path; label: its folder's index)."""
    # datasets' rule: a label column when files sit at one depth in more than one folder
    runs = [run for split_runs in splits.values() for run in split_runs]
    labels = sorted({os.path.basename(folder) for folder, _ in runs})
    depths = {folder.count(os.sep) + 1 for folder, _ in runs}
    with_labels = len(labels) > 1 and len(depths) == 1
    features = Features({"image": ImageFeature(), **({"label": ClassLabel(names=labels)} if with_labels else {})})
    index = {name: i for i, name in enumerate(labels)}
    schema = features.arrow_schema
    tables = {}
    for split, split_runs in splits.items():
        counts = [len(names) for _, names in split_runs]
        paths = _paths(split_runs, counts)
        columns = [pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), paths], names=["bytes", "path"])]
        if with_labels:
            label = np.array([index[os.path.basename(folder)] for folder, _ in split_runs], np.int64)
            columns.append(pa.array(np.repeat(label, counts)))
        tables[split] = pa.Table.from_arrays(columns, schema=schema)
    return tables


def _paths(runs: Runs, counts: list[int]) -> pa.StringArray:
    if not runs:
        return pa.array([], pa.string())
    prefixes = [os.path.join(folder, "") for folder, _ in runs]
    if sum(counts) >= 256 * len(runs):  # a folder's path put before all its names: ~5x faster per file, 20 us a call
        with ThreadPoolExecutor(cores_per_local_process()) as pool:  # Arrow's kernels release the GIL
            joined = pool.map(lambda p, names: pc.binary_replace_slice(names, 0, 0, p), prefixes, [n for _, n in runs])
            return pa.concat_arrays(list(joined))
    each = pa.array(prefixes, pa.string()).take(np.repeat(np.arange(len(runs)), counts))
    return pc.binary_join_element_wise(each, _concat(runs), "")


def _read_folders(chunk: list[str]) -> tuple[list[int], pa.BinaryArray, list[int], list[list[str] | None]]:
    """The folders' modification times, the names of their entries but sub-folders (one array, folder after
    folder), how many each, and their sub-folders (None: not known yet)."""
    mtimes, lists, subfolders = [], [], []
    for folder in chunk:
        stat = os.stat(folder)
        mtimes.append(stat.st_mtime_ns)
        if stat.st_nlink == 2:
            # a folder's link count is 2 + its sub-folders where the file system keeps it (ext4, xfs, tmpfs): here
            # none, so one C-built list of names; only names that are not images can be folders (symlinks to one;
            # the one thing read otherwise than by scandir: a symlink named like an image that points at a folder)
            lists.append(os.listdir(os.fsencode(folder)))
            subfolders.append(None)
        else:  # sub-folders, or a file system that does not count them (btrfs: 1): the entries' types from scandir
            with os.scandir(os.fsencode(folder)) as entries:
                types = [(entry.name, entry.is_dir()) for entry in entries]
            lists.append([name for name, is_dir in types if not is_dir])
            subfolders.append([os.fsdecode(name) for name, is_dir in types if is_dir])
    names = pa.array(list(itertools.chain.from_iterable(lists)), pa.binary())
    return mtimes, names, [len(names) for names in lists], subfolders


def _list_folders(
    batch: list[str], folders: dict[str, int], read_all=map
) -> dict[str, tuple[pa.StringArray, list[str]]] | None:
    """{folder: (its image file names, sorted; its sub-folders but hidden ones)}, or None when one holds metadata.
    `read_all`: the map that reads chunks of folders (a thread pool's: the kernel lists a folder without the GIL)."""
    size = -(-len(batch) // _CHUNKS)
    read = list(read_all(_read_folders, [batch[i : i + size] for i in range(0, len(batch), size)]))
    folders.update(zip(batch, itertools.chain.from_iterable(mtimes for mtimes, *_ in read)))
    names = pa.concat_arrays([names for _, names, *_ in read])
    counts = list(itertools.chain.from_iterable(counts for *_, counts, _ in read))
    subfolders = list(itertools.chain.from_iterable(subs for *_, subs in read))
    of = np.repeat(np.arange(len(batch)), counts)  # each name's folder
    is_image = _is_image(names)
    other_rows = np.flatnonzero(~is_image)  # few: what else is in the folders
    others = np.bincount(of[other_rows], minlength=len(batch))
    to_stat = np.zeros(len(batch), bool)
    for i in [i for i, subs in enumerate(subfolders) if subs is None]:
        if others[i] > _FEW:
            with os.scandir(batch[i]) as entries:
                subfolders[i] = [entry.name for entry in entries if entry.is_dir()]
        else:
            subfolders[i], to_stat[i] = [], True
    for row in other_rows[to_stat[of[other_rows]]]:
        name = os.fsdecode(names[int(row)].as_py())
        if os.path.isdir(os.path.join(batch[of[row]], name)):
            subfolders[of[row]].append(name)
    metadata = pc.is_in(names.take(other_rows), value_set=_METADATA).to_numpy(zero_copy_only=False)
    for row in other_rows[metadata]:
        if names[int(row)].as_py().decode() not in subfolders[of[row]]:
            return None
    rows = np.flatnonzero(is_image)
    of = of[rows]
    try:
        images = names.take(rows[_sort_order(names, rows, of)]).cast(pa.string())
    except pa.ArrowInvalid:
        i, bad = next((i, name) for i, name in enumerate(names.take(rows).to_pylist()) if not _is_utf8(name))
        raise ValueError(f"Image file name {bad!r} in {batch[of[i]]} is not UTF-8: rename it (convmv).") from None
    ends = np.cumsum(np.bincount(of, minlength=len(batch))).tolist()
    return {
        folder: (images[start:end], [name for name in subs if not name.startswith(".")])
        for folder, subs, start, end in zip(batch, subfolders, [0, *ends], ends)
    }


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode()
    except UnicodeDecodeError:
        return False
    return True


def _is_image(names: pa.BinaryArray) -> np.ndarray:
    """Whether each name ends in one of datasets' image extensions, in any case (the rule: the name from its last dot,
    lower-cased, is one), from the last bytes of all names at once; names with non-ASCII bytes there by str.lower()."""
    key = _ascii_lower(_word(names, -8))
    is_image = np.zeros(len(names), bool)
    for length, extensions in _EXTENSIONS.items():
        is_image |= np.isin(key & np.uint64(256**length - 1), extensions)
    for row in np.flatnonzero(key & _HIGH_BITS):
        name = os.fsdecode(names[int(row)].as_py())
        is_image[row] = name[name.rfind(".") :].lower() in IMAGE_EXTENSIONS
    return is_image


def _ascii_lower(key: np.ndarray) -> np.ndarray:
    """Each byte of the integers lower-cased where it is an ASCII capital, 8 bytes an operation: a bit 7 set in each
    byte by adding "at least A" and "above Z" thresholds to its low 7 bits (no carry crosses bytes), 0x20 or-ed in."""
    ones, high = np.uint64(0x0101010101010101), np.uint64(0x8080808080808080)
    low7 = key & ~high
    upper = (low7 + ones * np.uint64(0x80 - ord("A"))) & ~(low7 + ones * np.uint64(0x80 - ord("Z") - 1)) & ~key & high
    return key | (upper >> np.uint64(2))


def _sort_order(names: pa.BinaryArray, rows: np.ndarray, of: np.ndarray) -> np.ndarray:
    """The order of names[rows] by folder (`of`, ascending), then by their bytes (= code points: what sorted() gives),
    at numpy's speed: one argsort of (folder, 7 bytes of each name from where its folder's names start to differ),
    then a sort by all bytes of the few names that tie there."""
    if len(rows) < 2:
        return np.arange(len(rows))
    starts = np.flatnonzero(np.diff(of, prepend=-1))  # a folder's names are contiguous
    folder = np.repeat(np.arange(len(starts)), np.diff(starts, append=len(of)))
    word = _word(names, 0)[rows]
    shared = _shared_prefix(lambda at: _word(names, at)[rows], word, starts, folder)
    for skip in np.unique(shared[shared > 0]):
        if (shared == skip).all():
            word = _word(names, int(skip))[rows]
        else:
            some = np.flatnonzero(shared[folder] == skip)
            word[some] = _word(names.take(rows[some]), int(skip))
    bits = int(of.max()).bit_length()
    key = word if not bits else (of.astype(np.uint64) << np.uint64(64 - bits)) | (word >> np.uint64(bits))
    order = np.argsort(key)
    tied = np.diff(key[order]) == 0
    if tied.any():
        some = np.zeros(len(order), bool)
        some[1:] |= tied
        some[:-1] |= tied
        group = order[some]
        tie = names.take(rows[group])
        words = [_word(tie, at) for at in reversed(range(0, pc.max(pc.binary_length(tie)).as_py(), 8))]
        order[some] = group[np.lexsort([*words, of[group]])]
    return order


def _shared_prefix(word_at, word: np.ndarray, starts: np.ndarray, folder: np.ndarray) -> np.ndarray:
    """For each folder, how many first bytes all its names share (`word`: the names' first 8 bytes, `word_at(i)`:
    their bytes i..i+7)."""
    shared = np.zeros(len(starts), np.int64)
    pending = np.diff(starts, append=len(folder)) > 1
    at = 0
    while pending.any() and at < 4096:  # names are unique in a folder and at most 255 bytes: they differ before
        different = np.bitwise_or.reduceat(word ^ word[starts][folder], starts)
        leading = np.where(different == 0, 8, (different.astype(">u8").view(np.uint8).reshape(-1, 8) != 0).argmax(1))
        shared[pending] += leading[pending]
        pending &= different == 0
        at += 8
        if pending.any():
            word = word_at(at)
    return shared


def _word(names: pa.BinaryArray, start: int) -> np.ndarray:
    """Bytes start..start+7 of each name (start -8: its last 8) as one big-endian integer, zeros outside the name."""
    return _eight_bytes(names, start).view(">u8")[:, 0].astype(np.uint64)


def _eight_bytes(names: pa.BinaryArray, start: int) -> np.ndarray:
    """Bytes start..start+7 of each name (start -8: its last 8) as the rows of a matrix, zeros outside the name: Arrow
    slices every name and pads it to 8 bytes, so the result's bytes are the matrix."""
    if not len(names):
        return np.zeros((0, 8), np.uint8)
    if pc.min(pc.binary_length(names)).as_py() >= (8 if start < 0 else start + 8):  # no name to pad: one pass
        padded = pc.binary_slice(names, start, start + 8 or None)
    elif start < 0:
        padded = pc.binary_slice(pc.binary_replace_slice(names, 0, 0, bytes(8)), start, start + 8 or None)
    elif start == 0:
        padded = pc.binary_slice(pc.binary_replace_slice(names, 1 << 30, 1 << 30, bytes(8)), 0, 8)
    else:
        sliced = pc.binary_slice(names, start, start + 8)
        padded = pc.binary_slice(pc.binary_replace_slice(sliced, 8, 8, bytes(8)), 0, 8)
    first = np.frombuffer(padded.buffers()[1], np.int32)[padded.offset]
    return np.frombuffer(padded.buffers()[2], np.uint8, 8 * len(names), first).reshape(-1, 8)


def _concat(runs) -> pa.StringArray:
    return pa.concat_arrays([names for *_, names in runs])

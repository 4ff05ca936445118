"""The bad-image check: every image of every split opened once, cheaply and in parallel, before training.

Cost follows the images, never the split in memory: a split is read in batches of encoded images (one batch at a
time, so a Hub-layout split of 140 GB needs no more memory than a folder of files), each image is opened in a thread
pool (PIL releases the GIL while decoding) and JPEGs are decoded at 1/8 scale (`draft`), which still reads every
byte of the entropy-coded data, so a truncated file fails here and not mid-epoch. Splits that are the same rows
(the test split falling back to validation) are checked once. All splits are checked before anything is reported.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

from datasets import DatasetDict
from datasets import Image as ImageFeature
from PIL import Image, UnidentifiedImageError

from hftl.log import get_logger
from hftl.system import cores_per_local_process

logger = get_logger(__name__)

BATCH_ROWS = 1024  # encoded images held at once per split (x the pool's threads in flight)
SHOWN = 10  # bad files named per split in an error message
UP_FRONT_MAX_ROWS = 10_000  # larger train splits are checked as they are read (~0.3 ms an image up front)


def find_bad_images(dsd: DatasetDict, image_column: str) -> dict[str, list[tuple[int, str]]]:
    """{split: [(row, file name or size), ...]} for every split holding an image column; a split that is the same
    rows as an earlier one gets the earlier one's list without a second pass."""
    found, seen = {}, {}
    for split, ds in dsd.items():
        if not isinstance(ds.features.get(image_column), ImageFeature):
            continue
        key = (ds._fingerprint, len(ds))
        if key not in seen:
            seen[key] = _scan(ds, image_column)
        found[split] = seen[key]
    return found


def check_images(
    dsd: DatasetDict,
    image_column: str,
    on_bad_image: str = "error",
    up_front_max_rows: int | None = None,
    shared: bool = False,
):
    """Returns (the splits without unreadable images, {split: [skipped file, ...]}). With on_bad_image 'error',
    raises naming the bad files of every split instead. A train split over `up_front_max_rows` rows is not opened
    here (that would cost more than seconds): its images are checked as they are read (`decode_or_none`, or the
    decoded-image cache). `shared`: called by every rank at once; the main process opens the images and the others
    get the list of bad rows from it (all ranks hold the same rows)."""
    limit = UP_FRONT_MAX_ROWS if up_front_max_rows is None else up_front_max_rows
    deferred = "train" in dsd and len(dsd["train"]) > limit
    if deferred and _is_main(shared):
        logger.info(
            f"train: {len(dsd['train'])} rows, over {limit}: its images are checked as they are read (unreadable ones "
            "skipped and named in all_results.json), not before training."
        )
    checked = DatasetDict({k: v for k, v in dsd.items() if not (deferred and k == "train")})
    bad = _shared_result(lambda: find_bad_images(checked, image_column), shared)
    bad = {split: rows for split, rows in bad.items() if rows}
    if bad and on_bad_image == "error":
        lines = []
        for split, rows in bad.items():
            shown = ", ".join(f"row {i} ({what})" for i, what in rows[:SHOWN])
            more = f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else ""
            lines.append(f"  {split}: {len(rows)} unreadable: {shown}{more}")
        raise ValueError(
            "Unreadable images found:\n" + "\n".join(lines) + "\nFix or remove them, or pass --on_bad_image skip "
            "to drop them (they are named in all_results.json)."
        )
    out, skipped, dropped = {}, {}, {}
    for split, ds in dsd.items():
        rows = bad.get(split)
        if rows:
            key = (ds._fingerprint, len(ds))
            if key not in dropped:  # the same rows (validation reused as test) are dropped once and shared
                drop = {i for i, _ in rows}
                dropped[key] = ds.select([i for i in range(len(ds)) if i not in drop])
            skipped[split] = [what for _, what in rows]
            ds = dropped[key]
        out[split] = ds
    if skipped and _is_main(shared):
        unique = len({name for names in skipped.values() for name in names})
        per_split = ", ".join(f"{split} {len(names)}" for split, names in skipped.items())
        logger.info(
            f"Skipping {unique} unreadable image(s) ({per_split}); named in all_results.json under 'skipped_images'."
        )
    return DatasetDict(out), skipped


def _is_main(shared: bool) -> bool:
    if not shared:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def _shared_result(compute, shared: bool):
    """compute() here, or with `shared` on the main process only, its value sent to every rank."""
    if not shared:
        return compute()
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return compute()
    value = [compute() if state.is_main_process else None]
    broadcast_object_list(value)
    return value[0]


# Images skipped as they are read travel with the data, as values: a DataLoader worker's objects are copies, so a
# list kept on the dataset or the task there never reaches the training loop. A train item that stands for such an
# image holds only its name under UNREADABLE; `collate_readable` drops those items and hands their names on under
# SKIPPED in the batch, which the training loop takes out (hftl/trainer.py).
UNREADABLE = "unreadable_image"
SKIPPED = "skipped_images"


def decode_or_none(item):
    """An encoded image ({"bytes", "path"}) decoded exactly as datasets decodes it, or None when it cannot be read;
    an already decoded image is returned as it is."""
    if not isinstance(item, dict):
        return item
    try:
        return ImageFeature().decode_example(item)
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError):
        logger.info(f"skipped an unreadable image: {describe(item)}", main_process_only=False)
        return None


class collate_readable:  # noqa: N801 (used as a function; a class so that DataLoader workers can pickle it)
    """`collate` over the readable items of a train batch; the batch's SKIPPED lists the names of the others.

    A batch with no readable item is the last readable item this copy collated (each DataLoader worker has its own),
    trained on once more, so that every rank still takes its step (a rank that skips one stalls the others' gradient
    all-reduce); before any readable item the batch holds only SKIPPED, which the training loop skips."""

    def __init__(self, collate):
        self.collate = collate
        self.stand_in = None

    def __call__(self, examples: list) -> dict:
        names = [e[UNREADABLE] for e in examples if e.get(UNREADABLE)]
        readable = [e for e in examples if not e.get(UNREADABLE)]
        if readable:
            self.stand_in = readable[-1]
        elif self.stand_in is not None:
            readable = [self.stand_in]
        batch = self.collate(readable) if readable else {}
        batch[SKIPPED] = names
        return batch


def image_ok(item) -> bool:
    """Whether an encoded image ({"bytes", "path"} as datasets stores it) opens and decodes."""
    if item is None:
        return False
    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        with Image.open(source) as image:
            image.draft(image.mode, (1, 1))  # JPEG: decode at the smallest DCT scale; no-op for other formats
            image.load()
        return True
    except (UnidentifiedImageError, OSError, ValueError, TypeError, SyntaxError):
        return False


def describe(item) -> str:
    if item is None:
        return "missing"
    return item.get("path") or f"{len(item.get('bytes') or b'')} bytes"


def _scan(ds, image_column: str) -> list[tuple[int, str]]:
    raw = ds.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    bad, start = [], 0
    with ThreadPoolExecutor(cores_per_local_process()) as pool:
        for batch in raw.iter(batch_size=BATCH_ROWS):
            column = batch[image_column]
            for offset, ok in enumerate(pool.map(image_ok, column)):
                if not ok:
                    bad.append((start + offset, describe(column[offset])))
            start += len(column)
    return bad

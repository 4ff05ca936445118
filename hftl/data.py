"""Datasets from the Hub, a local folder or the bundled set; splits, subsets, few-shot sampling, image checks.

Everything here runs before any model is loaded, so a bad dataset fails in seconds with a message that says
what to change.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import defaultdict

from datasets import ClassLabel, Dataset, DatasetDict, concatenate_datasets

from hftl.log import get_logger
from hftl.system import return_arrow_memory_to_the_os

logger = get_logger(__name__)

# conventional names of the image column, in the order they are preferred when a dataset has several
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "photo", "pixel_values")
# each row's number before any subsampling: an image id where the data has none, and a row to name in errors
ROW_COLUMN = "hftl_row"
VALIDATION_NAMES = ("validation", "valid", "val", "dev", "eval")
TEST_NAMES = ("test", "testing")


def add_row_numbers(dsd: DatasetDict) -> DatasetDict:
    """Adds the `ROW_COLUMN` to every split that lacks it."""
    return DatasetDict(
        {
            split: ds if ROW_COLUMN in ds.column_names else ds.add_column(ROW_COLUMN, list(range(len(ds))))
            for split, ds in dsd.items()
        }
    )


def load_dataset_dict(data_args, task) -> DatasetDict:
    from hftl.bundled import BUNDLED_DATASETS, load_bundled_dataset

    return_arrow_memory_to_the_os()
    name = data_args.dataset
    if name in BUNDLED_DATASETS:
        return load_bundled_dataset(name)
    if os.path.isdir(name):
        from hftl.local_data import load_hub_layout

        return load_hub_layout(name) or task.load_local(name, data_args)
    if os.path.exists(name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"Dataset path {name!r} is not a folder.")
    import datasets

    from hftl.modeling import check_hub_repo

    # one metadata request: a mistyped name is named in a second, not after ~27 s of download retries
    repo_info = check_hub_repo(
        name,
        data_args.dataset_revision,
        repo_type="dataset",
        not_found_hint=f"It is not a bundled name ({', '.join(BUNDLED_DATASETS)}) nor a local folder "
        f"here ({os.getcwd()}): check the name or path; for a private dataset set HF_TOKEN or run `hf auth login`.",
    )
    rows_per_batch = _rows_per_record_batch_from_card(repo_info, data_args.dataset_config)
    try:
        loaded = datasets.load_dataset(
            name, data_args.dataset_config, revision=data_args.dataset_revision, writer_batch_size=rows_per_batch
        )
    except Exception as error:  # the datasets library raises many types here; all mean "cannot get it"
        raise ValueError(
            f"Dataset {name!r} could not be loaded ({type(error).__name__}: {error}). It is not a bundled name "
            f"({', '.join(BUNDLED_DATASETS)}), nor a local folder; as a Hub id it needs network access, or a local "
            "endpoint (`hftl hub serve` + HF_ENDPOINT)."
        ) from None
    if not isinstance(loaded, DatasetDict):
        loaded = DatasetDict({"train": loaded})
    return loaded


def _rows_per_record_batch_from_card(repo_info, config_name: str | None) -> int | None:
    """`hftl.local_data.rows_per_record_batch` from the split sizes the dataset card records (`dataset_info`, which
    `push_to_hub` writes), already fetched with the repo's info: nothing is read before the download. None (datasets'
    default) when the card has no sizes for the config that loads."""
    from datasets.info import DatasetInfosDict

    from hftl.local_data import rows_per_record_batch

    card = getattr(repo_info, "card_data", None)
    if not card:
        return None
    card = card.to_dict()
    try:
        infos = DatasetInfosDict.from_dataset_card_data(card)
    except (TypeError, ValueError, KeyError, AttributeError):  # a malformed card costs the default batching only
        return None
    if config_name is None:  # the config datasets loads without a name: the card's default, "default", the only one
        flagged = [c.get("config_name") for c in card.get("configs") or [] if isinstance(c, dict) and c.get("default")]
        if flagged:
            config_name = flagged[0]
        else:
            config_name = "default" if "default" in infos or len(infos) != 1 else next(iter(infos))
    info = infos.get(config_name)
    if info is None or not info.splits:
        return None
    splits = info.splits.values()
    return rows_per_record_batch(
        sum(split.num_examples or 0 for split in splits), sum(split.num_bytes or 0 for split in splits)
    )


def standard_splits(dsd: DatasetDict, data_args, seed: int, stratify_column: str | None = None) -> DatasetDict:
    """Returns train/validation/test. A missing validation split is carved from train (stratified when labels
    allow); a missing test split falls back to validation (and says so)."""
    if data_args.train_split not in dsd:
        raise ValueError(f"Split {data_args.train_split!r} not found; the dataset has {list(dsd)} (--train_split).")
    train = dsd[data_args.train_split]
    validation = _pick(dsd, data_args.validation_split, VALIDATION_NAMES, "--validation_split")
    test = _pick(dsd, data_args.test_split, TEST_NAMES, "--test_split")
    if validation is None:
        train, validation = carve_validation(train, data_args.validation_fraction, seed, stratify_column)
    if test is None:
        logger.info("No test split: test metrics are computed on the validation split.")
        test = validation
    out = DatasetDict({"train": train, "validation": validation, "test": test})
    for split, ds in out.items():
        if len(ds) == 0:
            raise ValueError(f"The {split} split is empty.")
    return out


def carve_validation(train: Dataset, fraction: float, seed: int, column: str | None) -> tuple[Dataset, Dataset]:
    """Holds out `fraction` of train, stratified by the ClassLabel `column` when there is one. A class with a single
    image cannot be split: it stays in train (so it is learned at all) and is named, while every other class is
    still stratified (one such class used to turn stratification off for all)."""
    if not column or not isinstance(train.features.get(column), ClassLabel):
        parts = train.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    labels = train[column]
    counts = defaultdict(int)
    for label in labels:
        counts[label] += 1
    single = {label for label, count in counts.items() if count < 2}
    if len(single) == len(counts):
        raise ValueError(
            f"Every class has a single image in the {column!r} column: no validation split can be carved from "
            "train. Give the dataset a validation split (--validation_split) or more images per class."
        )
    if single:
        names = train.features[column].names
        warnings.warn(
            f"{len(single)} class(es) have a single training image and get no validation images: "
            f"{', '.join(sorted(names[label] for label in single))}. Their validation metrics are not measured.",
            stacklevel=2,
        )
    splittable = train.select([i for i, label in enumerate(labels) if label not in single]) if single else train
    parts = splittable.train_test_split(test_size=fraction, seed=seed, stratify_by_column=column)
    if not single:
        return parts["train"], parts["test"]
    singles = train.select([i for i, label in enumerate(labels) if label in single])
    return concatenate_datasets([parts["train"], singles]), parts["test"]


def subsample(dsd: DatasetDict, data_args, seed: int, label_column: str | None = None) -> DatasetDict:
    out = dict(dsd)
    if data_args.shots is not None:
        out["train"] = few_shot(dsd["train"], label_column, data_args.shots, seed)
    if data_args.max_train_samples is not None:
        out["train"] = _head(out["train"].shuffle(seed=seed), data_args.max_train_samples)
    if data_args.max_eval_samples is not None:
        for split in ("validation", "test"):
            out[split] = _head(out[split], data_args.max_eval_samples)
    return DatasetDict(out)


def few_shot(train: Dataset, label_column: str | None, shots: int, seed: int) -> Dataset:
    """K images per class, chosen with `seed`; every class must have at least K."""
    if label_column is None:
        raise ValueError("--shots needs a classification label column.")
    by_class = defaultdict(list)
    for index, label in enumerate(train[label_column]):
        by_class[label].append(index)
    short = {label: len(idx) for label, idx in by_class.items() if len(idx) < shots}
    if short:
        names = train.features[label_column].names if isinstance(train.features[label_column], ClassLabel) else None
        shown = {names[k] if names else k: v for k, v in sorted(short.items())}
        raise ValueError(f"--shots {shots} is more than some classes have in train: {shown}. Lower --shots.")
    rng = random.Random(seed)
    chosen = sorted(i for label in sorted(by_class) for i in rng.sample(by_class[label], shots))
    return train.select(chosen)


def _pick(dsd: DatasetDict, requested: str | None, names: tuple, option: str):
    if requested is not None:
        if requested not in dsd:
            raise ValueError(f"Split {requested!r} ({option}) not found; the dataset has {list(dsd)}.")
        return dsd[requested]
    return next((dsd[n] for n in names if n in dsd), None)


def _head(ds: Dataset, n: int) -> Dataset:
    return ds.select(range(min(n, len(ds))))

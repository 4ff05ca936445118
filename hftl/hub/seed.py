"""Seed a Hub endpoint (normally the local one) with what hftl bundles, under the same names as online.

    hftl hub serve &           # local endpoint on 127.0.0.1:8765
    hftl hub seed              # hftl/efficientnet-lite0 (model), the bundled datasets

Afterwards `from_pretrained("hftl/efficientnet-lite0")` and `datasets.load_dataset("hftl/digits")` work through the
endpoint exactly as they would against huggingface.co. Datasets go up as parquet, one file per split under
`data/<split>-00000-of-00001.parquet`, with features (Image, ClassLabel) kept in the parquet schema metadata and a
dataset card listing the splits. Set HF_ENDPOINT (or pass --endpoint) before huggingface_hub is imported.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

# modules that register more bundled datasets when imported (detection / segmentation / instance shapes)
_DATASET_MODULES = (
    "hftl.tasks.detection.task",
    "hftl.tasks.segmentation.task",
    "hftl.tasks.instance_segmentation.task",
)


def bundled_dataset_names() -> list[str]:
    from hftl.bundled import BUNDLED_DATASETS

    for module in _DATASET_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:  # a task module that cannot import here only costs its dataset
            pass
    return sorted(BUNDLED_DATASETS)


def seed_model(api, name: str) -> str:
    from hftl.bundled import materialize_model

    folder = materialize_model(name)
    api.create_repo(name, exist_ok=True)
    api.upload_folder(
        repo_id=name,
        folder_path=folder,
        ignore_patterns=["hftl_bundled.json", ".*"],
        commit_message=f"hftl hub seed: {name}",
    )
    return f"{api.endpoint}/{name}"


def _dataset_card(name: str, splits: dict[str, int], features) -> str:
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        license={"hftl/digits": "bsd-3-clause", "hftl/fashion-mnist": "mit"}.get(name, "other"),
        pretty_name=name.split("/")[-1],
        tags=["hftl", "bundled"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": split, "path": f"data/{split}-*.parquet"} for split in splits],
            }
        ],
    )
    rows = "\n".join(f"| {split} | {count} |" for split, count in splits.items())
    body = (
        f"# {name}\n\nA dataset bundled with hftl (built offline by `hftl.bundled.load_bundled_dataset({name!r})`) "
        f"and seeded into this Hub by `hftl hub seed`.\n\nFeatures: `{features}`\n\n"
        f"| split | rows |\n|---|---|\n{rows}\n"
        f'\n```python\nfrom datasets import load_dataset\n\nds = load_dataset("{name}")\n```\n'
    )
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def seed_dataset(api, name: str) -> str:
    from datasets.table import embed_table_storage

    from hftl.bundled import load_bundled_dataset

    dsd = load_bundled_dataset(name)
    with tempfile.TemporaryDirectory(prefix="hftl-seed-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        for split, dataset in dsd.items():
            # image bytes go inside the parquet, not paths on this machine
            dataset = dataset.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
            dataset.to_parquet(root / "data" / f"{split}-00000-of-00001.parquet")
        features = next(iter(dsd.values())).features
        (root / "README.md").write_text(_dataset_card(name, {s: len(d) for s, d in dsd.items()}, features))
        api.create_repo(name, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=name, repo_type="dataset", folder_path=root, commit_message=f"hftl hub seed: {name}")
    return f"{api.endpoint}/datasets/{name}"


def seed_hub(
    token: str | None = None, models: list[str] | None = None, datasets: list[str] | None = None, log=print
) -> list[str]:
    """Uploads bundled models and datasets (default: all) to the endpoint in HF_ENDPOINT; returns their URLs.
    Re-seeding is cheap: unchanged files are skipped."""
    from huggingface_hub import HfApi

    from hftl.bundled import BUNDLED_MODELS

    api = HfApi(token=token)
    urls = []
    for name in sorted(BUNDLED_MODELS) if models is None else models:
        urls.append(seed_model(api, name))
        log(f"model   {urls[-1]}")
    for name in bundled_dataset_names() if datasets is None else datasets:
        try:
            urls.append(seed_dataset(api, name))
        except FileNotFoundError as missing:  # a set built from an OS package that is absent: say how to add it
            if datasets is not None:
                raise
            log(f"skipped {name}: {missing}")
            continue
        log(f"dataset {urls[-1]}")
    return urls

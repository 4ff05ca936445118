"""--streaming: per-rank shards covering every row once an epoch, bad images skipped and named, exact resume."""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file

from hftl.streaming import StreamedSplit
from tests.fixtures.data import launch_two_ranks

REPO = Path(__file__).resolve().parents[1]


def _stream_rows(n, bad=()):
    rows = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(buffer, "PNG")
        rows.append({"bytes": b"not an image" if i in bad else buffer.getvalue(), "path": f"row{i}.png"})
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"]), "id": Value("int64")})
    return Dataset.from_dict({"image": rows, "label": [i % 2 for i in range(n)], "id": list(range(n))}, features)


def _ids(batch):  # a transform that keeps the row id, so the test can see which rows a rank read
    return {"id": batch["id"], "size": [image.size for image in batch["image"]]}


@pytest.mark.parametrize("num_shards", [4, 3])  # shard-level split, and row-level when shards do not divide
def test_two_ranks_read_disjoint_rows_covering_every_row_once_an_epoch(num_shards):
    stream = _stream_rows(24).to_iterable_dataset(num_shards=num_shards)
    ranks = [StreamedSplit(stream, _ids, "image", 24, seed=0, buffer_size=8, rank=r, world_size=2) for r in (0, 1)]
    orders = []
    for epoch in (0, 1):
        seen = []
        for split in ranks:
            split.set_epoch(epoch)
            items = list(split)
            assert len(items) == len(split) == 12 and all(item["size"] == (8, 8) for item in items)
            seen.append([item["id"] for item in items])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(24))
        orders.append(seen)
    assert orders[0] != orders[1]  # the shuffle buffer is reseeded each epoch


def test_resume_skips_exactly_the_samples_already_read():
    stream = _stream_rows(20).to_iterable_dataset(num_shards=2)
    split = StreamedSplit(stream, _ids, "image", 20, seed=3, buffer_size=5)
    split.set_epoch(1)
    whole = [item["id"] for item in split]
    split.set_epoch(1)
    split.resume_at(7)
    assert [item["id"] for item in split] == whole[7:]


def test_corrupt_streamed_image_is_skipped_and_named(caplog):
    stream = _stream_rows(12, bad={5}).to_iterable_dataset(num_shards=2)
    split = StreamedSplit(stream, _ids, "image", 10, seed=0, buffer_size=4)
    split.set_epoch(0)
    with caplog.at_level(logging.INFO, logger="hftl"):
        ids = [item["id"] for item in split]
    assert len(ids) == 10 and 5 not in ids
    assert split.skipped == ["row5.png"]
    assert "skipped 1 unreadable streamed image(s): row5.png" in caplog.text


def _argv(data, model, out, *extra):
    return [
        "--dataset", str(data), "--model", str(model), "--output_dir", str(out), "--num_epochs", "2",
        "--batch_size", "8", "--learning_rate", "3.0e-3", "--report_to", "none", "--seed", "0", "--streaming",
        "--shuffle_buffer_size", "16", "--image_size", "32", *extra,
    ]  # fmt: skip


def test_streamed_run_trains_and_resumes_exactly(tiny_vit_dir, colour_folder, tmp_path):
    from hftl.runner import run

    common = ["--checkpointing_steps", "4", "--checkpoints_total_limit", "20"]
    full = tmp_path / "uninterrupted"
    results = run("classification", _argv(colour_folder, tiny_vit_dir, full, *common))
    # 48 rows, 5 held out for validation (no validation split): 43 a epoch, 6 batches of 8
    assert results["num_samples"]["train"] == 43 and results["num_samples"]["validation"] == 5
    assert results["train"]["steps"] == 12 and results["test"]["accuracy"] >= 0.5
    assert all(np.isfinite(r["train_loss"]) for r in results["history"])
    resumed = tmp_path / "resumed"
    checkpoint = full / "checkpoints" / "checkpoint-4"  # mid-epoch
    run(
        "classification",
        _argv(colour_folder, tiny_vit_dir, resumed, *common, "--resume_from_checkpoint", str(checkpoint)),
    )
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "streamed resume diverged"


@pytest.mark.slow
def test_streamed_run_under_two_processes(tiny_vit_dir, colour_folder, tmp_path):
    out = tmp_path / "ddp"
    launch_two_ranks(REPO / "recipes" / "classify.py", *_argv(colour_folder, tiny_vit_dir, out))
    results = json.loads((out / "all_results.json").read_text())
    assert "2 process(es)" in results["hardware"]
    assert results["train"]["steps"] == 2 * 3  # 43 rows: 21 per rank, 3 batches of 8 per epoch
    assert results["test"]["num_samples"] == 16

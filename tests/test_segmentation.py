"""Semantic segmentation: mask reading and checks, paired augmentation, metrics, models, strategies, end to end.

Models are tiny and random (SegFormer with hidden sizes [8, 16]; UperNet over timm's `test_efficientnet`); data is
the seeded synthetic shapes set at 64 px.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from hftl.config import DataArgs, HubArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs
from hftl.data import add_row_numbers
from hftl.synthetic import make_shapes
from hftl.tasks.segmentation import data as sd
from hftl.tasks.segmentation.args import SegmentationArgs
from hftl.tasks.segmentation.data import load_shapes_segmentation
from hftl.tasks.segmentation.eval import SegmentationEvaluator, metrics_from_confusion
from hftl.tasks.segmentation.task import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
SHAPE_CLASSES = ("background", "circle", "square", "triangle")
ID2LABEL = dict(enumerate(SHAPE_CLASSES))
SIZE = 64
SEGMENTATION_OPTIONS = {f.name for f in fields(SegmentationArgs)}


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shapes() -> DatasetDict:
    return load_shapes_segmentation(SIZE, (("train", 48), ("validation", 16), ("test", 16)))


def _task(**data) -> tuple[SegmentationTask, DataArgs]:
    own = {name: data.pop(name) for name in SEGMENTATION_OPTIONS if name in data}
    data_args = DataArgs(dataset=data.pop("dataset", "hftl/shapes-segmentation"), **data)
    config = RunConfig(data_args, ModelArgs(), StrategyArgs(), TrainArgs(), HubArgs(), SegmentationArgs(**own))
    return SegmentationTask(config), data_args


def _dataset(images, masks) -> Dataset:
    features = Features({"image": ImageFeature(), "annotation": ImageFeature()})
    return Dataset.from_dict({"image": images, "annotation": masks}, features=features)


# ---- data --------------------------------------------------------------------------------------------------------
def make_shape_masks(count: int, size: int, seed: int) -> list[tuple[Image.Image, Image.Image]]:
    return [(s.image, Image.fromarray(s.mask)) for s in make_shapes(count, size, seed=seed)]


def test_bundled_shapes_set_is_seeded_with_exact_masks():
    from hftl.bundled import BUNDLED_DATASETS, load_bundled_dataset

    assert "hftl/shapes-segmentation" in BUNDLED_DATASETS and sd.shapes_class_names() == list(SHAPE_CLASSES)
    first, again = load_bundled_dataset("hftl/shapes-segmentation"), load_shapes_segmentation.__wrapped__()
    assert {k: len(v) for k, v in first.items()} == {"train": 480, "validation": 80, "test": 120}
    for a, b in zip(first["test"].select(range(4)), again["test"].select(range(4))):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert np.array_equal(np.asarray(a["annotation"]), np.asarray(b["annotation"]))
        assert a["image"].size == a["annotation"].size and a["annotation"].mode == "L"
        values = set(np.unique(np.asarray(a["annotation"])).tolist())
        assert values <= set(range(len(SHAPE_CLASSES))) and 0 in values and len(values) >= 2
    assert not np.array_equal(np.asarray(first["train"][0]["annotation"]), np.asarray(first["test"][0]["annotation"]))


def test_label_names_and_reduce_labels(shapes):
    task, data_args = _task()
    assert task.label_names(shapes, data_args) == list(SHAPE_CLASSES)
    ids = np.array([[0, 1, 2], [3, 255, 0]])
    reduced = sd.encode_ids(ids, 3, reduce_labels=True, ignore_index=255, where="row 0")
    assert reduced.tolist() == [[255, 0, 1], [2, 255, 255]]


def test_mask_size_mismatch_names_the_row():
    images = [Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))]
    masks = [Image.new("L", (16, 16), 1), Image.new("L", (12, 16))]
    task, data_args = _task(dataset="local", id2label=None)
    with pytest.raises(ValueError, match=r"train split, row 1: mask size 12×16 differs from image size 16×16"):
        task.label_names(DatasetDict({"train": _dataset(images, masks)}), data_args)


def test_label_outside_id2label_names_the_row(tmp_path):
    label_file = tmp_path / "id2label.json"
    label_file.write_text(json.dumps({"0": "background", "1": "thing"}))
    masks = [Image.new("L", (8, 8)), Image.fromarray(np.full((8, 8), 7, np.uint8))]
    task, data_args = _task(dataset="local", id2label=str(label_file))
    with pytest.raises(ValueError, match=r"validation split, row 1: mask values \[7\] are outside the 2 classes"):
        dsd = DatasetDict({"train": _dataset([Image.new("RGB", (8, 8))] * 2, masks[:1] * 2)})
        dsd["validation"] = _dataset([Image.new("RGB", (8, 8))] * 2, masks)
        task.label_names(dsd, data_args)


def test_rgb_colour_masks_need_a_palette(tmp_path):
    colour = np.zeros((6, 6, 3), np.uint8)
    colour[:3] = (255, 0, 0)
    with pytest.raises(ValueError, match=r"row 3: mask is an RGB colour image.*--mask_palette"):
        sd.mask_to_ids(Image.fromarray(colour), None, "train split, row 3")
    palette_file = tmp_path / "palette.json"
    palette_file.write_text(json.dumps({"background": [0, 0, 0], "car": [255, 0, 0]}))
    palette = sd.read_palette(str(palette_file), ["background", "car"])
    ids = sd.mask_to_ids(Image.fromarray(colour), palette, "row 0")
    assert ids[:3].tolist() == [[1] * 6] * 3 and ids[3:].sum() == 0
    grey = np.repeat(np.full((4, 4, 1), 2, np.uint8), 3, axis=2)  # a class-id mask saved as RGB: unambiguous
    assert sd.mask_to_ids(Image.fromarray(grey), None, "row 0").tolist() == [[2] * 4] * 4


def test_mask_conventions_found_come_back_in_the_spec_for_prepare(tmp_path):
    """The palette and the resolved reduce_labels are a value data_spec returns and prepare reads (DataSpec's
    task_data), not task state: a second task object prepares the same data from the spec alone."""
    from transformers import SegformerImageProcessor

    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:4] = (255, 0, 0)
    palette_file = tmp_path / "palette.json"
    palette_file.write_text(json.dumps({"0": [0, 0, 0], "1": [9, 9, 9], "2": [255, 0, 0]}))  # 0: "other"
    rows = _dataset([Image.new("RGB", (8, 8))] * 2, [Image.fromarray(colour)] * 2)
    options = {"dataset": "local", "mask_palette": str(palette_file), "reduce_labels": True}
    task, data_args = _task(**options)
    spec = task.data_spec(DatasetDict({"train": rows}), data_args)
    masks = spec.task_data
    assert (spec.image_column, masks.mask_column) == ("image", "annotation")
    assert masks.reduce_labels and masks.num_labels == 2 and masks.palette[(255, 0, 0)] == 2
    fresh, _ = _task(**options)
    processor = SegformerImageProcessor(size={"height": 8, "width": 8})
    prepared = fresh.prepare(add_row_numbers(DatasetDict({"test": rows})), processor, data_args, spec)
    label = prepared["test"][0]["labels"]
    assert label[:4].tolist() == [[1] * 8] * 4 and label[4:].eq(255).all()  # id 2 -> class 1, "other" -> ignored


def test_local_folder_format(tmp_path):
    for split, count in (("train", 3), ("test", 2)):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        for i, (image, mask) in enumerate(make_shape_masks(count, 32, seed=len(split))):
            image.save(tmp_path / split / "images" / f"{i}.jpg")
            mask.save(tmp_path / split / "masks" / f"{i}.png")
    (tmp_path / "id2label.json").write_text(json.dumps({str(k): v for k, v in ID2LABEL.items()}))
    task, data_args = _task(dataset=str(tmp_path))
    dsd = task.load_local(str(tmp_path), data_args)
    assert {k: len(v) for k, v in dsd.items()} == {"train": 3, "test": 2}
    assert task.label_names(dsd, data_args) == list(SHAPE_CLASSES)
    (tmp_path / "train" / "images" / "extra.png").write_bytes((tmp_path / "train" / "images" / "0.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"no mask in .*masks for image\(s\) \['extra'\]"):
        task.load_local(str(tmp_path), data_args)


def test_paired_augmentation_moves_image_and_mask_together(tiny_segformer_dir):
    """An image whose grey level encodes each pixel's class: after crop/flip, classes read back from the image
    must equal the augmented mask (nearest-neighbour masks, same geometry)."""
    from transformers import SegformerImageProcessor

    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 4, (4, 4)).repeat(24, 0).repeat(24, 1).astype(np.uint8) for _ in range(6)]
    images = [Image.fromarray(np.repeat((m * 80)[..., None], 3, axis=2)) for m in masks]
    task, data_args = _task(dataset="local", crop_scale_min=0.3)
    dsd = DatasetDict({"train": _dataset(images, [Image.fromarray(m) for m in masks])})
    spec = task.data_spec(dsd, data_args)
    processor = SegformerImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    prepared = task.prepare(add_row_numbers(dsd), processor, data_args, spec)
    torch.manual_seed(0)
    moved = 0
    for example, mask in zip(prepared["train"], masks):
        pixels, label = example["pixel_values"], example["labels"]
        assert pixels.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= {0, 1, 2, 3}  # nearest: no blended class ids
        from_image = torch.round(pixels[0] * 255 / 80).long()
        assert (from_image == label).float().mean() > 0.85  # equal except where bilinear image edges blur
        plain = torch.from_numpy(mask[::2, ::2].astype(np.int64))
        moved += (plain != label).float().mean() > 0.1
    assert moved >= 3  # the transforms really cropped and flipped


def test_train_images_resize_with_the_processors_interpolation():
    """Train images are resized as the saved processor resizes them for evaluation and pipeline() (bicubic here),
    masks by nearest neighbour."""
    from torchvision.transforms import v2
    from transformers import SegformerImageProcessor

    rng = np.random.default_rng(0)  # detailed 20 px images upsampled to 48 px: where interpolations differ most
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(3)]
    masks = [Image.fromarray((np.arange(400).reshape(20, 20) % 4).astype(np.uint8)) for _ in images]
    task, data_args = _task(dataset="local", augment=False)
    dsd = DatasetDict({"train": _dataset(images, masks)})
    processor = SegformerImageProcessor(size={"height": 48, "width": 48}, resample=Image.Resampling.BICUBIC)
    prepared = task.prepare(add_row_numbers(dsd), processor, data_args, task.data_spec(dsd, data_args))
    for example, image in zip(prepared["train"], images):
        evaluation = processor(image, return_tensors="pt")["pixel_values"][0]
        bilinear = v2.functional.resize(v2.functional.pil_to_tensor(image), [48, 48], antialias=True) / 255
        bilinear = v2.functional.normalize(bilinear, processor.image_mean, processor.image_std)
        train = example["pixel_values"]
        assert (train - evaluation).abs().mean() < 0.02
        assert (bilinear - evaluation).abs().mean() > 2 * (train - evaluation).abs().mean()
        assert set(example["labels"].unique().tolist()) <= {0, 1, 2, 3}


# ---- metrics -----------------------------------------------------------------------------------------------------
def _reference_mean_iou(preds, labels, num_labels, ignore_index):
    """evaluate's mean_iou, written out: per-class intersect/union over the dataset; absent classes left out."""
    intersect, union, label_area = np.zeros(num_labels), np.zeros(num_labels), np.zeros(num_labels)
    for pred, label in zip(preds, labels):
        keep = label != ignore_index
        pred, label = pred[keep], label[keep]
        for c in range(num_labels):
            intersect[c] += np.sum((pred == c) & (label == c))
            union[c] += np.sum((pred == c) | (label == c))
            label_area[c] += np.sum(label == c)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = intersect / union, intersect / label_area
    return np.nanmean(iou), np.nanmean(acc), intersect.sum() / label_area.sum(), iou


class _OneProcess:
    """What the evaluator uses from an Accelerator, for one process (multi-rank gathering: see the 2-rank test)."""

    is_main_process = True

    @staticmethod
    def gather_for_metrics(tensor):
        return tensor


def _evaluate(logits, labels, ignore_index=255):
    evaluator = SegmentationEvaluator(ID2LABEL, ignore_index)
    outputs = type("Out", (), {"logits": logits})
    evaluator.update(_OneProcess(), {"pixel_values": torch.zeros(len(labels), 3, 8, 8), "labels": labels}, outputs)
    return evaluator


def test_metrics_match_reference_at_full_resolution():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8)
    labels = [torch.randint(0, 4, (16, 24)), torch.randint(0, 4, (8, 8)), torch.randint(0, 3, (32, 32))]
    labels[0][:4] = 255
    evaluator = _evaluate(logits, labels)
    metrics = evaluator.compute()
    preds = [
        torch.nn.functional.interpolate(logits[i : i + 1], size=lab.shape, mode="bilinear")[0].argmax(0).numpy()
        for i, lab in enumerate(labels)
    ]
    mean_iou, mean_acc, overall, iou = _reference_mean_iou(preds, [lab.numpy() for lab in labels], 4, 255)
    assert metrics["mean_iou"] == pytest.approx(mean_iou) and metrics["mean_accuracy"] == pytest.approx(mean_acc)
    assert metrics["overall_accuracy"] == pytest.approx(overall)
    assert list(metrics["per_class_iou"].values()) == pytest.approx(list(iou), abs=1e-6)
    assert metrics["num_samples"] == 3


def test_ignore_index_pixels_never_count():
    torch.manual_seed(1)
    label = torch.randint(0, 4, (1, 8, 8))
    label[0, :, :4] = 255
    logits = torch.randn(1, 4, 8, 8)
    changed = logits.clone()
    changed[..., :4] = torch.randn(1, 4, 8, 4) * 10  # other predictions where the label is ignored
    assert _evaluate(logits, label).compute() == _evaluate(changed, label).compute()
    perfect = torch.nn.functional.one_hot(label.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    metrics = _evaluate(perfect, label).compute()
    assert metrics["mean_iou"] == 1.0 and metrics["overall_accuracy"] == 1.0
    assert metrics_from_confusion(torch.zeros(2, 2, dtype=torch.long), {0: "a", 1: "b"})["mean_iou"] == 0.0


def test_evaluator_saves_overlay_png_and_json(tmp_path):
    torch.manual_seed(2)
    evaluator = _evaluate(torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 16, 16)))
    paths = evaluator.save_artifacts(tmp_path, "test")
    png = next(p for p in paths if p.suffix == ".png")
    with Image.open(png) as image:
        assert image.size[0] > 200 and image.size[1] > 200
    saved = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert saved["labels"] == list(SHAPE_CLASSES) and len(saved["confusion_matrix"]) == 4


# ---- models and strategies ---------------------------------------------------------------------------------------
def test_segformer_head_resized_and_strategy_parts(tiny_segformer_dir):
    task, _ = _task()
    model, processor = task.load_model(ModelArgs(model=str(tiny_segformer_dir)), ID2LABEL)
    assert model.config.id2label == ID2LABEL and model.decode_head.classifier.out_channels == 4
    assert type(processor).__name__ == "SegformerImageProcessor" and processor.do_reduce_labels is False
    assert task.backbone(model) is model.segformer and task.head_modules(model) == ["decode_head"]
    assert task.lora_targets(model) == ["q_proj", "v_proj"]


def test_upernet_over_timm_encoder_copies_weights(tiny_timm_efficientnet_dir):
    from transformers import TimmWrapperForImageClassification

    task, _ = _task()
    model, processor = task.load_model(ModelArgs(model=str(tiny_timm_efficientnet_dir)), ID2LABEL)
    classifier = TimmWrapperForImageClassification.from_pretrained(tiny_timm_efficientnet_dir)
    encoder = model.backbone._backbone.state_dict()
    assert all(torch.equal(t, classifier.timm_model.state_dict()[k]) for k, t in encoder.items())
    assert task.head_modules(model) == ["decode_head"] and task.lora_targets(model) == ["conv_pw", "conv_pwl"]
    assert processor.size["height"] == SIZE and list(processor.image_mean) == [0.5] * 3
    logits = model(pixel_values=torch.randn(2, 3, SIZE, SIZE)).logits
    assert logits.shape == (2, 4, SIZE, SIZE)


# ---- end to end --------------------------------------------------------------------------------------------------
def _argv(output_dir, model, *extra) -> list[str]:
    return [
        "--dataset", "hftl/shapes-segmentation", "--model", str(model), "--image_size", str(SIZE),
        "--max_train_samples", "48", "--max_eval_samples", "15", "--batch_size", "8", "--eval_batch_size", "4",
        "--learning_rate", "5.0e-3", "--report_to", "none", "--checkpoint_every_epoch", "false",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def _test_split_mean_iou(model, processor) -> float:
    """mIoU of `model` on the run's test rows, in this process: the reference for the trained and 2-rank runs."""
    from accelerate import Accelerator

    from hftl.trainer import evaluate, make_loader

    task, data_args = _task(image_size=SIZE)
    dsd = load_shapes_segmentation()
    dsd = DatasetDict({"test": dsd["test"].select(range(15))})
    spec = task.data_spec(dsd.copy() | {"train": dsd["test"]}, data_args)
    prepared = task.prepare(add_row_numbers(dsd), processor, data_args, spec)
    loader = make_loader(prepared["test"], task.collate, 4, False, 0, 0)
    metrics, _ = evaluate(task, model.eval(), loader, Accelerator(cpu=True), ID2LABEL, processor)
    return metrics["mean_iou"]


@pytest.mark.slow
def test_full_training_learns_and_output_loads_in_pipeline(tiny_segformer_dir, tmp_path):
    from transformers import AutoModelForSemanticSegmentation, pipeline

    from hftl.runner import run

    task, _ = _task(image_size=SIZE)
    torch.manual_seed(0)
    untrained, processor = task.load_model(ModelArgs(model=str(tiny_segformer_dir)), ID2LABEL)
    untrained_miou = _test_split_mean_iou(untrained, processor)

    results = run("segmentation", _argv(tmp_path / "out", tiny_segformer_dir, "--num_epochs", "6"))
    losses = [record["train_loss"] for record in results["history"]]
    assert losses[-1] < 0.7 * losses[0]
    assert results["test"]["mean_iou"] > untrained_miou + 0.05
    assert results["test"]["num_samples"] == 15 and set(results["test"]["per_class_iou"]) == set(SHAPE_CLASSES)
    assert (tmp_path / "out" / "test_predictions.png").is_file()

    segmenter = pipeline("image-segmentation", model=str(tmp_path / "out"))
    image = make_shapes(1, 80, seed=11)[0].image
    found = segmenter(image)
    assert found and {d["label"] for d in found} <= set(SHAPE_CLASSES) and found[0]["mask"].size == (80, 80)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert _test_split_mean_iou(reloaded, processor) == pytest.approx(results["test"]["mean_iou"], abs=1e-6)


@pytest.mark.slow
def test_frozen_backbone_keeps_the_timm_encoder(tiny_timm_efficientnet_dir, tmp_path):
    from transformers import AutoModelForSemanticSegmentation, TimmWrapperForImageClassification

    from hftl.runner import run

    argv = _argv(tmp_path / "out", tiny_timm_efficientnet_dir, "--strategy", "frozen-backbone", "--num_epochs", "1")
    results = run("segmentation", argv)
    assert results["trainable_parameters"] < results["total_parameters"]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["backbone_config"]["backbone"] == "test_efficientnet" and not saved.get("use_pretrained_backbone")
    # loads from the folder alone (the test session has no reachable Hub): the encoder weights are in the folder
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    source = TimmWrapperForImageClassification.from_pretrained(tiny_timm_efficientnet_dir).timm_model.state_dict()
    encoder = model.backbone._backbone.state_dict()
    assert all(torch.equal(tensor, source[name]) for name, tensor in encoder.items())
    assert not torch.equal(model.decode_head.classifier.weight, torch.zeros_like(model.decode_head.classifier.weight))


@pytest.mark.device
@pytest.mark.slow
def test_lora_adapter_round_trips(tiny_segformer_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSemanticSegmentation

    from hftl.runner import run

    out = tmp_path / "out"
    results = run("segmentation", _argv(out, tiny_segformer_dir, "--strategy", "lora", "--num_epochs", "1"))
    assert results["trainable_parameters"] < 0.5 * results["total_parameters"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"} and adapter["modules_to_save"] == ["decode_head"]
    base = AutoModelForSemanticSegmentation.from_pretrained(
        tiny_segformer_dir, num_labels=4, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
        ignore_mismatched_sizes=True,
    )  # fmt: skip
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(pixel_values=pixels).logits, merged(pixel_values=pixels).logits)


@pytest.mark.slow
def test_two_rank_run_counts_each_test_image_once(tiny_segformer_dir, tmp_path):
    """15 test images over 2 ranks × batch 4: Accelerate repeats one image to even out the ranks, and the metrics
    must drop it. The 2-rank test mIoU must equal a single-process evaluation of the saved model."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "segment.py"),
        *_argv(out, tiny_segformer_dir, "--num_epochs", "1"),
    ]  # fmt: skip
    # without a GPU, Accelerate forms a gloo process group only when told to use the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["hardware"].startswith("2 process")
    assert results["test"]["num_samples"] == 15
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert _test_split_mean_iou(model, processor) == pytest.approx(results["test"]["mean_iou"], abs=1e-6)

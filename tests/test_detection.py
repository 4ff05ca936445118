"""Object detection: synthetic data, row checks, box augmentation, metrics, models, strategies, end to end.

Models are tiny and random (DETR over timm's `test_resnet`, d_model 32, 10 queries; a timm `test_efficientnet`
classifier for the "timm backbone -> Conditional DETR" path); data is the seeded synthetic shapes set at 64 px.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image

from hftl.config import DataArgs, HubArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs
from hftl.synthetic import SHAPE_CLASSES, make_shapes
from hftl.tasks.detection import data as dd
from hftl.tasks.detection.args import DetectionArgs
from hftl.tasks.detection.eval import DetectionEvaluator
from hftl.tasks.detection.task import DetectionTask, apply_box_augmentation, box_augmentation

ROOT = Path(__file__).resolve().parents[1]
ID2LABEL = dict(enumerate(SHAPE_CLASSES))
SIZE = 64


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shapes() -> DatasetDict:
    return dd.load_shapes_detection(image_size=SIZE, split_sizes={"train": 48, "validation": 16, "test": 16})


def _task(box_format: str = "coco", **data) -> tuple[DetectionTask, DataArgs]:
    data_args = DataArgs(dataset=data.pop("dataset", "hftl/shapes-detection"), **data)
    config = RunConfig(data_args, ModelArgs(), StrategyArgs(), TrainArgs(), HubArgs(), DetectionArgs(box_format))
    return DetectionTask(config), data_args


def _rows(objects: list[dict], size: int = 32, features=None) -> DatasetDict:
    image = Image.new("RGB", (size, size), (90, 90, 90))
    data = {"image": [image] * len(objects), "objects": objects}
    return DatasetDict({"train": Dataset.from_dict(data, features=features)})


# ---- synthetic data ----------------------------------------------------------------------------------------------
def test_make_shapes_boxes_and_masks_are_exact_and_seeded():
    samples = make_shapes(12, image_size=SIZE, seed=3, empty_fraction=0.2)
    again = make_shapes(12, image_size=SIZE, seed=3, empty_fraction=0.2)
    assert any(len(s.boxes) == 0 for s in samples) and any(len(s.boxes) >= 2 for s in samples)
    for sample, twin in zip(samples, again):
        assert np.array_equal(np.asarray(sample.image), np.asarray(twin.image))
        assert sample.image.size == (SIZE, SIZE) and sample.mask.shape == (SIZE, SIZE)
        for (x, y, w, h), pixels, label in zip(sample.boxes, sample.instance_masks, sample.labels):
            rows, cols = np.nonzero(pixels)
            assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())
            assert np.all(sample.mask[pixels] == label + 1)  # semantic mask agrees with the instance
        assert (sample.mask > 0).sum() == sample.instance_masks.sum()  # shapes never overlap
    other = make_shapes(2, image_size=SIZE, seed=4)
    assert not np.array_equal(np.asarray(other[0].image), np.asarray(samples[0].image))


def test_shapes_dataset_is_hub_style_coco(shapes):
    assert set(shapes) == {"train", "validation", "test"}
    row = shapes["train"][0]
    assert set(row["objects"]) == {"bbox", "category", "area"}
    assert shapes["train"].features["objects"]["category"].feature.names == list(SHAPE_CLASSES)
    all_ids = [i for split in shapes.values() for i in split["image_id"]]
    assert len(set(all_ids)) == len(all_ids)
    task, data_args = _task()
    assert task.label_names(shapes, data_args) == list(SHAPE_CLASSES)
    assert (task.image_column, task.objects_column) == ("image", "objects")


def test_shapes_registered_as_bundled_dataset():
    from hftl.bundled import BUNDLED_DATASETS

    assert BUNDLED_DATASETS["hftl/shapes-detection"] == "hftl.tasks.detection.data:load_shapes_detection"


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_boxes_outside_the_image_are_clipped_and_degenerate_ones_dropped():
    boxes, classes, dropped = dd.clean_boxes(
        {"bbox": [[-4, 2, 10, 10], [28, 28, 8, 8], [32, 5, 3, 3]], "category": [0, 1, 2]}, "coco", 32, 32
    )
    assert boxes.tolist() == [[0, 2, 6, 12], [28, 28, 32, 32]]
    assert classes.tolist() == [0, 1] and dropped == 1


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ({"bbox": [[2, 2, -3, 4]], "category": [0]}, "row 1: box 0 .* negative width or height"),
        ({"bbox": [[2, 2, 3, 4]], "category": [-1]}, "row 1: object 0 has category -1, not a class id in 0..1"),
        ({"bbox": [[20, 20, 30, 30]], "category": [0]}, r"row 1: box 0 .* fits as \[x0, y0, x1, y1\]"),
        ({"bbox": [[2, 2, 3]], "category": [0]}, "row 1: box 0 is"),
    ],
)
def test_bad_rows_are_named(objects, message):
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    good = {"bbox": [[1, 1, 5, 5]], "category": [0]}
    features = None
    if len(objects["bbox"][0]) == 4:  # named classes, so an id past them is unknown
        box = List(List(Value("float32"), length=4))
        named = List(ClassLabel(names=["a", "b"]))
        features = Features({"image": ImageFeature(), "objects": {"bbox": box, "category": named}})
    task, data_args = _task()
    with pytest.raises(ValueError, match=message):
        task.label_names(_rows([good, objects], features=features), data_args)


def test_images_without_objects_are_kept_and_xyxy_format_is_read(caplog):
    rows = _rows([{"bbox": [[2, 2, 12, 14]], "category": [1]}, {"bbox": [], "category": []}])
    task, data_args = _task(box_format="xyxy")
    with caplog.at_level(logging.INFO, logger="hftl"):
        assert task.label_names(rows, data_args) == ["0", "1"]
    assert "1 image(s) without objects are kept as negatives" in caplog.text
    boxes, classes, _ = dd.clean_boxes(rows["train"][0]["objects"], "xyxy", 32, 32)
    assert boxes.tolist() == [[2, 2, 12, 14]] and classes.tolist() == [1]


def test_local_coco_folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / name)
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}, {"id": 9, "file_name": "b.png"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 2, 10, 8], "area": 80}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 3, "name": "ant"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    task, data_args = _task(dataset=str(tmp_path))
    dsd = task.load_local(str(tmp_path), data_args)
    assert task.label_names(dsd, data_args) == ["ant", "cat"]  # ids in category-id order
    rows = dsd["train"]
    assert rows["image_id"] == [7, 9]
    assert rows[0]["objects"]["category"] == [1] and rows[1]["objects"]["bbox"] == []  # negative kept
    coco["annotations"][0]["category_id"] = 4
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="annotation 1 .*a.png.* category_id 4"):
        task.load_local(str(tmp_path), data_args)


# ---- augmentation ------------------------------------------------------------------------------------------------
def test_box_augmentation_keeps_boxes_on_the_shapes():
    """Each augmented box must still be the tight box of its shape's (identically transformed) mask."""
    from torchvision import tv_tensors

    torch.manual_seed(0)
    augment = box_augmentation(DataArgs(crop_scale_min=0.5))
    flipped = moved = 0
    for sample in make_shapes(24, image_size=SIZE, seed=5):
        xyxy = sample.boxes.copy()
        xyxy[:, 2:] += xyxy[:, :2]
        image, boxes, index, dropped, extra = apply_box_augmentation(
            augment, sample.image, xyxy, np.arange(len(xyxy)), extra={"masks": tv_tensors.Mask(sample.instance_masks)}
        )
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
        masks = extra["masks"]
        assert len(boxes) + dropped == len(xyxy)
        for box, k in zip(boxes, index):
            rows, cols = np.nonzero(masks[k].numpy())
            tight = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert np.abs(np.array(tight) - box).max() <= 2.0, (box, tight)
            moved += int(np.abs(box - xyxy[k]).max() > 2)
            flipped += int(abs((box[0] + box[2]) - (SIZE - (xyxy[k][0] + xyxy[k][2]))) < 6)
    assert moved > 0 and flipped > 0


# ---- metrics -----------------------------------------------------------------------------------------------------
def _detr_outputs(boxes: list[torch.Tensor], labels: list[torch.Tensor], num_queries: int = 4):
    """DETR-style raw outputs that decode to exactly these boxes (score ~1) plus "no object" queries."""
    from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

    logits = torch.full((len(boxes), num_queries, len(ID2LABEL) + 1), -10.0)
    logits[:, :, -1] = 10.0  # the no-object class
    pred = torch.full((len(boxes), num_queries, 4), 0.5)
    for i, (b, c) in enumerate(zip(boxes, labels)):
        logits[i, : len(b), -1] = -10.0
        logits[i, torch.arange(len(b)), c] = 10.0
        xyxy = b / SIZE
        pred[i, : len(b)] = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    return DetrObjectDetectionOutput(logits=logits, pred_boxes=pred)


def test_evaluator_map_and_artifacts(tmp_path):
    truth = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 30.0, 50.0, 60.0]]), torch.tensor([[10.0, 10, 40, 40]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    batch = {
        "pixel_values": torch.zeros(2, 3, SIZE, SIZE),
        "orig_sizes": torch.tensor([[SIZE, SIZE], [SIZE, SIZE]]),
        "targets": [{"boxes": b, "labels": c} for b, c in zip(truth, labels)],
        "image_ids": [11, 12],
    }
    from accelerate import Accelerator
    from transformers import DetrImageProcessor

    accelerator, processor = Accelerator(cpu=True), DetrImageProcessor()
    evaluator = DetectionEvaluator(ID2LABEL, processor)
    evaluator.update(accelerator, batch, _detr_outputs(truth, labels))
    metrics = evaluator.compute()
    assert metrics["map_50"] == pytest.approx(1.0) and metrics["map"] == pytest.approx(1.0)
    assert {"ap_circle", "ap_square", "ap_triangle", "map_75", "map_small"} <= set(metrics)
    written = evaluator.save_artifacts(tmp_path, "test")
    results = json.loads((tmp_path / "test_predictions.json").read_text())
    assert {r["image_id"] for r in results} == {11, 12}
    assert results[0]["bbox"] == pytest.approx([4.0, 4.0, 16.0, 16.0], abs=0.01)  # COCO [x, y, w, h]
    assert (tmp_path / "test_predictions.png").stat().st_size > 1000 and len(written) == 2

    evaluator = DetectionEvaluator(ID2LABEL, processor)
    evaluator.update(accelerator, batch, _detr_outputs([(b + 20).clamp(max=SIZE) for b in truth], labels))
    assert evaluator.compute()["map_50"] < 0.5


# ---- models ------------------------------------------------------------------------------------------------------
def test_hub_style_detector_gets_a_resized_head_and_offline_config(tiny_detr_dir):
    task, _ = _task(image_size=48)
    model, processor = task.load_model(ModelArgs(model=str(tiny_detr_dir)), ID2LABEL)
    assert model.config.id2label == ID2LABEL
    assert model.class_labels_classifier.out_features == len(ID2LABEL) + 1  # + "no object"
    assert processor.size == {"shortest_edge": 48, "longest_edge": 48}
    assert task.head_modules(model) == ["bbox_predictor", "class_labels_classifier"]
    assert task.lora_targets(model) == ["q_proj", "v_proj"]
    assert task.backbone(model) is model.model.backbone
    assert model.config.backbone_config.use_pretrained_backbone is False


def test_timm_classifier_becomes_detector_backbone_with_its_weights(tiny_timm_efficientnet_dir, tmp_path):
    from transformers import AutoModelForObjectDetection, TimmWrapperForImageClassification

    task, _ = _task(image_size=SIZE)
    model, processor = task.load_model(ModelArgs(model=str(tiny_timm_efficientnet_dir)), ID2LABEL)
    classifier = TimmWrapperForImageClassification.from_pretrained(tiny_timm_efficientnet_dir).timm_model.state_dict()
    backbone = task.backbone(model).model.state_dict()
    stem = next(k for k in backbone if k.endswith("conv_stem.weight"))
    assert torch.equal(backbone[stem], classifier["conv_stem.weight"])
    # timm's frozen norms keep their activation (DETR's own replacement would silently drop it)
    assert any(type(m).__name__ == "FrozenBatchNormAct2d" for m in task.backbone(model).modules())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone_config"]["use_pretrained_backbone"] is False
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path)  # no hub is reachable: must not download
    assert torch.equal(reloaded.model.backbone.model.state_dict()[stem], classifier["conv_stem.weight"])
    assert list(processor.image_mean) == [0.5] * 3


def test_prepare_and_collate_feed_the_model(tiny_detr_dir, shapes):
    task, data_args = _task(image_size=SIZE)
    names = task.label_names(shapes, data_args)
    dsd = task.encode_labels(shapes, names)
    model, processor = task.load_model(ModelArgs(model=str(tiny_detr_dir)), dict(enumerate(names)))
    prepared = task.prepare(dsd, processor, data_args)
    batch = task.collate([prepared["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE) and batch["pixel_mask"].all()
    for labels, target in zip(batch["labels"], batch["targets"]):
        assert labels["boxes"].shape[1] == 4 and ((labels["boxes"] >= 0) & (labels["boxes"] <= 1)).all()
        assert len(target["boxes"]) == len(target["labels"])
    test_batch = task.collate([prepared["test"][i] for i in range(4)])
    row = dsd["test"][0]
    expected = np.array(row["objects"]["bbox"]).reshape(-1, 4)
    expected[:, 2:] += expected[:, :2]
    assert np.allclose(test_batch["targets"][0]["boxes"].numpy(), expected)  # eval targets: original pixels
    outputs = task.forward(model, batch)
    assert torch.isfinite(outputs.loss) and outputs.logits.shape[:2] == (4, 10)


# ---- end to end --------------------------------------------------------------------------------------------------
def write_coco_folder(root: Path, splits: dict[str, int], size: int = SIZE) -> Path:
    """Local COCO folders (`train/`, `test/`: annotations.json + PNGs) of one large shape per image: easy enough
    that a tiny random DETR learns something in a few dozen steps."""
    for seed, (split, count) in enumerate(splits.items()):
        folder = root / split
        folder.mkdir(parents=True)
        images, annotations = [], []
        for i, sample in enumerate(make_shapes(count, size, seed=20 + seed, max_shapes=1, radius_range=(0.25, 0.4))):
            sample.image.save(folder / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
            for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
                annotations.append({"id": len(annotations), "image_id": i, "category_id": label + 1, "bbox": box})
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPE_CLASSES)]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (folder / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="session")
def big_shapes_folder(tmp_path_factory) -> Path:
    return write_coco_folder(tmp_path_factory.mktemp("big-shapes"), {"train": 72, "test": 16})


def _argv(model_dir, data_dir, out, *extra) -> list[str]:
    return [
        "--dataset", str(data_dir), "--model", str(model_dir), "--image_size", str(SIZE),
        "--validation_fraction", "0.12", "--batch_size", "8", "--num_epochs", "3",
        "--learning_rate", "1.0e-3", "--warmup_ratio", "0.0", "--report_to", "none", "--output_dir", str(out),
        *extra,
    ]  # fmt: skip


def _untrained_map50(argv) -> float:
    from accelerate import Accelerator

    from hftl.config import parse_config
    from hftl.runner import prepare_data
    from hftl.tasks import get_task, task_args
    from hftl.trainer import evaluate, make_loader

    config = parse_config(argv, task_args=task_args("detection"))
    task = get_task("detection", config)
    dsd, spec = prepare_data(task, config)
    names = spec.label_names
    torch.manual_seed(config.train.seed)
    model, processor = task.load_model(config.model, dict(enumerate(names)))
    test = task.prepare(dsd, processor, config.data)["test"]
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(make_loader(test, task.collate, 16, False, 0, 0))
    metrics, _ = evaluate(task, accelerator.prepare(model), loader, accelerator, dict(enumerate(names)), processor)
    return metrics["map_50"]


@pytest.mark.slow
def test_full_run_learns_and_pipeline_loads_the_output(tiny_detr_dir, big_shapes_folder, tmp_path):
    from transformers import pipeline

    from hftl.runner import run

    out = tmp_path / "out"
    argv = _argv(tiny_detr_dir, big_shapes_folder, out, "--num_epochs", "5")
    before = _untrained_map50(argv)
    results = run("detection", argv)
    losses = [record["train_loss"] for record in results["history"]]
    assert losses[-1] < losses[0]
    assert results["test"]["map_50"] > before, (results["test"], before)
    assert results["test"]["num_images"] == 16
    for name in ("test_predictions.json", "test_predictions.png", "all_results.json", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    detector = pipeline("object-detection", model=str(out), threshold=0.0)
    found = detector(make_shapes(1, image_size=96, seed=99)[0].image)
    assert found and {d["label"] for d in found} <= set(SHAPE_CLASSES)
    assert set(found[0]["box"]) == {"xmin", "ymin", "xmax", "ymax"}


@pytest.mark.device
@pytest.mark.slow
def test_lora_adapter_round_trips(tiny_detr_dir, big_shapes_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForObjectDetection

    from hftl.runner import run

    out = tmp_path / "out"
    run(
        "detection",
        _argv(
            tiny_detr_dir,
            big_shapes_folder,
            out,
            "--strategy",
            "lora",
            "--num_epochs",
            "1",
            "--learning_rate",
            "1.0e-2",
        ),
    )
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    assert set(adapter["modules_to_save"]) == {"class_labels_classifier", "bbox_predictor"}
    labels = {"id2label": ID2LABEL, "label2id": {v: k for k, v in ID2LABEL.items()}}
    base = AutoModelForObjectDetection.from_pretrained(
        tiny_detr_dir, num_labels=3, ignore_mismatched_sizes=True, **labels
    )
    restored = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForObjectDetection.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = restored(pixel_values=pixels), merged(pixel_values=pixels)
    assert torch.allclose(a.logits, b.logits, atol=1e-4) and torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-4)
    untouched = AutoModelForObjectDetection.from_pretrained(tiny_detr_dir, num_labels=3, ignore_mismatched_sizes=True)
    # cross-attention: DETR's first decoder self-attention sees all-zero inputs, so its LoRA gets no gradient
    before, after = (m.model.decoder.layers[0].encoder_attn.v_proj.weight for m in (untouched, merged))
    assert not torch.allclose(before, after)


@pytest.mark.slow
def test_frozen_backbone_on_a_timm_classifier(tiny_timm_efficientnet_dir, big_shapes_folder, tmp_path):
    from transformers import AutoModelForObjectDetection, TimmWrapperForImageClassification

    from hftl.runner import run

    out = tmp_path / "out"
    argv = _argv(
        tiny_timm_efficientnet_dir, big_shapes_folder, out, "--strategy", "frozen-backbone", "--num_epochs", "1"
    )
    results = run("detection", argv)
    assert results["trainable_parameters"] < results["total_parameters"]
    classifier = TimmWrapperForImageClassification.from_pretrained(tiny_timm_efficientnet_dir).timm_model.state_dict()
    trained = AutoModelForObjectDetection.from_pretrained(out).model.backbone.model.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(tensor, classifier[name.replace("blocks_", "blocks.", 1)]), name


@pytest.mark.slow
def test_two_rank_run_counts_every_test_image_once(tiny_detr_dir, big_shapes_folder, tmp_path):
    out = tmp_path / "out"
    # 15 test images over 2 ranks x batch 4: the last batch is padded, and must not be counted twice
    argv = _argv(tiny_detr_dir, big_shapes_folder, out, "--num_epochs", "1", "--max_eval_samples", "15")
    argv += ["--batch_size", "4", "--eval_batch_size", "4"]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "recipes" / "detect.py"),
        *argv,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["test"]["num_images"] == 15 and "2 process(es)" in results["hardware"]
    predictions = json.loads((out / "test_predictions.json").read_text())
    assert len({p["image_id"] for p in predictions}) == 15
    assert len(predictions) == 15 * 10  # one per query and image: no duplicates from padding


def test_the_pixel_mask_goes_only_to_detectors_that_read_it(tiny_detr_dir, tiny_detector_dir):
    """Read off the model itself (through the PEFT wrapper), not remembered from load_model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForObjectDetection

    from hftl.tasks.detection.task import takes_pixel_mask

    detr = AutoModelForObjectDetection.from_pretrained(tiny_detr_dir)
    yolos = AutoModelForObjectDetection.from_pretrained(tiny_detector_dir)
    assert takes_pixel_mask(detr) and not takes_pixel_mask(yolos)
    wrapped = get_peft_model(yolos, LoraConfig(r=2, target_modules=["query", "value"]))
    assert not takes_pixel_mask(wrapped)
    batch = DetectionTask.collate(
        [{"pixel_values": torch.rand(3, 64, 64), "labels": {"class_labels": torch.tensor([0]),
          "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}, "targets": {}, "orig_size": (64, 64), "image_id": 0}]
    )  # fmt: skip
    assert np.isfinite(DetectionTask().forward(wrapped, batch).loss.item())  # YOLOS without a pixel_mask argument

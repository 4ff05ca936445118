"""Instance segmentation (`recipes/segment.py --subtask instance`) and Mask2Former for semantic segmentation.

Models: a Mask2Former built from config around timm's `test_efficientnet` (random; tests/fixtures/models.py) or the
bundled ImageNet EfficientNet-Lite0; data: the bundled `hftl/shapes-instances` set (same-class shapes touch and
overlap) and small COCO folders written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict
from PIL import Image

from hftl.config import DataArgs, ModelArgs
from hftl.data import add_row_numbers
from hftl.tasks import mask_classification as mc
from hftl.tasks.instance_segmentation import data as isd
from hftl.tasks.instance_segmentation.args import InstanceSegmentationArgs
from hftl.tasks.instance_segmentation.eval import InstanceEvaluator
from hftl.tasks.instance_segmentation.task import InstanceSegmentationTask

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["circle", "square", "triangle"]
ID2LABEL = dict(enumerate(NAMES))
SIZE = 64


class _Config:  # the task reads only the data options and its own here
    def __init__(self, data, task):
        self.data = data
        self.task = task


def _task(id2label: str | None = None, **data) -> tuple[InstanceSegmentationTask, DataArgs]:
    data_args = DataArgs(dataset=data.pop("dataset", isd.SHAPES_DATASET), **data)
    return InstanceSegmentationTask(_Config(data_args, InstanceSegmentationArgs(id2label=id2label))), data_args


@pytest.fixture(scope="session")
def shapes() -> DatasetDict:
    return isd.load_shapes_instances(SIZE, (("train", 24), ("validation", 8), ("test", 8)))


# ---- data --------------------------------------------------------------------------------------------------------
def test_bundled_set_has_touching_same_class_instances(shapes):
    from scipy.ndimage import binary_dilation

    task, data_args = _task()
    assert task.label_names(shapes, data_args) == NAMES and task.layout == "two_channel"
    touching = 0
    for i, row in enumerate(shapes["train"]):
        masks, classes, crowd = isd.decode_instances(row, row["image"].size, "annotation", "two_channel", 3, f"{i}")
        assert masks.shape[1:] == (SIZE, SIZE) and not crowd.any()
        assert (masks.sum(0) <= 1).all() and all(m.any() for m in masks)  # visible pixels only, disjoint
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                touching += classes[a] == classes[b] and (binary_dilation(masks[a]) & masks[b]).any()
    assert touching >= 3  # what a semantic mask could not separate


def _write_coco(folder: Path, masks: list[np.ndarray], classes: list[int], encoding: str, crowd=None) -> None:
    """One image per mask list entry group: image i holds masks[i] (k, H, W) with classes[i]."""
    from pycocotools import mask as mask_utils

    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (image_masks, image_classes) in enumerate(zip(masks, classes)):
        height, width = image_masks.shape[1:]
        Image.new("RGB", (width, height), (i * 40, 0, 0)).save(folder / f"{i}.png")
        images.append({"id": 100 + i, "file_name": f"{i}.png", "width": width, "height": height})
        for k, (mask, cls) in enumerate(zip(image_masks, image_classes)):
            if encoding == "polygon":  # rectangles: a polygon through their pixel corners is exact
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                segmentation = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                segmentation = [[float(v) for v in segmentation[0]]]
            elif encoding == "rle":
                segmentation = isd.mask_to_rle(mask)
            else:  # uncompressed RLE: counts as a list of run lengths
                flat = np.asfortranarray(mask).flatten(order="F").astype(np.uint8)
                runs, current, count = [], 0, 0
                for value in flat:
                    if value != current:
                        runs.append(count)
                        current, count = value, 0
                    count += 1
                runs.append(count)
                segmentation = {"size": [height, width], "counts": runs}
                assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(segmentation, height, width)), mask)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": 100 + i, "category_id": 7 + cls,
                 "segmentation": segmentation, "iscrowd": int(crowd[i][k]) if crowd else 0}
            )  # fmt: skip
    categories = [{"id": 7 + c, "name": name} for c, name in enumerate(NAMES)]
    (folder / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def _read_back(folder: Path):
    task, data_args = _task(dataset=str(folder))
    dsd = task.load_local(str(folder), data_args)
    assert task.label_names(dsd, data_args) == NAMES
    out = []
    for i, row in enumerate(dsd["train"]):
        out.append(isd.decode_instances(row, row["image"].size, task.annotation_column, task.layout, 3, f"row {i}"))
    return out


@pytest.mark.parametrize("encoding", ["polygon", "rle", "rle-uncompressed"])
def test_coco_polygons_and_rle_round_trip(tmp_path, encoding):
    rng = np.random.default_rng(0)
    masks, classes = [], []
    for _ in range(2):
        image_masks = np.zeros((3, 24, 40), bool)
        for k in range(3):
            x0, y0 = rng.integers(0, 30), rng.integers(0, 18)
            image_masks[k, y0 : y0 + rng.integers(2, 6), x0 : x0 + rng.integers(2, 10)] = True
            if encoding != "polygon":  # RLE carries any shape: punch holes
                image_masks[k] &= rng.random((24, 40)) > 0.3
        masks.append(image_masks)
        classes.append([0, 2, 2])
    _write_coco(tmp_path / "coco", masks, classes, encoding, crowd=[[0, 0, 1], [0, 0, 0]])
    for (got, got_classes, _), want, want_classes in zip(_read_back(tmp_path / "coco"), masks, classes):
        assert np.array_equal(got, want) and got_classes.tolist() == want_classes
    assert _read_back(tmp_path / "coco")[0][2].tolist() == [False, False, True]


def test_row_named_errors_and_negatives(tmp_path):
    masks = [np.ones((1, 8, 8), bool), np.zeros((0, 8, 8), bool)]
    _write_coco(tmp_path / "ok", masks, [[0], []], "rle")
    dsd = DatasetDict({"train": isd.load_coco_folder(tmp_path / "ok")["train"]})
    task, data_args = _task(dataset="local")
    assert task.label_names(dsd, data_args) == NAMES  # the image without annotations is a negative, kept

    coco = json.loads((tmp_path / "ok" / "annotations.json").read_text())
    coco["annotations"][0]["segmentation"]["size"] = [8, 9]
    (tmp_path / "ok" / "annotations.json").write_text(json.dumps(coco))
    dsd = isd.load_coco_folder(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"train split, row 0, instance 0: RLE mask size \[9, 8\].*differs"):
        task.label_names(dsd, data_args)

    coco["annotations"][0]["category_id"] = 99
    (tmp_path / "ok" / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotation 1 \(image 0.png\) has category_id 99"):
        isd.load_coco_folder(tmp_path / "ok")

    two = isd.two_channel_annotation(np.ones((1, 8, 6), bool), np.array([1]))
    bad = DatasetDict({"train": isd.load_shapes_instances(16, (("train", 2),))["train"]})
    bad["train"] = bad["train"].map(lambda row, i: {"annotation": two if i == 1 else row["annotation"]},
                                    with_indices=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"train split, row 1: annotation size 6×8 differs from the image's 16×16"):
        _task()[0].label_names(bad, data_args)


def test_hub_layout_with_one_mask_image_per_instance(tmp_path):
    """Rows as Hub instance sets store them: `objects` {mask: [one binary mask image per instance], category:
    [ClassLabel]}, saved with save_to_disk and read through the same loader as a Hub download."""
    from datasets import ClassLabel, Dataset, Features, List
    from datasets import Image as ImageFeature

    from hftl.data import load_dataset_dict

    features = Features(
        {
            "image": ImageFeature(),
            "objects": {"mask": List(ImageFeature()), "category": List(ClassLabel(names=NAMES))},
        }
    )
    left, right = np.zeros((8, 12), bool), np.zeros((8, 12), bool)
    left[:, :6], right[2:, 5:] = True, True  # two touching instances of one class
    mask_images = [Image.fromarray(m.astype(np.uint8) * 255) for m in (left, right)]
    rows = {
        "image": [Image.new("RGB", (12, 8), (90, 40, 20))] * 2,
        "objects": [{"mask": mask_images, "category": [1, 1]}, {"mask": [], "category": []}],
    }
    Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "good")
    task, data_args = _task(dataset=str(tmp_path / "good"))
    dsd = DatasetDict({"train": load_dataset_dict(data_args, task)["train"]})
    assert task.label_names(dsd, data_args) == NAMES and task.layout == "coco"
    masks, classes, crowd = isd.decode_instances(dsd["train"][0], (12, 8), "objects", "coco", 3, "row 0")
    assert classes.tolist() == [1, 1] and not crowd.any()
    assert np.array_equal(masks[0], left) and np.array_equal(masks[1], right)

    rows["objects"][0]["mask"] = [mask_images[0], mask_images[1].resize((10, 8))]
    Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "bad")
    task, data_args = _task(dataset=str(tmp_path / "bad"))
    dsd = DatasetDict({"train": load_dataset_dict(data_args, task)["train"]})
    with pytest.raises(ValueError, match=r"train split, row 0, instance 1: mask image size 10×8 differs .* 12×8"):
        task.label_names(dsd, data_args)


def test_paired_augmentation_keeps_masks_aligned_and_counts_dropped():
    from torchvision.transforms import v2

    task, _ = _task()
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 2:12, 2:12] = True
    masks[1, 20:30, 20:30] = True
    image = np.zeros((32, 32, 3), np.uint8)
    image[masks[0]] = (255, 0, 0)
    image[masks[1]] = (0, 255, 0)
    torch.manual_seed(0)
    nearest = v2.InterpolationMode.NEAREST  # so every image pixel is exactly an original one
    augment = v2.Compose(
        [v2.RandomHorizontalFlip(), v2.RandomResizedCrop(48, scale=(0.3, 1.0), interpolation=nearest)]
    )
    for _ in range(6):
        pixels, moved, classes = task._augment(augment, Image.fromarray(image), masks, np.array([0, 1]))
        assert pixels.shape == (3, 48, 48) and moved.shape[1:] == (48, 48) and len(moved) == len(classes)
        for mask, cls in zip(moved, classes.tolist()):
            inside = pixels[:, mask]  # the instance's own colour wherever its mask went
            assert (inside[cls] == 255).all() and (inside[1 - cls] == 0).all()
        assert int(sum(m.sum() for m in moved)) == int((pixels.amax(0) > 0).sum())
    crop = v2.Compose([v2.CenterCrop(8)])  # the centre holds neither instance
    _, moved, classes = task._augment(crop, Image.fromarray(image), masks, np.array([0, 1]))
    assert len(moved) == 0 and len(classes) == 0 and task.dropped_instances >= 2


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_perfect_prediction_scores_map_1(tmp_path, shapes):
    evaluator = InstanceEvaluator(ID2LABEL, processor=None)
    predictions, targets = [], []
    for i, row in enumerate(shapes["test"]):
        masks, classes, _ = isd.decode_instances(row, row["image"].size, "annotation", "two_channel", 3, str(i))
        masks, classes = torch.from_numpy(masks), torch.from_numpy(classes)
        predictions.append({"masks": masks, "labels": classes, "scores": torch.ones(len(classes))})
        targets.append({"masks": masks, "labels": classes})
    evaluator.add(predictions, targets, list(range(len(targets))))
    metrics = evaluator.compute()
    assert metrics["map"] == pytest.approx(1.0) and metrics["map_50"] == pytest.approx(1.0)
    assert metrics["box_map"] == pytest.approx(1.0) and metrics["num_images"] == len(targets)
    assert {"ap_circle", "ap_square", "ap_triangle", "map_75", "map_small"} <= set(metrics)
    # one wrong class per image costs precision: below 1
    evaluator = InstanceEvaluator(ID2LABEL, processor=None)
    wrong = [{**p, "labels": (p["labels"] + 1) % 3} if i % 2 else p for i, p in enumerate(predictions)]
    evaluator.add(wrong, targets)
    assert evaluator.compute()["map"] < 0.9


# ---- models ------------------------------------------------------------------------------------------------------
def test_mask2former_around_timm_backbone(tiny_timm_efficientnet_dir):
    from transformers import TimmWrapperForImageClassification

    task, _ = _task(image_size=SIZE)
    model, processor = task.load_model(ModelArgs(model=str(tiny_timm_efficientnet_dir)), ID2LABEL)
    classifier = TimmWrapperForImageClassification.from_pretrained(tiny_timm_efficientnet_dir).timm_model.state_dict()
    for name, tensor in mc.backbone(model)._backbone.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, classifier[name.replace("blocks_", "blocks.", 1)]), name
    assert model.config.id2label == ID2LABEL and model.class_predictor.out_features == 4  # + "no object"
    assert task.head_modules(model) == [
        "class_predictor",
        "model.pixel_level_module.decoder",
        "model.transformer_module",
    ]
    targets = task.lora_targets(model)
    assert targets and all(t.startswith("model.pixel_level_module.encoder.") for t in targets)
    assert (
        processor.size == {"height": SIZE, "width": SIZE}
        and model.config.backbone_config.use_pretrained_backbone is False
    )
    with pytest.raises(ValueError, match="multiple of 32"):
        _task(image_size=48)[0].load_model(ModelArgs(model=str(tiny_timm_efficientnet_dir)), ID2LABEL)


def test_maskformer_with_swin_backbone_parts():
    """MaskFormer (Swin backbone, as the Hub's checkpoints): same parts, LoRA on the Swin attention only."""
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    swin = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=SIZE,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    detr = {"model_type": "detr", "d_model": 32, "encoder_layers": 1, "decoder_layers": 2, "num_queries": 10}
    config = MaskFormerConfig(backbone_config=swin, num_labels=3, fpn_feature_size=32, mask_feature_size=32,
                              decoder_config=detr)  # fmt: skip
    model = MaskFormerForInstanceSegmentation(config)
    assert type(mc.backbone(model)).__name__ == "MaskFormerSwinBackbone"
    assert "mask_embedder" in mc.head_modules(model) and "model.transformer_module" in mc.head_modules(model)
    targets = mc.lora_targets(model)
    assert len(targets) == 8 and all(t.startswith("model.pixel_level_module.encoder.") for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == {"query", "value"}
    masks, classes = mc.semantic_targets(
        torch.tensor([[0, 1], [1, 1]]).repeat_interleave(32, 0).repeat_interleave(32, 1), 255
    )
    out = model(pixel_values=torch.randn(1, 3, SIZE, SIZE), mask_labels=[masks], class_labels=[classes])
    assert torch.isfinite(out.loss) and mc.semantic_scores(out).shape == (1, 3, SIZE // 4, SIZE // 4)


def test_semantic_targets_and_scores():
    labels = torch.tensor([[0, 0, 2], [255, 2, 2]])
    masks, classes = mc.semantic_targets(labels, 255)
    assert classes.tolist() == [0, 2] and masks.sum().item() == 5 and masks[1].tolist() == [[0, 0, 1], [0, 1, 1]]

    class Out:
        class_queries_logits = torch.tensor([[[9.0, -9, -9, -9], [-9, -9, 9, -9]]])  # query 0 → class 0, 1 → class 2
        masks_queries_logits = torch.tensor([[[[9.0, -9]], [[-9.0, 9]]]])

    assert mc.semantic_scores(Out()).argmax(1).tolist() == [[[0, 2]]]


# ---- end to end --------------------------------------------------------------------------------------------------
def _argv(output_dir, model, *extra) -> list[str]:
    return [
        "--subtask", "instance", "--dataset", isd.SHAPES_DATASET, "--model", str(model), "--image_size", str(SIZE),
        "--max_train_samples", "24", "--max_eval_samples", "9", "--batch_size", "4", "--eval_batch_size", "4",
        "--learning_rate", "1.0e-3", "--report_to", "none", "--checkpoint_every_epoch", "false",
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def _test_split_metrics(model, processor, rows: int = 9) -> dict:
    """Test metrics of `model` on the run's test rows in this process: the reference for trained and 2-rank runs."""
    from accelerate import Accelerator

    from hftl.trainer import evaluate, make_loader

    task, data_args = _task(image_size=SIZE)
    dsd = isd.load_shapes_instances()
    dsd = DatasetDict({"test": dsd["test"].select(range(rows))})
    task.label_names(dsd.copy() | {"train": dsd["test"]}, data_args)
    prepared = task.prepare(add_row_numbers(dsd), processor, data_args)
    loader = make_loader(prepared["test"], task.collate, 4, False, 0, 0)
    metrics, _ = evaluate(task, model.eval(), loader, Accelerator(cpu=True), ID2LABEL, processor)
    return metrics


@pytest.mark.slow
def test_training_learns_and_pipeline_names_labels(effnet_dir, tmp_path):
    """The bundled ImageNet backbone in a new Mask2Former: loss falls, test mask mAP@50 beats the untrained
    model's, and the folder loads in pipeline("image-segmentation", subtask="instance") with label names."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation, pipeline

    from hftl.runner import run

    out = tmp_path / "out"
    argv = _argv(out, effnet_dir, "--num_epochs", "6", "--max_train_samples", "48", "--batch_size", "8")
    argv += [
        "--learning_rate",
        "2.0e-3",
        "--layer_decay",
        "0.85",
        "--max_grad_norm",
        "0.1",
        "--eval_every_epochs",
        "3",
    ]
    results = run("segmentation", argv)
    losses = [r["train_loss"] for r in results["history"] if "train_loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    assert results["task"] == "instance-segmentation" and results["test"]["num_images"] == 9
    for name in ("test_predictions.json", "test_predictions.png", "test_categories.json"):
        assert (out / name).is_file(), name

    torch.manual_seed(0)
    task, _ = _task(image_size=SIZE)
    untrained, processor = task.load_model(ModelArgs(model=str(effnet_dir)), ID2LABEL)
    before = _test_split_metrics(untrained, processor)["map_50"]
    assert results["test"]["map_50"] > before + 0.05, (results["test"]["map_50"], before)
    saved = AutoModelForUniversalSegmentation.from_pretrained(out)
    assert _test_split_metrics(saved, AutoImageProcessor.from_pretrained(out))["map"] == pytest.approx(
        results["test"]["map"], abs=1e-6
    )

    segment = pipeline("image-segmentation", model=str(out), subtask="instance", threshold=0.05)
    found = segment(isd.load_shapes_instances()["test"][0]["image"])
    assert found and {f["label"] for f in found} <= set(NAMES) and all(0 <= f["score"] <= 1 for f in found)
    assert found[0]["mask"].size == (96, 96)

    # the Space: each instance its own overlay, named by label and score; the slider sets the score floor
    from gradio_client import handle_file

    from tests.test_spaces import serving

    isd.load_shapes_instances()["test"][0]["image"].save(tmp_path / "scene.png")
    with serving(out, "image-segmentation") as client:
        overlay, notes = client.predict(handle_file(tmp_path / "scene.png"), 0.05, api_name="/predict")
        labels = [a["label"] for a in overlay["annotations"]]
        assert labels and all(
            label.rsplit(" ", 1)[0] in NAMES and float(label.rsplit(" ", 1)[1]) >= 0.05 for label in labels
        )
        _, notes = client.predict(handle_file(tmp_path / "scene.png"), 1.0, api_name="/predict")
        assert "No instances scored 1.00" in notes


@pytest.mark.slow
def test_frozen_backbone_is_bit_identical(tiny_timm_efficientnet_dir, tmp_path):
    from transformers import AutoModelForUniversalSegmentation, TimmWrapperForImageClassification

    from hftl.runner import run

    out = tmp_path / "out"
    results = run(
        "segmentation", _argv(out, tiny_timm_efficientnet_dir, "--strategy", "frozen-backbone", "--max_steps", "2")
    )
    assert results["trainable_parameters"] < results["total_parameters"]
    classifier = TimmWrapperForImageClassification.from_pretrained(tiny_timm_efficientnet_dir).timm_model.state_dict()
    trained = AutoModelForUniversalSegmentation.from_pretrained(out)
    for name, tensor in mc.backbone(trained)._backbone.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(tensor, classifier[name.replace("blocks_", "blocks.", 1)]), name


def test_lora_on_mask2former_built_from_timm_saves_only_the_merged_model(tiny_timm_efficientnet_dir, tmp_path):
    """The rule of every model hftl converts around a timm classifier (DETR, UperNet too): no hub holds its base,
    so an adapter nobody could load is neither saved nor accepted as the only output."""
    from transformers import AutoModelForUniversalSegmentation

    from hftl.config import StrategyArgs
    from hftl.outputs import save_model
    from hftl.strategies import apply_strategy

    task, _ = _task(image_size=SIZE)
    model, processor = task.load_model(ModelArgs(model=str(tiny_timm_efficientnet_dir)), ID2LABEL)
    with pytest.raises(ValueError, match="merge_lora false"):
        apply_strategy(model, task, StrategyArgs(strategy="lora", merge_lora=False), learning_rate=1e-3)
    adapted = apply_strategy(model, task, StrategyArgs(strategy="lora"), learning_rate=1e-3)
    out = tmp_path / "out"
    save_model(adapted.model, processor, str(tiny_timm_efficientnet_dir), True, out)
    assert not (out / "adapter").exists()
    merged = AutoModelForUniversalSegmentation.from_pretrained(out)
    assert not any("lora" in name for name in merged.state_dict())


@pytest.mark.slow
def test_lora_adapter_equals_merged(tiny_timm_efficientnet_dir, tmp_path):
    """On a Mask2Former checkpoint anyone can load (here: one hftl built from timm, saved), the saved adapter on its
    base gives the saved merged model's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForUniversalSegmentation

    from hftl.runner import run

    checkpoint = tmp_path / "m2f"
    model, processor = mc.mask2former_from_timm(
        str(tiny_timm_efficientnet_dir), _timm_config(tiny_timm_efficientnet_dir), ID2LABEL, SIZE
    )
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "out"
    results = run("segmentation", _argv(out, checkpoint, "--strategy", "lora", "--max_steps", "2"))
    assert results["trainable_parameters"] < results["total_parameters"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert all(t.startswith("model.pixel_level_module.encoder.") for t in adapter["target_modules"])
    task, _ = _task(image_size=SIZE)
    base, _ = task.load_model(ModelArgs(model=str(checkpoint)), ID2LABEL)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForUniversalSegmentation.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = with_adapter(pixel_values=pixels), merged(pixel_values=pixels)
    torch.testing.assert_close(a.class_queries_logits, b.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_two_rank_run_counts_each_test_image_once(tiny_timm_efficientnet_dir, tmp_path):
    """9 test images over 2 ranks × batch 4: Accelerate repeats images to even out the ranks, and the metrics must
    drop them; the 2-rank test mAP equals a single-process evaluation of the saved model."""
    from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "segment.py"),
        *_argv(out, tiny_timm_efficientnet_dir, "--max_steps", "1"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["hardware"].startswith("2 process") and results["test"]["num_images"] == 9
    assert len({p["image_id"] for p in json.loads((out / "test_predictions.json").read_text())}) <= 9
    model = AutoModelForUniversalSegmentation.from_pretrained(out)
    metrics = _test_split_metrics(model, AutoImageProcessor.from_pretrained(out))
    assert metrics["map"] == pytest.approx(results["test"]["map"], abs=1e-6)


@pytest.mark.slow
def test_oneformer_trains_with_its_task_prompt(tiny_oneformer_dir, tmp_path):
    """OneFormer through the same path: its task prompt ("the task is instance") is tokenized as the pipeline does,
    a step trains, and the folder (weights, image processor, tokenizer) loads in pipeline(subtask="instance")."""
    from transformers import AutoModelForUniversalSegmentation, AutoTokenizer, pipeline

    from hftl.runner import run

    task, _ = _task(image_size=SIZE)
    model, processor = task.load_model(ModelArgs(model=str(tiny_oneformer_dir)), ID2LABEL)
    prompt = mc.task_prompt(processor, "instance")
    tokenizer = AutoTokenizer.from_pretrained(tiny_oneformer_dir)
    assert prompt.tolist() == tokenizer("the task is instance", padding="max_length", max_length=16).input_ids
    assert model.config.is_training is False and model.model.text_mapper is None
    assert "model.task_encoder" in task.head_modules(model)
    targets = task.lora_targets(model)  # the Swin attention's query and value projections
    assert targets and all(t.startswith("model.pixel_level_module.encoder.") for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} in ({"query", "value"}, {"q_proj", "v_proj"})

    out = tmp_path / "out"
    results = run("segmentation", _argv(out, tiny_oneformer_dir, "--max_steps", "2"))
    assert np.isfinite(results["history"][-1]["train_loss"]) and results["test"]["num_images"] == 9
    assert 0 <= results["test"]["map_50"] <= 1
    saved = AutoModelForUniversalSegmentation.from_pretrained(out)
    assert saved.config.id2label == ID2LABEL and saved.model.transformer_module.decoder.class_embed.out_features == 4
    # every query kept: a 2-step model's masks are weak, and the test is that the pipeline runs and names labels
    # (OneFormer's post-processing compares mask *logits* with mask_threshold, hence a very negative one)
    segment = pipeline("image-segmentation", model=str(out), subtask="instance", threshold=0.0,
                       mask_threshold=-1e4, overlap_mask_area_threshold=0.0)  # fmt: skip
    found = segment(isd.load_shapes_instances()["test"][0]["image"])
    assert found and {f["label"] for f in found} <= set(NAMES) and found[0]["mask"].size == (96, 96)


def test_unsupported_model_is_refused_naming_the_families(tiny_segformer_dir):
    task, _ = _task(image_size=SIZE)
    with pytest.raises(ValueError, match="Mask2Former, MaskFormer or OneFormer"):
        task.load_model(ModelArgs(model=str(tiny_segformer_dir)), ID2LABEL)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "frozen-backbone", "lora"])
def test_mask2former_semantic_segmentation(strategy, tiny_timm_efficientnet_dir, tmp_path):
    """A Mask2Former checkpoint trains for semantic maps with its own loss under every shared strategy; metrics and
    pipeline(subtask=semantic) use the semantic post-processing."""
    from transformers import pipeline

    from hftl.runner import run

    checkpoint = tmp_path / "m2f"
    model, processor = mc.mask2former_from_timm(
        str(tiny_timm_efficientnet_dir), _timm_config(tiny_timm_efficientnet_dir), {0: "a", 1: "b"}, SIZE
    )
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    out = tmp_path / "out"
    argv = [
        "--dataset", "hftl/shapes-segmentation", "--model", str(checkpoint), "--image_size", str(SIZE),
        "--max_train_samples", "16", "--max_eval_samples", "4", "--batch_size", "4", "--max_steps", "3",
        "--report_to", "none", "--checkpoint_every_epoch", "false", "--output_dir", str(out),
        "--strategy", strategy,
    ]  # fmt: skip
    results = run("segmentation", argv)
    assert results["labels"] == ["background", *NAMES] and 0 <= results["test"]["mean_iou"] <= 1
    assert np.isfinite(results["test"]["loss"])
    segment = pipeline("image-segmentation", model=str(out), subtask="semantic")
    found = segment(Image.new("RGB", (80, 80), (120, 30, 30)))
    assert found and {f["label"] for f in found} <= {"background", *NAMES}


def _timm_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)

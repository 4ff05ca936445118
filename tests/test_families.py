"""Every model family × strategy: load with the task's labels (heads resized), train two steps, save, load the output
in `pipeline()`, and for LoRA reload the adapter onto its base with PEFT and match the merged model's outputs.

The models come from tests/fixtures/families.py (one tiny random model per family); a new family is one entry
there and one id here. The batches are synthetic and fixed: what is tested is the model plumbing (heads, frozen
parts, PEFT wrapping, saving), which the data path does not change.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hftl.config import ModelArgs, StrategyArgs
from hftl.models import apply_strategy, optimizer_groups, peft_base, set_frozen_norms_eval
from hftl.runner import save_model
from hftl.tasks import get_task
from tests.fixtures.families import CLASSIFICATION, DETECTION, SEGMENTATION, SIZE

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
STRATEGIES = ("full", "frozen-backbone", "lora")
SLOW = {"timm_vgg", "timm_inception_v3", "timm_levit", "d_fine", "dpt", "beit"}
PIPELINE = {"detection": "object-detection", "segmentation": "image-segmentation"}


def _params(names, marks=()):
    return [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else list(marks)) for n in names]


def _batch(task_name: str, size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, size, size, generator=generator)
    if task_name == "classification":
        return {"pixel_values": pixels, "labels": torch.tensor([0, 2])}
    if task_name == "segmentation":
        return {"pixel_values": pixels, "labels": torch.randint(0, 3, (2, size, size), generator=generator)}
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": boxes},
        {"class_labels": torch.tensor([1]), "boxes": boxes[:1]},
    ]
    return {"pixel_values": pixels, "pixel_mask": torch.ones(2, size, size, dtype=torch.long), "labels": labels}


def _outputs(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return [out.logits] + ([out.pred_boxes] if getattr(out, "pred_boxes", None) is not None else [])


def train_and_save(task_name: str, folder, strategy: str, out, size: int = SIZE):
    """(task, trained model as saved, processor): two AdamW steps through hftl's strategy and save path."""
    task = get_task(task_name)
    model, processor = task.load_model(ModelArgs(model=str(folder)), ID2LABEL)
    heads = task.head_modules(model)
    head_params = {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    assert not _old_label_layers(model, heads)  # every head was resized from the checkpoint's 2 labels to 3
    adapted = apply_strategy(model, task, StrategyArgs(strategy=strategy), learning_rate=1e-2)
    model = adapted.model
    if strategy == "frozen-backbone":
        assert not any(p.requires_grad for p in task.backbone(model).parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(adapted, 0.0))
    batch = _batch(task_name, size)
    model.train()
    set_frozen_norms_eval(model)  # as the trainer does
    for _ in range(2):
        loss = task.forward(model, batch).loss
        assert math.isfinite(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, p in params.items() if p.requires_grad}
    # every head (LeViT's distillation head, RT-DETR's per-layer heads…) trains, whatever the strategy
    trained_heads = _head_params_trained(model, task, head_params)
    assert trained_heads, "no head parameter trained"
    config = SimpleNamespace(model=SimpleNamespace(model=str(folder)), strategy=SimpleNamespace(merge_lora=True))
    save_model(model, processor, config, out)
    return task, model, processor


def _old_label_layers(model, heads: list[str]) -> list[str]:
    return [
        f"{h}.{n}"
        for h in heads
        for n, m in model.get_submodule(h).named_modules()
        if (isinstance(m, torch.nn.Linear) and m.out_features == 2)
        or (isinstance(m, torch.nn.Conv2d) and m.out_channels == 2)
    ]


def _head_params_trained(model, task, head_params: set) -> bool:
    base = peft_base(model)
    names = {n for n, p in base.named_parameters() if p.requires_grad}
    ids = {id(p) for n, p in base.named_parameters() if n in names}
    if hasattr(model, "peft_config"):  # heads train as PEFT's copies (modules_to_save)
        return any("modules_to_save" in n for n in names)
    return head_params <= ids


def _check_pipeline(task_name: str, out) -> None:
    from transformers import pipeline

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    if task_name == "detection":
        found = pipeline("object-detection", model=str(out), threshold=0.0)(image)
        assert found and {d["label"] for d in found} <= set(ID2LABEL.values())
    else:
        found = pipeline("image-segmentation", model=str(out))(image)
        assert found and {d["label"] for d in found} <= set(ID2LABEL.values())
        assert found[0]["mask"].size == image.size


def _check_adapter(task_name: str, folder, out, size: int) -> None:
    """The saved adapter on the base model (PEFT, through hftl.lora.load_adapter) == the merged model."""
    from transformers import (
        AutoModelForImageClassification,
        AutoModelForObjectDetection,
        AutoModelForSemanticSegmentation,
    )

    from hftl.lora import load_adapter

    auto = {
        "classification": AutoModelForImageClassification,
        "detection": AutoModelForObjectDetection,
        "segmentation": AutoModelForSemanticSegmentation,
    }[task_name]
    labels = {"id2label": ID2LABEL, "label2id": {v: k for k, v in ID2LABEL.items()}, "num_labels": 3}
    base = auto.from_pretrained(folder, ignore_mismatched_sizes=True, **labels)
    restored = load_adapter(base, out / "adapter").eval()
    merged = auto.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    for a, b in zip(_outputs(restored, pixels), _outputs(merged, pixels), strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", _params(DETECTION))
def test_detection_family(family, strategy, family_dir, tmp_path):
    folder = family_dir(family)
    train_and_save("detection", folder, strategy, tmp_path)
    _check_pipeline("detection", tmp_path)
    if strategy == "lora":
        _check_adapter("detection", folder, tmp_path, SIZE)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("family", _params(SEGMENTATION))
def test_segmentation_family(family, strategy, family_dir, tmp_path):
    folder = family_dir(family)
    train_and_save("segmentation", folder, strategy, tmp_path)
    _check_pipeline("segmentation", tmp_path)
    if strategy == "lora":
        _check_adapter("segmentation", folder, tmp_path, SIZE)


@pytest.mark.parametrize("family", _params(CLASSIFICATION))
def test_classification_lora_family(family, family_dir, tmp_path):
    from transformers import AutoConfig

    folder = family_dir(family)
    config = AutoConfig.from_pretrained(folder)
    size = int(config.pretrained_cfg["input_size"][-1]) if config.model_type == "timm_wrapper" else 32
    task, model, _ = train_and_save("classification", folder, "lora", tmp_path, size)
    heads = task.head_modules(model)
    if "levit" in family:
        assert len(heads) == 2, heads  # the distillation head is trained too
    _check_adapter("classification", folder, tmp_path, size)

"""Every model family × strategy: load with the task's labels (heads resized), train two steps, save, load the output
in `pipeline()`, and for LoRA reload the adapter onto its base with PEFT and match the merged model's outputs.

The models come from tests/fixtures/families.py (one tiny random model per family); a new family is one entry
there and one id here. The batches are synthetic and fixed: what is tested is the model plumbing (heads, frozen
parts, PEFT wrapping, saving), which the data path does not change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from hftl.config import ModelArgs, StrategyArgs
from hftl.outputs import save_model
from hftl.strategies import apply_strategy, optimizer_groups, set_frozen_norms_eval
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
    # every head (LeViT's distillation head, RT-DETR's per-layer heads…) trains, whatever the strategy; under LoRA
    # as PEFT's copy (modules_to_save)
    root = model.get_base_model() if hasattr(model, "peft_config") else model
    changed_ids = {id(p) for n, p in params.items() if n in changed}
    for head in heads:  # by identity: D-FINE's heads are shared with its decoder and listed there
        assert any(id(p) in changed_ids for p in root.get_submodule(head).parameters()), f"head {head} did not train"
    save_model(model, processor, str(folder), True, out)
    return task, model, processor


def _old_label_layers(model, heads: list[str]) -> list[str]:
    return [
        f"{h}.{n}"
        for h in heads
        for n, m in model.get_submodule(h).named_modules()
        if (isinstance(m, torch.nn.Linear) and m.out_features == 2)
        or (isinstance(m, torch.nn.Conv2d) and m.out_channels == 2)
    ]


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


def test_the_cards_list_of_families_peft_cannot_load_alone_is_complete():
    """hftl/lora.py's ADAPTER_NEEDS_HFTL (the model card's adapter snippet reads it) names exactly the families
    whose adapters need `load_adapter`'s guard (tied per-layer heads: detectors; the classifiers have none)."""
    from hftl.lora import ADAPTER_NEEDS_HFTL, needs_peft_guard

    found = set()
    for build in (DETECTION | SEGMENTATION).values():
        torch.manual_seed(0)
        model, _ = build()
        if needs_peft_guard(model):
            found.add(model.config.model_type)
    assert found == set(ADAPTER_NEEDS_HFTL)


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


# ---- what `full` freezes ---------------------------------------------------------------------------------------
def test_full_trains_the_backbone_the_constructor_would_freeze(tmp_path):
    """Conditional DETR's constructor freezes a ResNet backbone (its name rule, 'stage.1', misses transformers'
    ResNet's 'stages.1', so all of it); from_pretrained drops the flag. hftl's decision: `full` trains every
    parameter of the loaded model, backbone included; `frozen-backbone` keeps it frozen."""
    from transformers import (
        ConditionalDetrConfig,
        ConditionalDetrForObjectDetection,
        ConditionalDetrImageProcessor,
        ResNetConfig,
    )

    from tests.fixtures.families import _DETR_PROC, _DETR_SIZE, TWO_LABELS

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1] * 4, out_features=["stage4"])
    config = ConditionalDetrConfig(backbone_config=backbone, **_DETR_SIZE, **TWO_LABELS)
    built = ConditionalDetrForObjectDetection(config)
    assert not any(p.requires_grad for p in built.model.backbone.parameters())  # the constructor's freezing
    built.save_pretrained(tmp_path / "base")
    ConditionalDetrImageProcessor(**_DETR_PROC).save_pretrained(tmp_path / "base")
    task = get_task("detection")
    for strategy, backbone_trains in (("full", True), ("frozen-backbone", False)):
        model, _ = task.load_model(ModelArgs(model=str(tmp_path / "base")), ID2LABEL)
        adapted = apply_strategy(model, task, StrategyArgs(strategy=strategy), learning_rate=1e-3)
        flags = {p.requires_grad for p in task.backbone(adapted.model).parameters()}
        assert flags == {backbone_trains}, strategy
        if strategy == "full":
            assert adapted.trainable == adapted.total


# ---- timm classifier converted to DETR / UperNet ----------------------------------------------------------------
def _timm_classifier(folder, **model_args):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(0)
    pretrained_cfg = {"input_size": [3, SIZE, SIZE], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    config = TimmWrapperConfig(
        architecture="test_resnet", pretrained_cfg=pretrained_cfg, model_args=model_args or None, num_labels=2
    )
    TimmWrapperForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("task_name", ["detection", "segmentation"])
def test_lora_on_a_converted_timm_classifier_saves_only_what_loads(task_name, tmp_path):
    folder = _timm_classifier(tmp_path / "timm")
    out = tmp_path / "out"
    task, model, _ = train_and_save(task_name, folder, "lora", out)
    assert not (out / "adapter").exists()  # its base (the converted model) exists nowhere else
    _check_pipeline(task_name, out)
    task = get_task(task_name)
    model, _ = task.load_model(ModelArgs(model=str(folder)), ID2LABEL)
    with pytest.raises(ValueError, match="merge_lora false"):
        apply_strategy(model, task, StrategyArgs(strategy="lora", merge_lora=False), learning_rate=1e-3)


@pytest.mark.parametrize("task_name", ["detection", "segmentation"])
def test_timm_model_args_are_refused_in_one_line(task_name, tmp_path):
    folder = _timm_classifier(tmp_path / "timm", stem_width=16)
    with pytest.raises(ValueError, match=r"model_args \{'stem_width': 16\} cannot be carried") as error:
        get_task(task_name).load_model(ModelArgs(model=str(folder)), ID2LABEL)
    assert "\n" not in str(error.value)


def test_converted_backbone_has_the_classifier_weights_by_timms_own_mapping(tmp_path):
    from transformers import TimmWrapperForImageClassification

    folder = _timm_classifier(tmp_path / "timm")
    model, _ = get_task("segmentation").load_model(ModelArgs(model=str(folder)), ID2LABEL)
    classifier = TimmWrapperForImageClassification.from_pretrained(folder).timm_model.state_dict()
    encoder = model.backbone._backbone.state_dict()
    assert torch.equal(encoder["conv1.0.weight"], classifier["conv1.0.weight"])
    assert torch.equal(encoder["layer4.0.conv1.weight"], classifier["layer4.0.conv1.weight"])


# ---- LoRA targets ---------------------------------------------------------------------------------------------
def _lora_model(family, family_dir, **strategy):
    task = get_task("classification")
    model, _ = task.load_model(ModelArgs(model=str(family_dir(family))), ID2LABEL)
    return task, model, StrategyArgs(strategy="lora", **strategy)


def test_dotted_target_names_follow_peft(family_dir):
    task, model, args = _lora_model("levit", family_dir, lora_target_modules="queries_keys_values.linear")
    wrapped = apply_strategy(model, task, args, learning_rate=1e-3).model
    adapted = [n for n, _ in wrapped.named_modules() if n.endswith("queries_keys_values.linear")]
    assert adapted and all(hasattr(wrapped.get_submodule(n), "lora_A") for n in adapted)


def test_unmergeable_targets_are_refused_before_training(family_dir):
    # MobileNetV2's depthwise convolutions: groups (e.g. 48) do not divide the rank, which PEFT requires
    task, model, args = _lora_model("mobilenet_v2", family_dir, lora_target_modules="convolution")
    with pytest.raises(ValueError, match="do not divide --lora_r 8"):
        apply_strategy(model, task, args, learning_rate=1e-3)
    # ConvNeXtV2's depthwise convolutions (8 and 16 groups) fit rank 16, but PEFT cannot merge them
    task, model, args = _lora_model("convnextv2", family_dir, lora_target_modules="dwconv", lora_r=16)
    with pytest.raises(ValueError, match="cannot merge"):
        apply_strategy(model, task, args, learning_rate=1e-3)
    task, model, args = _lora_model(
        "convnextv2", family_dir, lora_target_modules="dwconv", lora_r=16, merge_lora=False
    )
    assert apply_strategy(model, task, args, learning_rate=1e-3).trainable > 0


@pytest.mark.parametrize(
    ("targets", "message"),
    [("classifier", "inside the head"), ("layer", "not layers PEFT can adapt"), ("nothing_here", "match a module")],
)
def test_bad_targets_are_named(family_dir, targets, message):
    task, model, args = _lora_model("mobilenet_v2", family_dir, lora_target_modules=targets)
    with pytest.raises(ValueError, match=message):
        apply_strategy(model, task, args, learning_rate=1e-3)


def test_default_targets_are_plain_mergeable_layers_outside_the_head(family_dir):
    from hftl.lora import matched_modules

    task, model, _ = _lora_model("mobilenet_v2", family_dir)
    targets = task.lora_targets(model)
    matched = matched_modules(model, targets)
    assert matched and all(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in matched.values())
    assert all(m.groups == 1 for m in matched.values() if isinstance(m, torch.nn.Conv2d))
    assert not any(n.startswith("classifier") for n in matched)


def test_modules_to_save_wrap_each_head_once(family_dir):
    """DPT's heads are `neck`, `head` and `auxiliary_head`; PEFT's suffix rule would wrap `head.head` inside
    `head` and `auxiliary_head` too."""
    from hftl.lora import save_names

    task = get_task("segmentation")
    model, _ = task.load_model(ModelArgs(model=str(family_dir("dpt"))), ID2LABEL)
    heads = task.head_modules(model)
    names = save_names(model, heads)
    keys = [n for n, _ in model.named_modules()]
    wrapped = {k for k in keys for u in names if k.endswith(u)}
    assert not any(a.startswith(b + ".") for a in wrapped for b in wrapped)
    covered = {id(p) for k in wrapped for p in model.get_submodule(k).parameters()}
    assert covered == {id(p) for h in heads for p in model.get_submodule(h).parameters()}

"""Shifted test sets (seeded, graded corruptions) and label-free adaptation (AdaBN, TENT) on a real tiny CNN."""

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from hftl.compare.shift import (
    CORRUPTIONS,
    adabn,
    adapted_accuracy,
    batchnorm_layers,
    corrupt,
    evaluate_shift,
    pixel_batches,
    shift_dataset,
)
from tests.fixtures.data import COLOURS


def _colour_dataset(per_class: int, seed: int) -> Dataset:
    """Red vs blue noisy 32x32 images (labels 0 = blue, 1 = red, matching the tiny models' label maps)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(("blue", "red")):
        for _ in range(per_class):
            pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels))
            labels.append(label)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["blue", "red"])})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def _difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corruptions_are_seeded_and_graded(corruption):
    # smooth gradients with an off-centre square: damage grows with severity for every corruption
    ramp = np.linspace(0, 255, 32)
    pixels = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.full((32, 32), 128.0)], -1)
    pixels[4:14, 6:16] = 255
    image = Image.fromarray(pixels.astype(np.uint8))
    digit = Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8), mode="L")
    damage = []
    for severity in (1, 3, 5):
        once = corrupt(image, corruption, severity, torch.Generator().manual_seed(7))
        again = corrupt(image, corruption, severity, torch.Generator().manual_seed(7))
        assert once.size == image.size and once.mode == image.mode
        assert np.array_equal(np.asarray(once), np.asarray(again))
        damage.append(_difference(image, once))
        small = corrupt(digit, corruption, severity, torch.Generator().manual_seed(7))
        assert small.mode == "L" and small.size == (8, 8)
    assert 0 < damage[0] < damage[1] < damage[2], damage
    if corruption in ("noise", "rotation"):  # the random part (noise, rotation sign) depends on the seed
        outputs = {corrupt(image, corruption, 5, torch.Generator().manual_seed(s)).tobytes() for s in range(8)}
        assert len(outputs) > 1


def test_shift_dataset_is_reproducible_per_image():
    data = _colour_dataset(3, seed=0)
    first = shift_dataset(data, "image", "noise", 2, seed=1)
    second = shift_dataset(data, "image", "noise", 2, seed=1)
    assert first["label"] == data["label"]
    for a, b, original in zip(first["image"], second["image"], data["image"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert _difference(a, original) > 1
    with pytest.raises(ValueError, match="Unknown corruption"):
        shift_dataset(data, "image", "fog", 1)


def _train_bn_cnn(model_dir, out_dir):
    """The tiny ResNet (BatchNorm) trained on red vs blue to ~100%, saved with its processor."""
    from transformers import AutoImageProcessor, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    train = _colour_dataset(24, seed=0)
    batches = pixel_batches(train, "image", processor, batch_size=48)
    pixels, labels = batches[0], torch.tensor(train["label"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(25):
        order = torch.randperm(len(labels))[:16]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels[order]).logits, labels[order])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return model, processor


def test_adabn_and_tent_recover_accuracy_when_bn_statistics_are_off(tiny_resnet_dir, tmp_path):
    model, processor = _train_bn_cnn(tiny_resnet_dir, tmp_path / "cnn")
    test = _colour_dataset(16, seed=1)
    # contrast ×0.1 squeezes every image toward grey: the colour cue survives, the source BN statistics do not
    shifted = shift_dataset(test, "image", "contrast", 5, seed=0)
    clean_batches = pixel_batches(test, "image", processor)
    shifted_batches = pixel_batches(shifted, "image", processor)
    labels = test["label"]
    before = [layer.running_mean.clone() for layer in batchnorm_layers(model)]

    clean = adapted_accuracy(model, "none", clean_batches, labels)
    unadapted = adapted_accuracy(model, "none", shifted_batches, labels)
    with_adabn = adapted_accuracy(model, "adabn", shifted_batches, labels)
    with_tent = adapted_accuracy(model, "tent", shifted_batches, labels)
    assert clean >= 0.95
    assert unadapted <= 0.75, "the shift should hurt the unadapted model"
    assert with_adabn >= 0.95 and with_adabn >= unadapted + 0.2
    assert with_tent >= 0.95
    # adaptation works on a copy: the trained model keeps its source statistics
    for old, layer in zip(before, batchnorm_layers(model)):
        assert torch.equal(old, layer.running_mean)

    # the same through the saved folder, as the compare report runs it
    rows = evaluate_shift(tmp_path / "cnn", test, "image", "label", ["contrast"], [5], ["adabn"])
    table = {(r["target"], r["severity"], r["method"]): r for r in rows}
    assert table[("clean", 0, "none")]["accuracy"] == pytest.approx(clean)
    assert table[("contrast", 5, "none")]["accuracy"] == pytest.approx(unadapted)
    assert table[("contrast", 5, "adabn")]["accuracy"] == pytest.approx(with_adabn)
    assert table[("contrast", 5, "none")]["drop"] == pytest.approx(clean - unadapted)


def test_adaptation_needs_batchnorm(tiny_vit_dir):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    batches = pixel_batches(_colour_dataset(2, seed=0), "image", AutoImageProcessor.from_pretrained(tiny_vit_dir))
    with pytest.raises(ValueError, match="BatchNorm"):
        adabn(model, batches)
    rows = evaluate_shift(tiny_vit_dir, _colour_dataset(2, seed=0), "image", "label", ["blur"], [1], ["adabn"])
    assert {r["method"] for r in rows} == {"none"}
    assert all(r["skipped"] == ["adabn"] for r in rows)

"""The offline bundle: the converted EfficientNet-Lite0 really is an ImageNet model, digits split as promised,
backbone weights load into detection/segmentation backbones, and the shared tiny-model fixtures load."""

import json

import numpy as np
import pytest
import torch
from datasets import ClassLabel
from datasets import Image as ImageFeature
from PIL import Image

from hftl import bundled
from hftl.bundled import (
    BUNDLED_DATASETS,
    BUNDLED_MODELS,
    EFFICIENTNET_LITE0,
    efficientnet_lite0_timm_state_dict,
    load_bundled_dataset,
    load_timm_backbone_weights,
    materialize_model,
    register_dataset,
    resolve_model,
)

TEN_LABELS = {i: f"class_{i}" for i in range(10)}


@pytest.fixture(scope="module")
def timm_weights():
    return efficientnet_lite0_timm_state_dict()


@pytest.fixture(scope="module")
def digits():
    return load_bundled_dataset("hftl/digits")


def _sample_photos() -> dict:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return {name: Image.fromarray(image) for name, image in zip(photos.filenames, photos.images)}


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def test_converted_model_recognises_imagenet_photos(effnet_dir):
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(effnet_dir))
    photos = _sample_photos()
    names = sorted(photos)
    assert [n.rsplit("/", 1)[-1] for n in names] == ["china.jpg", "flower.jpg"]
    predictions = classify([photos[n] for n in names], top_k=1)
    assert [p[0]["label"] for p in predictions] == ["palace", "daisy"]
    config = json.loads((effnet_dir / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["label_names"][698] == "palace" and config["label_names"][985] == "daisy"
    assert "model_args" not in config or not config["model_args"]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert config["pretrained_cfg"]["interpolation"] == "bicubic"


def test_processor_uses_timm_preprocessing(effnet_dir):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(effnet_dir)
    assert processor.data_config["input_size"] == (3, 224, 224)
    assert processor.data_config["crop_pct"] == pytest.approx(0.875)
    pixels = processor(Image.new("RGB", (300, 200), (255, 255, 255)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.allclose(pixels, torch.ones_like(pixels))  # mean/std 0.5 maps white to exactly 1


def test_fresh_head_keeps_backbone(effnet_dir, timm_weights):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(
        effnet_dir,
        num_labels=10,
        id2label=TEN_LABELS,
        label2id={v: k for k, v in TEN_LABELS.items()},
        ignore_mismatched_sizes=True,
    )
    assert model.timm_model.classifier.weight.shape == (10, 1280)
    assert model.config.id2label == TEN_LABELS
    for name in ("conv_stem.weight", "blocks.6.0.conv_pwl.weight", "bn2.running_var"):
        assert torch.equal(model.timm_model.state_dict()[name], timm_weights[name]), name
    with torch.no_grad():
        logits = model.eval()(torch.zeros(2, 3, 64, 64)).logits
    assert logits.shape == (2, 10)


def test_resolve_model_maps_only_bundled_names(effnet_dir):
    assert resolve_model(EFFICIENTNET_LITE0) == str(effnet_dir)
    assert resolve_model("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert resolve_model("/some/local/folder") == "/some/local/folder"
    with pytest.raises(ValueError, match="hftl/efficientnet-lite0"):
        materialize_model("hftl/no-such-model")


def test_materialize_writes_once_atomically_and_rebuilds_stale(tmp_path, monkeypatch):
    calls = []

    def write_toy(folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    monkeypatch.setenv("HFTL_CACHE", str(tmp_path))
    monkeypatch.setitem(BUNDLED_MODELS, "test/toy", write_toy)
    stale = tmp_path / "models" / "test" / "toy"
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_text("left by an interrupted run")

    path = materialize_model("test/toy")
    assert path == stale and (path / "config.json").exists() and not (path / "partial.bin").exists()
    assert calls[0] != path  # written elsewhere, then moved into place
    assert materialize_model("test/toy") == path and len(calls) == 1
    assert [p.name for p in path.parent.iterdir()] == ["toy"]  # no staging folders left behind


def test_concurrent_materialize_agrees_on_one_folder(tmp_path, monkeypatch):
    import threading
    import time

    def write_slowly(folder):
        time.sleep(0.2)  # both callers are mid-write when the first one moves its folder into place
        (folder / "config.json").write_text(json.dumps({"writer": threading.get_ident()}))

    monkeypatch.setenv("HFTL_CACHE", str(tmp_path))
    monkeypatch.setitem(BUNDLED_MODELS, "test/slow", write_slowly)
    results, errors = [], []

    def call():
        try:
            results.append(materialize_model("test/slow"))
        except Exception as error:  # surfaced by the assert below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(results)) == 1
    assert json.loads((results[0] / "config.json").read_text())["writer"] in {t.ident for t in threads}
    assert [p.name for p in results[0].parent.iterdir()] == ["slow"]


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def write_broken(folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    monkeypatch.setenv("HFTL_CACHE", str(tmp_path))
    monkeypatch.setitem(BUNDLED_MODELS, "test/broken", write_broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        materialize_model("test/broken")
    assert list((tmp_path / "models" / "test").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# timm backbone weights


def test_backbone_weights_load_into_features_only_model(timm_weights):
    import timm

    full = timm.create_model("tf_efficientnet_lite0").eval()
    full.load_state_dict(timm_weights)
    features = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    loaded = load_timm_backbone_weights(features)
    assert len(loaded) == len(features.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
        got = features(x)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-5)


def test_backbone_weights_load_through_wrappers(timm_weights):
    import timm
    from transformers import TimmBackbone, TimmBackboneConfig

    backbone = TimmBackbone(
        TimmBackboneConfig(backbone="tf_efficientnet_lite0", use_pretrained_backbone=False, out_indices=(2, 3, 4))
    )
    loaded = load_timm_backbone_weights(backbone)
    assert loaded and all(name.startswith("_backbone.") for name in loaded)
    assert torch.equal(backbone._backbone.blocks[3][0].conv_pw.weight, timm_weights["blocks.3.0.conv_pw.weight"])

    other_head = timm.create_model("tf_efficientnet_lite0", num_classes=5)
    head_before = other_head.classifier.weight.clone()
    load_timm_backbone_weights(other_head)
    assert torch.equal(other_head.bn2.weight, timm_weights["bn2.weight"])
    assert torch.equal(other_head.classifier.weight, head_before)  # a 5-way head stays fresh

    with pytest.raises(ValueError, match="conv_stem"):
        load_timm_backbone_weights(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="do not fit"):
        load_timm_backbone_weights(timm.create_model("tf_efficientnet_lite0", in_chans=1))


# ---------------------------------------------------------------------------------------------------------------
# digits


def test_digits_features_and_split_sizes(digits):
    assert list(digits) == ["train", "validation", "test"]
    assert {name: len(split) for name, split in digits.items()} == {"train": 1257, "validation": 180, "test": 360}
    features = digits["train"].features
    assert isinstance(features["image"], ImageFeature)
    assert isinstance(features["label"], ClassLabel) and features["label"].names == [str(d) for d in range(10)]
    image = digits["test"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    assert max(np.asarray(row["image"]).max() for row in digits["validation"]) == 255


def test_digits_splits_partition_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    source = load_digits()
    expected = sorted(
        (np.rint(img * 255 / 16).astype(np.uint8).tobytes(), int(y)) for img, y in zip(source.images, source.target)
    )
    rows = [row for split in digits.values() for row in split]
    got = sorted((np.asarray(row["image"], dtype=np.uint8).tobytes(), row["label"]) for row in rows)
    assert got == expected


def test_digits_splits_are_stratified(digits):
    overall = np.bincount(np.concatenate([split["label"] for split in digits.values()]), minlength=10)
    for name, split in digits.items():
        counts = np.bincount(split["label"], minlength=10)
        expected = overall * len(split) / overall.sum()
        assert np.all(np.abs(counts - expected) <= 1.5), (name, counts, expected)


def test_digits_are_deterministic(digits):
    again = load_bundled_dataset("hftl/digits")
    for name in digits:
        assert again[name]["label"] == digits[name]["label"]
        assert np.array_equal(np.asarray(again[name][7]["image"]), np.asarray(digits[name][7]["image"]))


def test_unknown_dataset_names_known_ones():
    with pytest.raises(ValueError, match="hftl/digits"):
        load_bundled_dataset("hftl/nope")


def test_registered_loader_string_is_imported_lazily(monkeypatch):
    monkeypatch.setattr(bundled, "BUNDLED_DATASETS", dict(BUNDLED_DATASETS))
    register_dataset("test/digits-again", "hftl.bundled:load_digits_dataset")
    assert len(bundled.load_bundled_dataset("test/digits-again")["validation"]) == 180
    with pytest.raises(ValueError, match="package.module:function"):
        register_dataset("test/bad", "hftl.bundled.load_digits_dataset")


# ---------------------------------------------------------------------------------------------------------------
# shared tiny-model fixtures


@pytest.mark.parametrize("fixture", ["tiny_vit_dir", "tiny_resnet_dir", "tiny_timm_dir"])
def test_tiny_models_load_and_classify(fixture, request):
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    folder = request.getfixturevalue(fixture)
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert model.config.id2label == {0: "blue", 1: "red"}
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    processor = AutoImageProcessor.from_pretrained(folder)
    image = Image.new("RGB", (50, 40), (200, 40, 40))
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    predictions = pipeline("image-classification", model=str(folder))(image)
    assert {p["label"] for p in predictions} == {"blue", "red"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-4)

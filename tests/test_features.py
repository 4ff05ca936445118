"""Linear probe on cached features (hftl/fastpaths/probe_features.py): same result as running the frozen backbone
every epoch."""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

from hftl.fastpaths.probe_features import HeadMismatch, HeadOnly, extract_head_inputs
from hftl.runner import run


def _probe(data: Path, model: Path, out: Path, cache: bool) -> dict:
    # --probe_standardise (default on) scales the head's input the same way on both paths
    argv = ["--dataset", str(data), "--model", str(model), "--strategy", "linear-probe", "--augment", "false"]
    argv += ["--num_epochs", "3", "--batch_size", "8", "--learning_rate", "5.0e-2", "--report_to", "none"]
    argv += ["--output_dir", str(out), "--cache_features", str(cache).lower(), "--checkpoint_every_epoch", "false"]
    return run("classification", argv)


@pytest.mark.slow
def test_cached_probe_matches_uncached_and_saves_a_pipeline_model(tmp_path, colour_folder, tiny_vit_dir):
    cached = _probe(colour_folder, tiny_vit_dir, tmp_path / "cached", cache=True)
    uncached = _probe(colour_folder, tiny_vit_dir, tmp_path / "uncached", cache=False)

    assert cached["test"]["accuracy"] == pytest.approx(uncached["test"]["accuracy"], abs=1e-6)
    assert cached["eval"]["loss"] == pytest.approx(uncached["eval"]["loss"], rel=1e-4)
    original = load_file(tiny_vit_dir / "model.safetensors")
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("cached", "uncached")}
    for name, tensor in weights["cached"].items():
        if name.startswith("classifier."):
            # the head trained the same way on the same inputs, and actually moved
            torch.testing.assert_close(tensor, weights["uncached"][name], atol=1e-5, rtol=1e-4)
            assert not torch.equal(tensor, original[name])
        else:
            assert torch.equal(tensor, original[name]), f"backbone parameter {name} changed"

    from PIL import Image
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(tmp_path / "cached"), device="cpu")
    red = Image.new("RGB", (32, 32), (200, 40, 40))
    assert classify(red)[0]["label"] in {"red", "blue"}


def _random_loader(size: int, batches: int = 2):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, size, size, generator=generator)
    return [{"pixel_values": pixels, "labels": torch.arange(4) % 2}] * batches


NESTED_HEADS = [("tiny_resnet_dir", "classifier.1"), ("tiny_timm_dir", "timm_model.fc")]


@pytest.mark.parametrize("fixture, head_name", NESTED_HEADS)
def test_head_inputs_reproduce_logits_when_the_head_is_nested(request, fixture, head_name):
    """ResNet's classifier is Sequential(Flatten, Linear) and timm's sits inside timm_model: hook the Linear."""
    model = AutoModelForImageClassification.from_pretrained(request.getfixturevalue(fixture)).eval()
    head = model.get_submodule(head_name)
    loader = _random_loader(32)
    features, labels = extract_head_inputs(model, head, loader, Accelerator(cpu=True))
    assert features.shape == (8, head.in_features) and labels.tolist() == [0, 1, 0, 1] * 2
    with torch.no_grad():
        torch.testing.assert_close(head(features[:4]), model(pixel_values=loader[0]["pixel_values"]).logits)


def test_post_processed_head_output_is_refused():
    class Doubled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Flatten(), nn.Linear(12, 2)

        def forward(self, pixel_values):
            return ImageClassifierOutput(logits=2 * self.classifier(self.body(pixel_values)))

    model = Doubled()
    with pytest.raises(HeadMismatch):
        extract_head_inputs(model, model.classifier, _random_loader(2), Accelerator(cpu=True))


def test_cached_split_processes_each_row_once_and_returns_the_same_items():
    from datasets import Dataset

    from hftl.fastpaths.processed_cache import CachedSplit, cache_processed

    calls = []

    def transform(batch):
        calls.append(len(batch["x"]))
        return {"pixel_values": [torch.full((2,), float(x)) for x in batch["x"]], "labels": batch["x"]}

    plain = Dataset.from_dict({"x": list(range(6))}).with_transform(transform)
    cached = cache_processed({"validation": plain, "train": plain}, ["validation"])
    assert cached["train"] is plain and isinstance(cached["validation"], CachedSplit)
    split = cached["validation"]
    first = split.__getitems__([0, 1, 2]) + [split[i] for i in range(3, 6)]
    calls.clear()
    again = split.__getitems__([0, 1, 2, 3, 4, 5])
    assert calls == []  # served from memory
    assert [item["labels"] for item in again] == list(range(6))
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, again))
    assert cache_processed({"validation": plain}, ["validation"], max_mb=0)["validation"] is plain


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_probe_trains_on_tiny_features_and_saves_raw_feature_weights(tmp_path, tiny_timm_dir, cache):
    """The tiny random timm ResNet's features are ~1e-6 on digits: on raw features AdamW at lr 0.02 left the head at
    chance (test accuracy 0.10, loss ln 10, where logistic regression on standardised features gets 0.85); the head
    trains on features scaled to unit RMS and the saved model, which takes raw features, scores what the probe did.
    Uncached (without augmentation, so on the same features) the head trains inside the model with the same scale:
    0.49 as cached, where raw features gave 0.14."""
    argv = ["--dataset", "hftl/digits", "--model", str(tiny_timm_dir), "--strategy", "linear-probe", "--shots", "10",
            "--image_size", "32", "--hflip", "false", "--learning_rate", "2.0e-2", "--max_steps", "60",
            "--batch_size", "16", "--max_eval_samples", "100", "--eval_every_epochs", "1000", "--report_to", "none",
            "--output_dir", str(tmp_path / "probe"), "--checkpoint_every_epoch", "false",
            "--cache_features", str(cache).lower(), "--augment", "false"]  # fmt: skip
    result = run("classification", argv)
    assert result["test"]["accuracy"] > 0.3, result["test"]  # chance 0.1; 0.49 measured (60 steps at 32 px)
    # the probe's last evaluation ran on rescaled cached features, the test on the saved (folded) full model
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "probe").eval()
    head = reloaded.get_submodule("timm_model.fc")
    assert head.weight.abs().max() > 1e3  # raw-feature weights: the features are tiny


def _tiny_features(shape=(40, 6)):
    generator = torch.Generator().manual_seed(0)
    return 1e-6 * torch.randn(shape, generator=generator) + 3e-6 * torch.rand(shape[1], generator=generator)


@pytest.mark.parametrize(
    "head",
    [nn.Linear(6, 3), nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(6, 3)), nn.Linear(6, 3, bias=False)],
    ids=["linear", "flatten-linear", "no-bias"],
)
def test_standardising_keeps_the_heads_function_and_folds_back(head):
    torch.manual_seed(0)
    head.eval()
    features = _tiny_features()
    before = head(features).detach()
    probe = HeadOnly(head)
    assert probe.standardise(features) is None
    inputs = features / probe.scale
    assert inputs.pow(2).mean().sqrt().item() == pytest.approx(1, rel=1e-4)  # what the head trains on
    torch.testing.assert_close(probe(features).logits, before, rtol=1e-4, atol=1e-12)
    with torch.no_grad():  # a training step's worth of change in the standardised parametrisation
        linear = head if isinstance(head, nn.Linear) else head[2]
        linear.weight.add_(0.5)
    trained = probe(features).logits.detach()
    probe.fold()
    assert probe.scale is None and not head._forward_pre_hooks
    torch.testing.assert_close(head(features), trained, rtol=1e-4, atol=1e-6)


def test_a_head_that_is_not_one_linear_trains_on_raw_features():
    head = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    weights = {k: v.clone() for k, v in head.state_dict().items()}
    probe = HeadOnly(head)
    assert "not one Linear" in probe.standardise(_tiny_features())
    assert probe.scale is None and all(torch.equal(v, head.state_dict()[k]) for k, v in weights.items())

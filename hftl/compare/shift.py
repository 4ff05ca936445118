"""Distribution shift: how much accuracy a trained classifier loses on corrupted or other test sets, and how much
label-free test-time adaptation wins back.

Corruptions (blur, noise, contrast, rotation, brightness) are torchvision functional transforms at graded
severities 1..5, seeded per image, so a shifted test set is the same on every run and machine. Adaptation needs
only the unlabelled target images:

- AdaBN (Li et al., 2016): recompute every BatchNorm layer's running mean/variance on the target data.
- TENT (Wang et al., ICLR 2021): minimise prediction entropy on the target data, updating only the BatchNorm
  affine parameters (normalising with batch statistics); then recompute the running statistics as AdaBN does, so
  predictions do not depend on how the test set is batched.

Both need BatchNorm layers (CNNs: ResNet, EfficientNet, ConvNeXt does not); a model without any is reported as
"not applicable" rather than silently unchanged.

Usage:
    from hftl.compare.shift import evaluate_shift
    rows = evaluate_shift("outputs/run", test_dataset, "image", "label", ["blur", "noise"], [1, 3], ["adabn"])
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable

import torch
import torchvision.transforms.v2.functional as TF
from datasets import Dataset
from torch import nn

from hftl.modeling import ensure_rgb

# Per-severity parameters (index 0 = severity 1). Blur sigma and noise std are relative to the image side / the
# 0..1 pixel range, so 8x8 digits and 224x224 photos get comparable damage.
SEVERITY_PARAMS = {
    "blur": [0.04, 0.07, 0.10, 0.14, 0.18],  # Gaussian sigma, fraction of the shorter side
    "noise": [0.08, 0.14, 0.22, 0.32, 0.45],  # Gaussian noise std on 0..1 pixels
    "contrast": [0.55, 0.4, 0.28, 0.18, 0.1],  # contrast factor (1 = unchanged)
    "rotation": [10.0, 20.0, 30.0, 45.0, 60.0],  # degrees, random sign per image
    "brightness": [0.15, 0.25, 0.35, 0.45, 0.6],  # added to 0..1 pixels
}
CORRUPTIONS = tuple(SEVERITY_PARAMS)
ADAPT_METHODS = ("adabn", "tent")


def _generator(seed: int, corruption: str, severity: int, index: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}:{corruption}:{severity}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))


def corrupt(image, corruption: str, severity: int, generator: torch.Generator):
    """One corrupted copy of a PIL image (same mode and size)."""
    if corruption not in SEVERITY_PARAMS:
        raise ValueError(f"Unknown corruption {corruption!r}; choose from {', '.join(CORRUPTIONS)}.")
    if not 1 <= severity <= 5:
        raise ValueError(f"Severity must be 1..5, got {severity}.")
    value = SEVERITY_PARAMS[corruption][severity - 1]
    mode = image.mode if image.mode in ("L", "RGB") else "RGB"
    pixels = TF.to_dtype(TF.pil_to_tensor(image.convert(mode)), torch.float32, scale=True)
    if corruption == "blur":
        side = min(pixels.shape[-2:])
        sigma = max(value * side, 0.3)
        # reflect padding needs the kernel radius below the image side
        kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * side - 1)
        out = TF.gaussian_blur(pixels, [kernel, kernel], [sigma, sigma])
    elif corruption == "noise":
        out = pixels + value * torch.randn(pixels.shape, generator=generator)
    elif corruption == "contrast":
        out = TF.adjust_contrast(pixels, value)
    elif corruption == "rotation":
        sign = 1.0 if torch.rand(1, generator=generator).item() < 0.5 else -1.0
        out = TF.rotate(pixels, sign * value, interpolation=TF.InterpolationMode.BILINEAR)
    else:  # brightness
        out = pixels + value
    return TF.to_pil_image(out.clamp(0, 1), mode=mode)


def shift_dataset(dataset: Dataset, image_column: str, corruption: str, severity: int, seed: int = 0) -> Dataset:
    """The dataset with every image corrupted; image i always gets the same noise for a given seed."""

    def apply(example, index):
        return {
            image_column: corrupt(
                example[image_column], corruption, severity, _generator(seed, corruption, severity, index)
            )
        }

    fingerprint = hashlib.sha256(f"{dataset._fingerprint}:{corruption}:{severity}:{seed}".encode()).hexdigest()[:16]
    return dataset.map(apply, with_indices=True, keep_in_memory=True, new_fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------------------------------
# Test-time adaptation (no target labels)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _require_batchnorm(model: nn.Module, method: str) -> list:
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(
            f"{method} adapts BatchNorm layers and {type(model).__name__} has none (ViTs use LayerNorm); "
            "choose a CNN or drop this adaptation method."
        )
    return layers


@torch.no_grad()
def adabn(model: nn.Module, pixel_batches: Iterable[torch.Tensor]) -> nn.Module:
    """Replaces the BatchNorm running statistics with those of the target batches (in place; returns the model)."""
    layers = _require_batchnorm(model, "AdaBN")
    device = next(model.parameters()).device
    model.eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average: every target batch counts the same
        layer.train()
    for pixels in pixel_batches:
        model(pixel_values=pixels.to(device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
        layer.eval()
    return model


def tent(model: nn.Module, pixel_batches: list[torch.Tensor], epochs: int = 1, lr: float = 1e-3) -> nn.Module:
    """Entropy minimisation on the BatchNorm affine parameters (batch statistics), then AdaBN statistics."""
    layers = _require_batchnorm(model, "TENT")
    device = next(model.parameters()).device
    model.eval()
    model.requires_grad_(False)
    params = []
    for layer in layers:
        layer.train()  # normalise with the current batch's statistics while adapting
        for param in (layer.weight, layer.bias):
            if param is not None:
                param.requires_grad_(True)
                params.append(param)
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        for pixels in pixel_batches:
            logits = model(pixel_values=pixels.to(device)).logits.float()
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            entropy.backward()
            optimizer.step()
    model.requires_grad_(False)
    return adabn(model, pixel_batches)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


def pixel_batches(dataset: Dataset, image_column: str, processor, batch_size: int = 64) -> list[torch.Tensor]:
    """The images through the model's own image processor (as pipeline() would), batched."""
    batches = []
    for start in range(0, len(dataset), batch_size):
        images = [ensure_rgb(im) for im in dataset[start : start + batch_size][image_column]]
        batches.append(processor(images, return_tensors="pt")["pixel_values"])
    return batches


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[torch.Tensor], labels: list[int]) -> float:
    model.eval()
    device = next(model.parameters()).device
    preds = torch.cat([model(pixel_values=p.to(device)).logits.argmax(-1).cpu() for p in batches])
    return (preds == torch.tensor(labels)).float().mean().item()


def adapted_accuracy(model: nn.Module, method: str, batches: list[torch.Tensor], labels: list[int]) -> float:
    """Accuracy after adapting a copy of the model to `batches` (the labels are only used to score)."""
    if method == "none":
        return accuracy(model, batches, labels)
    candidate = copy.deepcopy(model)
    if method == "adabn":
        adabn(candidate, batches)
    elif method == "tent":
        tent(candidate, batches)
    else:
        raise ValueError(f"Unknown adaptation {method!r}; choose from none, {', '.join(ADAPT_METHODS)}.")
    return accuracy(candidate, batches, labels)


def parse_corruptions(text: str | None, option: str) -> list[str]:
    """The corruption names of a comma list ('none' or empty: none), each checked; `option` names the flag."""
    names = [] if (text or "none").strip().lower() == "none" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in SEVERITY_PARAMS:
            raise ValueError(f"{option}: unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)} or none.")
    return names


def _other_dataset(config, dataset: str, names: list[str], option: str):
    """(run config, task, DatasetDict with standard splits, DataSpec) for the extra test set `dataset`, checked to
    hold a label column with the class names `names`; errors name `option` and the fix."""
    from copy import deepcopy

    from hftl.data import TEST_NAMES, VALIDATION_NAMES, load_dataset_dict, standard_splits
    from hftl.tasks import get_task

    other = deepcopy(config)
    other.data.dataset, other.data.shots, other.data.image_column, other.data.label_column = dataset, None, None, None
    other.data.dataset_config = other.data.dataset_revision = None
    task = get_task("classification", other)
    try:
        dsd = load_dataset_dict(other.data, task)
        # only a test split is needed (shift benchmarks often have nothing else); a dataset without one is all test
        splits = [name for name in (*TEST_NAMES, *VALIDATION_NAMES) if name in dsd] + list(dsd)
        other.data.train_split = other.data.validation_split = other.data.test_split = splits[0]
        dsd = standard_splits(dsd, other.data, other.train.seed)
        spec = task.data_spec(dsd, other.data)
    except (ValueError, OSError) as error:  # not found, no labels, no image column, no splits: say which option
        raise ValueError(
            f"{option}: extra test set {dataset!r} cannot be used: {error} It must be a dataset (Hub id, folder or "
            "bundled name) with an image and a label column over the same classes; fix or drop it."
        ) from None
    if set(spec.label_names) != set(names):
        missing, extra = sorted(set(names) - set(spec.label_names)), sorted(set(spec.label_names) - set(names))
        raise ValueError(
            f"{option}: extra test set {dataset!r} has other classes than the training data (missing {missing}, "
            f"not trained on {extra}); it needs the same class names ({len(names)}: {names[:10]}). Fix or drop it."
        )
    return other, task, dsd, spec


def check_eval_datasets(config, datasets: list[str], names: list[str], option: str) -> None:
    """Every extra test set loads and has the class names `names`: checked before training, where a bad one used to
    be found only after the whole fine-tune (its images are opened when it is evaluated)."""
    for dataset in datasets:
        _other_dataset(config, dataset, names, option)


def eval_dataset(config, dataset: str, names: list[str], image_column: str, label_column: str, option: str = ""):
    """Another dataset's test split with its labels mapped onto the model's (same class names required)."""
    from datasets import ClassLabel

    from hftl.runner import prepare_data

    other, task, _, _ = _other_dataset(config, dataset, names, option or "--eval_datasets")
    dsd, spec = prepare_data(task, other)
    other_names, image, label = spec.label_names, spec.image_column, spec.label_column
    to_model = [names.index(n) for n in other_names]
    test = dsd["test"].select_columns([image, label])
    test = test.map(lambda ex: {label: to_model[ex[label]]}, keep_in_memory=True)
    test = test.cast_column(label, ClassLabel(names=names))
    renames = {old: new for old, new in ((image, image_column), (label, label_column)) if old != new}
    return test.rename_columns(renames) if renames else test


def shift_targets(dataset: Dataset, image_column: str, corruptions: list[str], severities: list[int], seed: int):
    """(name, severity, dataset) for the clean set and every corruption × severity."""
    yield "clean", 0, dataset
    for corruption in corruptions:
        for severity in severities:
            yield corruption, severity, shift_dataset(dataset, image_column, corruption, severity, seed)


def evaluate_shift(
    model_dir,
    dataset: Dataset,
    image_column: str,
    label_column: str,
    corruptions: list[str],
    severities: list[int],
    methods: list[str],
    seed: int = 0,
    batch_size: int = 64,
    extra_targets: list[tuple[str, Dataset]] = (),
) -> list[dict]:
    """Accuracy of the saved classifier in `model_dir` on the clean and shifted test sets, before ("none") and
    after each adaptation method. Rows: {target, severity, method, accuracy, drop, skipped}: drop = clean
    unadapted accuracy − this; methods that do not apply to the model (no BatchNorm) are listed in `skipped`."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    for method in methods:
        if method not in ADAPT_METHODS:
            raise ValueError(f"Unknown adaptation {method!r}; choose from {', '.join(ADAPT_METHODS)}.")
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    usable = [m for m in methods if batchnorm_layers(model)]
    targets = list(shift_targets(dataset, image_column, corruptions, severities, seed))
    targets += [(name, 0, ds) for name, ds in extra_targets]
    rows, clean = [], {}
    for name, severity, target in targets:
        batches = pixel_batches(target, image_column, processor, batch_size)
        labels = list(target[label_column])
        for method in ["none", *usable]:
            value = adapted_accuracy(model, method, batches, labels)
            if name == "clean":
                clean[method] = value
            rows.append(
                {
                    "target": name,
                    "severity": severity,
                    "method": method,
                    "accuracy": value,
                    "drop": clean.get("none", value) - value,
                }
            )
    for row in rows:
        row["skipped"] = sorted(set(methods) - set(usable))
    return rows

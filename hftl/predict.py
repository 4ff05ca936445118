"""Predict with a trained model: a local output folder, a Hub id, a bundled name, or a PEFT adapter repo.

    from hftl.predict import predict
    predict("user/my-model", ["cat.jpg"], top_k=3)     # CLI: hftl predict --model user/my-model cat.jpg --top-k 3

Adapters (adapter_config.json at the root, as `hftl push` writes for --merge_lora false runs) are applied to their
base model (from adapter_config.json) through PEFT, with the fine-tuned labels from the config.json next to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hftl.outputs import RESULTS_FILE


class ModelNotAvailable(RuntimeError):
    """The model cannot be found locally, in the cache, or on the Hub; the message says how to get it."""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline_message(model: str, error: Exception) -> str:
    return (
        f"Cannot load {model!r}: the Hub at {_endpoint()} is not reachable and the model is not in the local cache "
        f"({type(error).__name__}). Offline, use the local Hub endpoint: run `hftl hub serve &` and "
        "`hftl hub seed` (bundled model and data), then pass `--endpoint http://127.0.0.1:8765` (or export "
        "HF_ENDPOINT=http://127.0.0.1:8765 and HF_HUB_DISABLE_XET=1); or pass a local model folder to --model."
    )


def read_json(model: str, filename: str, token=None) -> dict | None:
    """A JSON file of a local folder or a Hub repo; None when there is no such file. Hub failures become
    ModelNotAvailable with the fix in the message."""
    if Path(model).is_dir():
        path = Path(model) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return json.loads(Path(hf_hub_download(model, filename, token=token)).read_text())
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, ConnectionError) as error:
        if isinstance(error, LocalEntryNotFoundError) and _cached(model, "config.json", "adapter_config.json"):
            return None  # offline with the model cached: this file simply is not part of it
        raise ModelNotAvailable(_offline_message(model, error)) from error
    except EntryNotFoundError:  # after LocalEntryNotFoundError, its subclass
        return None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
        raise ModelNotAvailable(
            f"{model!r} is neither a local folder nor a model repo on {_endpoint()} ({type(error).__name__}). "
            "Check the id (user/name), your token (HF_TOKEN), or run `hftl hub seed` for bundled models."
        ) from error


def _cached(model: str, *filenames: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(model, name), str) for name in filenames)


def go_offline_if_unreachable(timeout: float = 3.0) -> bool:
    """When the Hub endpoint does not accept connections, switch huggingface_hub to offline mode (cache only), so a
    missing model fails at once instead of after the client's retries with backoff (~30 s per file)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY")):
        return bool(constants.HF_HUB_OFFLINE)
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return False
    except OSError:
        constants.HF_HUB_OFFLINE = True
        return True


def infer_task(model: str, token=None) -> str:
    """The pipeline task of a model: all_results.json's pipeline_tag (hftl runs), else the builder's answer (card,
    then architecture)."""
    from hftl.spaces import builder

    results = read_json(model, RESULTS_FILE, token)
    if results and results.get("pipeline_tag") in builder.TASKS:
        return results["pipeline_tag"]
    return builder.infer_task(model, token)


def load_pipeline(model: str, task: str | None = None, token=None, runtime: str = "pytorch"):
    """A transformers pipeline for `model`; bundled names resolve to their offline folder, adapters go via PEFT;
    runtime onnx/openvino serves the model's export (`hftl export`) instead."""
    from hftl.bundled import resolve_model
    from hftl.spaces import builder

    model = resolve_model(model)
    if not Path(model).is_dir():
        go_offline_if_unreachable()
    # Hub look-ups first, through read_json: an unreachable Hub or a wrong id fails with the fix in the message
    read_json(model, "adapter_config.json", token)
    if runtime == "pytorch":  # an export's own report names its task
        task = task or infer_task(model, token)
    if task is not None and task not in builder.TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(builder.TASKS)}.")
    try:
        return builder.load_pipeline(model, task, token, runtime)
    except OSError as error:  # transformers wraps hub connection failures in OSError
        if "connect" in str(error).lower() or "cache" in str(error).lower():
            raise ModelNotAvailable(_offline_message(model, error)) from error
        raise


def _check_images(images: list[str]) -> None:
    from PIL import Image, UnidentifiedImageError

    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image {path} does not exist.")
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path} is not a readable image ({error}).") from error


def predict(
    model: str, images: list[str], top_k: int = 5, task: str | None = None, token=None, runtime: str = "pytorch"
) -> list:
    """Per image: classification → [{label, score}] (best first, at most top_k); detection → [{label, score, box}];
    segmentation → [{label, score, mask}]."""
    _check_images(images)
    pipe = load_pipeline(model, task, token, runtime)
    if pipe.task == "image-classification":
        top_k = min(top_k, len(pipe.model.config.id2label))
        outputs = pipe(images, top_k=top_k)
    elif getattr(pipe.model.config, "hftl_subtask", None):  # Mask2Former/MaskFormer: instance or semantic
        outputs = pipe(images, subtask=pipe.model.config.hftl_subtask)
    else:
        outputs = pipe(images)
    single = len(images) == 1 and isinstance(outputs, list) and outputs and isinstance(outputs[0], dict)
    return [outputs] if single else outputs


def format_predictions(images: list[str], predictions: list) -> str:
    lines = []
    for image, found in zip(images, predictions):
        lines.append(f"{image}:")
        for item in found:
            box = item.get("box")
            where = f"  box {[round(v) for v in box.values()]}" if isinstance(box, dict) else ""
            score = item.get("score")
            lines.append(
                f"  {item['label']}\t{score:.4f}{where}" if score is not None else f"  {item['label']}{where}"
            )
    return "\n".join(lines)

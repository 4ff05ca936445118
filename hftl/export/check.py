"""The checks an export must pass before it is written as done: parity with PyTorch on real test images, int8
accuracy on the test split, and latency (p50/p95 at batch 1, throughput at batch 32) for PyTorch vs the export."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

# fp32 exports must reproduce PyTorch: max |diff| of any output (logits, boxes) relative to the output's scale,
# and the arg-max (top-1 label; per query for detection, per pixel for segmentation) on this share of items
THRESHOLDS = {
    "onnx": {"max_rel_diff": 1.0e-3, "agreement": 0.99},
    "openvino": {"max_rel_diff": 1.0e-3, "agreement": 0.99},
}
INT8_MAX_ACCURACY_DROP = 0.01  # one point on the test split
BATCH = 32


@dataclass
class Images:
    """Real images for the checks: a parity batch, calibration images, and (when known) the labelled test split."""

    parity: list
    calibration: list
    test: object = None  # datasets.Dataset with image_column / label_column (classification accuracy)
    image_column: str | None = None
    label_column: str | None = None
    source: str = ""


def pixel_values(processor, images: list) -> np.ndarray:
    batch = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    return batch.float().numpy()


def torch_outputs(model, names, batch: np.ndarray) -> dict:
    with torch.inference_mode():
        outputs = model(pixel_values=torch.from_numpy(batch))
    return {name: getattr(outputs, name).float().numpy() for name in names}


def parity(reference: dict, exported: dict) -> dict:
    """Per output: max |diff| (absolute, and relative to the reference's largest |value|), and arg-max agreement."""
    result = {}
    for name, ref in reference.items():
        got = exported[name]
        diff = float(np.abs(ref - got).max())
        result[f"{name}_max_abs_diff"] = diff
        result[f"{name}_max_rel_diff"] = diff / max(1.0, float(np.abs(ref).max()))
    logits, got = reference["logits"], exported["logits"]
    axis = 1 if logits.ndim == 4 else -1  # segmentation logits are (batch, classes, h, w)
    result["agreement"] = float((logits.argmax(axis) == got.argmax(axis)).mean())
    return result


def passes(fmt: str, result: dict) -> bool:
    limits = THRESHOLDS[fmt]
    worst = max(v for k, v in result.items() if k.endswith("_max_rel_diff"))
    return worst <= limits["max_rel_diff"] and result["agreement"] >= limits["agreement"]


def accuracy(predict, processor, images: Images) -> float | None:
    """Top-1 accuracy over the labelled test split, read in batches (the split is never held in memory)."""
    if images.test is None or images.label_column is None:
        return None
    correct = total = 0
    for start in range(0, len(images.test), BATCH):
        rows = images.test[start : start + BATCH]
        logits = predict(pixel_values(processor, rows[images.image_column]))["logits"]
        correct += int((logits.argmax(-1) == np.asarray(rows[images.label_column])).sum())
        total += len(logits)
    return correct / total


def latency(predict, batch1: np.ndarray, batch32: np.ndarray, iters: tuple[int, int] = (30, 3)) -> dict:
    """p50/p95 milliseconds per call at batch 1 and images per second at batch 32, after warm-up calls."""
    for _ in range(3):
        predict(batch1)
    times = []
    for _ in range(iters[0]):
        start = time.perf_counter()
        predict(batch1)
        times.append((time.perf_counter() - start) * 1000)
    predict(batch32)
    start = time.perf_counter()
    for _ in range(iters[1]):
        predict(batch32)
    seconds = time.perf_counter() - start
    quantiles = statistics.quantiles(times, n=20, method="inclusive")
    return {
        "batch1_p50_ms": round(statistics.median(times), 3),
        "batch1_p95_ms": round(quantiles[18], 3),
        "batch32_images_per_second": round(len(batch32) * iters[1] / seconds, 1),
    }


def tile(batch: np.ndarray, size: int) -> np.ndarray:
    reps = -(-size // len(batch))
    return np.concatenate([batch] * reps)[:size]

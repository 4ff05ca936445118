"""What both sides of a benchmark share: model folders, synthetic data, memory and timing records.

Both the hftl case (bench/hftl_case.py) and the plain-Trainer baseline (bench/baseline_trainer.py) read the same
model folder and the same data, so a row of the table compares the training code and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a clone without installing

from hftl.system import peak_rss_mb  # noqa: E402

WORK = Path(os.environ.get("HFTL_BENCH_WORK", "/tmp/hftl-bench"))
SYNTHETIC_CLASSES = {"red": (200, 50, 50), "green": (50, 190, 60), "blue": (50, 60, 200), "yellow": (210, 200, 40)}
VIT_SIZES = {
    # name: (hidden, layers, heads, intermediate, patch)
    "vit-tiny": (64, 4, 4, 128, 8),
    "vit-small": (384, 6, 6, 1536, 16),
    "vit-base": (768, 12, 12, 3072, 16),  # ViT-B/16's shape
}
# dense bf16 tensor-core peaks (FLOP/s) by a piece of torch.cuda.get_device_name(); first match wins
BF16_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12))


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cuda_peak_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def write_synthetic_folder(root: Path, image_size: int, per_class: dict[str, int], seed: int = 0) -> Path:
    """An imagefolder (train/validation/test) of noisy images whose class is a colour tint under a random bar:
    learnable in a few epochs, not in a few steps."""
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    from PIL import Image

    for split, count in per_class.items():
        for name, colour in SYNTHETIC_CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.normal(0, 60, (image_size, image_size, 3))
                pixels = np.array(colour) * 0.5 + 64 + noise
                row = rng.integers(0, image_size - 8)
                pixels[row : row + 8] = rng.uniform(0, 255, 3)  # a distractor bar in a random colour
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    marker.touch()
    return root


def write_vit_folder(folder: Path, size_name: str, image_size: int, num_labels: int) -> Path:
    """A randomly initialised ViT classifier built from a config, saved as a standard model folder."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    hidden, layers, heads, intermediate, patch = VIT_SIZES[size_name]
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        image_size=image_size,
        patch_size=patch,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def train_flops_per_image(model_folder: Path, image_size: int) -> float:
    """FLOPs of one forward and backward pass per image, counted by torch's FlopCounterMode on the CPU."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageClassification

    # eager attention: its matmuls are counted, whereas the CPU's fused SDPA kernel may not be in the counter's table
    model = AutoModelForImageClassification.from_pretrained(model_folder, attn_implementation="eager")
    pixels, labels = torch.randn(2, 3, image_size, image_size), torch.zeros(2, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels, labels=labels).loss.backward()
    return counter.get_total_flops() / 2


def bf16_peak_flops(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_FLOPS if key in device_name), None)


def write_effnet_folder(folder: Path, image_size: int) -> Path:
    """The bundled EfficientNet-Lite0 with its processor set to `image_size` (what hftl's --image_size writes into
    the saved folder), so the baseline reads the very same model and preprocessing."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hftl.bundled import EFFICIENTNET_LITE0, resolve_model
    from hftl.modeling import resize_processor

    path = resolve_model(EFFICIENTNET_LITE0)
    model = AutoModelForImageClassification.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    resize_processor(processor, model.config, image_size)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class RunRecord:
    """Timestamps of evaluations during training, to derive pure train time, eval speed and time-to-target."""

    def __init__(self, target: float | None):
        self.target = target
        self.start = time.perf_counter()
        self.rss_before_train = current_rss_mb()
        self.eval_seconds = 0.0
        self.eval_samples = 0
        self.other_seconds = 0.0  # checkpoint saving and the like: not training, not evaluation
        self.epoch_train_seconds: list[float] = []
        self.accuracies: list[float] = []
        self.time_to_target: float | None = None
        self._last_boundary = self.start

    def begin(self) -> None:
        self.start = self._last_boundary = time.perf_counter()
        self.rss_before_train = current_rss_mb()

    def eval_started(self) -> float:
        now = time.perf_counter()
        self.epoch_train_seconds.append(now - self._last_boundary)
        return now

    def eval_finished(self, started: float, samples: int, accuracy: float | None) -> None:
        now = time.perf_counter()
        self.eval_seconds += now - started
        self.eval_samples += samples
        self._last_boundary = now
        if accuracy is not None:
            self.accuracies.append(accuracy)
            if self.time_to_target is None and self.target is not None and accuracy >= self.target:
                self.time_to_target = now - self.start

    def result(self, train_samples: int, **extra) -> dict:
        train_seconds = sum(self.epoch_train_seconds)
        later = self.epoch_train_seconds[1:]
        return {
            "train_images_per_s": train_samples / max(train_seconds, 1e-9),
            "eval_images_per_s": self.eval_samples / max(self.eval_seconds, 1e-9),
            "train_seconds": train_seconds,
            "first_epoch_seconds": self.epoch_train_seconds[0] if self.epoch_train_seconds else None,
            "later_epoch_seconds": sum(later) / len(later) if later else None,
            "peak_rss_mb": peak_rss_mb(),
            "train_rss_delta_mb": peak_rss_mb() - self.rss_before_train,
            "cuda_peak_mb": cuda_peak_mb(),
            "time_to_target_s": self.time_to_target,
            "val_accuracy": self.accuracies[-1] if self.accuracies else None,
            "best_val_accuracy": max(self.accuracies) if self.accuracies else None,
            **extra,
        }


def write_json(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2, default=str))

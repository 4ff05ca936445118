"""Semantic-segmentation metrics and the sample-prediction figure.

Each image's confusion matrix is computed at the label's full resolution (logits upsampled to the mask size, as
`pipeline("image-segmentation")` does) and gathered with `gather_for_metrics`, which drops the samples that
Accelerate repeats to even out the last batch across ranks; summing the matrices gives exact dataset-level IoU.
The definitions match `evaluate`'s mean_iou: classes absent from both labels and predictions are left out of
the means, and ignore-index pixels never count.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MAX_SAMPLES_SHOWN = 6


def upsampled_predictions(logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per-image class maps at each label's size (bilinear upsampling of the logits, then argmax)."""
    return [
        F.interpolate(logits[i : i + 1].float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)
        for i, size in enumerate(sizes)
    ]


def confusion_matrices(preds: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int, ignore_index: int):
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    return torch.stack(
        [
            multiclass_confusion_matrix(
                pred.flatten(), label.flatten(), num_classes, ignore_index=ignore_index, validate_args=False
            )
            for pred, label in zip(preds, labels)
        ]
    )


def metrics_from_confusion(confusion: torch.Tensor, id2label: dict) -> dict:
    """mean IoU, mean (per-class) accuracy, overall accuracy and per-class IoU; rows = true class."""
    confusion = confusion.double()
    true_pixels, predicted_pixels, correct = confusion.sum(1), confusion.sum(0), confusion.diag()
    union = true_pixels + predicted_pixels - correct
    iou = torch.where(union > 0, correct / union.clamp(min=1), torch.full_like(union, float("nan")))
    accuracy = torch.where(true_pixels > 0, correct / true_pixels.clamp(min=1), torch.full_like(union, float("nan")))
    total = true_pixels.sum()
    return {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(accuracy),
        "overall_accuracy": float(correct.sum() / total) if total > 0 else 0.0,
        "per_class_iou": {id2label[i]: (None if torch.isnan(v) else round(float(v), 6)) for i, v in enumerate(iou)},
    }


def _nanmean(values: torch.Tensor) -> float:
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if kept.numel() else 0.0


class SegmentationEvaluator:
    def __init__(self, id2label: dict, ignore_index: int = 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.ignore_index = ignore_index
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.confusion = torch.zeros(len(self.id2label), len(self.id2label), dtype=torch.long)
        self.samples: list[tuple] = []
        self.num_samples = 0

    def update(self, accelerator, batch, outputs) -> None:
        labels = list(batch["labels"])
        preds = upsampled_predictions(outputs.logits.detach(), [tuple(label.shape[-2:]) for label in labels])
        per_image = confusion_matrices(preds, labels, len(self.id2label), self.ignore_index)
        gathered = accelerator.gather_for_metrics(per_image)
        self.confusion += gathered.sum(0).cpu()
        self.num_samples += gathered.shape[0]
        if accelerator.is_main_process and len(self.samples) < MAX_SAMPLES_SHOWN:
            for pixels, pred, label in zip(batch["pixel_values"], preds, labels):
                if len(self.samples) < MAX_SAMPLES_SHOWN:
                    self.samples.append((self._display_image(pixels, label.shape[-2:]), pred.cpu(), label.cpu()))

    def _display_image(self, pixels: torch.Tensor, size) -> np.ndarray:
        image = (pixels.detach().float().cpu() * self.std + self.mean).clamp(0, 1)
        image = F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    def compute(self) -> dict:
        metrics = metrics_from_confusion(self.confusion, self.id2label)
        metrics["num_samples"] = self.num_samples
        return metrics

    def save_artifacts(self, output_dir: str | Path, prefix: str) -> list[Path]:
        """Per-class IoU and the confusion matrix as JSON; a PNG of images with true and predicted masks."""
        out = Path(output_dir)
        json_path = out / f"{prefix}_segmentation_metrics.json"
        names = [self.id2label[i] for i in range(len(self.id2label))]
        json_path.write_text(
            json.dumps({**self.compute(), "labels": names, "confusion_matrix": self.confusion.tolist()}, indent=2)
        )
        return [json_path, self._save_overlays(out / f"{prefix}_predictions.png", names)]

    def _save_overlays(self, path: Path, names: list[str]) -> Path:
        from hftl.plotting import pyplot

        plt = pyplot()
        from matplotlib.patches import Patch

        colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20", max(len(names), 2))
        rows = max(len(self.samples), 1)
        fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
        for row, (image, pred, label) in enumerate(self.samples):
            for col, (title, mask) in enumerate((("image", None), ("true", label), ("predicted", pred))):
                ax = axes[row][col]
                ax.imshow(image)
                if mask is not None:
                    shown = np.ma.masked_where(mask.numpy() == self.ignore_index, mask.numpy())
                    ax.imshow(
                        shown, cmap=colours, vmin=-0.5, vmax=len(names) - 0.5, alpha=0.55, interpolation="nearest"
                    )
                ax.set_title(title if row == 0 else "")
                ax.axis("off")
        if len(names) <= 20:
            handles = [Patch(color=colours(i), label=name) for i, name in enumerate(names)]
            fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), fontsize=8)
        fig.tight_layout(rect=(0, 0.06 if len(names) <= 20 else 0, 1, 1))
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

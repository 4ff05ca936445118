"""Instance-segmentation metrics: COCO mask mAP (and box mAP from the masks), batch by batch, across ranks.

Predictions come from the image processor's own `post_process_instance_segmentation` (what the pipeline runs), at
each image's original size. Each batch's predictions and targets are gathered with `gather_for_metrics` (which
drops the samples Accelerate repeats to even out the last batch, so every image counts once) and handed to
torchmetrics' `MeanAveragePrecision`, which keeps them as COCO RLE: no split's dense masks are ever held at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hftl.plotting import pyplot
from hftl.tasks.detection.eval import save_coco_artifacts
from hftl.tasks.mask_classification import post_process_instances

EVAL_THRESHOLD = 0.0  # score floor for mAP: low, so the precision-recall curve is complete
DRAW_THRESHOLD = 0.5  # score floor for the picture
SAMPLES_TO_DRAW = 6
SUMMARY = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class InstanceEvaluator:
    def __init__(self, id2label: dict, processor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        from torchmetrics.detection import MeanAveragePrecision

        self.id2label = {int(k): v for k, v in id2label.items()}
        self.processor = processor
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        # sync_on_compute off: update() already sees every rank's samples, a second sync would count them twice
        self.metric = MeanAveragePrecision(
            iou_type=("segm", "bbox"), class_metrics=True, backend="pycocotools", sync_on_compute=False
        )
        self.results: list[dict] = []  # COCO results rows (RLE masks)
        self.drawn: list[tuple] = []  # (image uint8 HWC, prediction, target)
        self.num_images = 0

    def update(self, accelerator, batch, outputs) -> None:
        decoded = post_process_instances(
            self.processor,
            _float_outputs(outputs),
            EVAL_THRESHOLD,
            [tuple(int(v) for v in s) for s in batch["orig_sizes"]],
        )
        per_sample = [
            (_packed(prediction_dict(d)), _packed(target), int(image_id))
            for d, target, image_id in zip(decoded, batch["targets"], batch["image_ids"])
        ]
        if accelerator.is_main_process and len(self.drawn) < SAMPLES_TO_DRAW:
            for i, (pred, target, _) in enumerate(per_sample[: SAMPLES_TO_DRAW - len(self.drawn)]):
                self.drawn.append((self._display_image(batch["pixel_values"][i], target), pred, target))
        gathered = accelerator.gather_for_metrics(per_sample, use_gather_object=True)
        self.add(
            [_unpacked(p) for p, _, _ in gathered], [_unpacked(t) for _, t, _ in gathered], [i for _, _, i in gathered]
        )

    def add(self, predictions: list[dict], targets: list[dict], image_ids: list[int] | None = None) -> None:
        """Scores one batch of every rank's images: predictions {masks (n, H, W) bool, scores, labels}, targets
        {masks, labels[, iscrowd]}; boxes are computed from the masks."""
        from hftl.tasks.instance_segmentation.data import mask_to_rle

        preds = [{**p, "boxes": boxes_of(p["masks"])} for p in predictions]
        truths = [{**t, "boxes": boxes_of(t["masks"])} for t in targets]
        self.metric.update(preds, truths)
        self.num_images += len(preds)
        for pred, image_id in zip(preds, image_ids or [None] * len(preds)):
            for mask, score, label in zip(pred["masks"].numpy(), pred["scores"].tolist(), pred["labels"].tolist()):
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "segmentation": mask_to_rle(mask),
                        "score": round(float(score), 5),
                    }
                )

    def _display_image(self, pixels: torch.Tensor, target: dict) -> np.ndarray:
        image = (pixels.detach().float().cpu() * self.std + self.mean).clamp(0, 1)
        size = tuple(target["shape"][-2:])
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    def compute(self) -> dict:
        if self.num_images == 0:
            raise ValueError("No images were evaluated.")
        raw = self.metric.compute()
        metrics = {key: float(raw[f"segm_{key}"]) for key in SUMMARY}
        metrics.update({f"box_{key}": float(raw[f"bbox_{key}"]) for key in ("map", "map_50", "map_75")})
        classes = raw["classes"].reshape(-1).tolist()
        for class_id, ap in zip(classes, raw["segm_map_per_class"].reshape(-1).tolist()):
            metrics[f"ap_{self.id2label.get(int(class_id), class_id)}"] = float(ap)
        metrics["num_images"] = self.num_images
        return metrics

    def save_artifacts(self, output_dir: str | Path, prefix: str) -> list[Path]:
        """`{prefix}_predictions.json` (COCO results, RLE masks), `{prefix}_categories.json`, and a PNG of
        predicted vs true instances."""
        return save_coco_artifacts(self, output_dir, prefix)

    def _draw(self, path: Path) -> Path:
        plt = pyplot()

        fig, axes = plt.subplots(len(self.drawn), 2, figsize=(7, 3.5 * len(self.drawn)), squeeze=False)
        for row, (image, pred, target) in enumerate(self.drawn):
            pred, target = _unpacked(pred), _unpacked(target)
            keep = pred["scores"] >= DRAW_THRESHOLD
            shown = {"masks": pred["masks"][keep], "labels": pred["labels"][keep], "scores": pred["scores"][keep]}
            for col, (title, instances) in enumerate(
                (("true", target), (f"predicted (score ≥ {DRAW_THRESHOLD})", shown))
            ):
                ax = axes[row][col]
                ax.imshow(overlay(image, instances["masks"].numpy()))
                for k, (mask, label) in enumerate(zip(instances["masks"].numpy(), instances["labels"].tolist())):
                    ys, xs = np.nonzero(mask)
                    if len(xs):
                        text = self.id2label.get(int(label), str(label))
                        if "scores" in instances:
                            text += f" {float(instances['scores'][k]):.2f}"
                        ax.text(xs.min(), ys.min(), text, color="white", fontsize=6, backgroundcolor="black")
                ax.set_title(title if row == 0 else "", fontsize=9)
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def prediction_dict(decoded: dict) -> dict:
    """One image's `post_process_instance_segmentation(..., return_binary_maps=True)` result as metric input."""
    info = decoded["segments_info"]
    segmentation = decoded["segmentation"]
    if not info:
        height, width = segmentation.shape[-2:]
        return {
            "masks": torch.zeros((0, height, width), dtype=torch.bool),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.long),
        }
    return {
        "masks": segmentation.detach().cpu() > 0.5,
        "scores": torch.tensor([s["score"] for s in info], dtype=torch.float32),
        "labels": torch.tensor([s["label_id"] for s in info], dtype=torch.long),
    }


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import masks_to_boxes

    return masks_to_boxes(masks) if len(masks) else torch.zeros((0, 4))


def overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Each instance in its own colour over the image."""
    colours = pyplot().get_cmap("tab20")
    shown = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        colour = np.array(colours(k % 20)[:3]) * 255
        shown[mask] = (1 - alpha) * shown[mask] + alpha * colour
    return shown.astype(np.uint8)


def _packed(instances: dict) -> dict:
    """Masks as bits (8× smaller) for the trip across ranks."""
    masks = instances["masks"].cpu().numpy().astype(bool)
    out = {k: v.cpu() for k, v in instances.items() if k != "masks"}
    return {**out, "bits": np.packbits(masks.reshape(-1)), "shape": masks.shape}


def _unpacked(instances: dict) -> dict:
    if "bits" not in instances:
        return instances
    shape = tuple(instances["shape"])
    masks = np.unpackbits(instances["bits"], count=int(np.prod(shape))).reshape(shape).astype(bool)
    out = {k: v for k, v in instances.items() if k not in ("bits", "shape")}
    return {**out, "masks": torch.from_numpy(masks)}


def _float_outputs(outputs):
    for key in ("class_queries_logits", "masks_queries_logits"):
        value = getattr(outputs, key, None)
        if value is not None and value.dtype != torch.float32:
            outputs[key] = value.float()
    return outputs

"""Detection metrics: COCO mAP (torchmetrics, pycocotools backend) over a whole split, gathered across ranks.

Predictions come from the image processor's own `post_process_object_detection`, so DETR's softmax-with-no-object
and RT-DETR/Deformable DETR's sigmoid top-k are each decoded the way their pipeline decodes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Score floor for mAP: low, so the precision-recall curve is complete (COCO keeps up to 100 per image).
EVAL_THRESHOLD = 0.0
# Score floor for the pictures: what a person would call a detection (the pipeline's default too).
DRAW_THRESHOLD = 0.5
SAMPLES_TO_DRAW = 6
SUMMARY_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def save_coco_artifacts(evaluator, output_dir: str | Path, prefix: str) -> list[Path]:
    """The COCO evaluators' files: `{prefix}_predictions.json` (COCO results rows), `{prefix}_categories.json`
    beside it, and `{prefix}_predictions.png` from `evaluator._draw` when samples were kept."""
    out = Path(output_dir)
    json_path = out / f"{prefix}_predictions.json"
    json_path.write_text(json.dumps(evaluator.results))
    categories = [{"id": i, "name": name} for i, name in sorted(evaluator.id2label.items())]
    (out / f"{prefix}_categories.json").write_text(json.dumps(categories, indent=1))
    written = [json_path]
    if evaluator.drawn:
        written.append(evaluator._draw(out / f"{prefix}_predictions.png"))
    return written


class DetectionEvaluator:
    def __init__(self, id2label: dict, processor, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        from torchmetrics.detection import MeanAveragePrecision

        self.id2label = {int(k): v for k, v in id2label.items()}
        self.processor = processor
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        # sync_on_compute off: update() already sees every rank's samples (gather_for_metrics), so a second
        # sync by torchmetrics would count each image once per rank
        self.metric = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools", sync_on_compute=False
        )
        self.results: list[dict] = []  # COCO results rows
        self.drawn: list[tuple] = []  # (image uint8 HWC, predictions, targets) in model-input pixels
        self.num_images = 0

    def update(self, accelerator, batch, outputs) -> None:
        sizes = batch["orig_sizes"]
        decoded = self.processor.post_process_object_detection(
            _float_outputs(outputs), threshold=EVAL_THRESHOLD, target_sizes=sizes
        )
        per_sample = []
        for pred, target, image_id in zip(decoded, batch["targets"], batch["image_ids"]):
            per_sample.append(
                (
                    {
                        "boxes": pred["boxes"].detach().float().cpu(),
                        "scores": pred["scores"].detach().float().cpu(),
                        "labels": pred["labels"].cpu(),
                    },
                    {"boxes": target["boxes"].float().cpu(), "labels": target["labels"].cpu()},
                    int(image_id),
                )
            )
        if accelerator.is_main_process and len(self.drawn) < SAMPLES_TO_DRAW:
            self._keep_for_drawing(batch, per_sample)
        gathered = accelerator.gather_for_metrics(per_sample, use_gather_object=True)
        preds = [p for p, _, _ in gathered]
        targets = [t for _, t, _ in gathered]
        self.metric.update(preds, targets)
        self.num_images += len(gathered)
        for pred, _, image_id in gathered:
            for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
                x0, y0, x1, y1 = box
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(score), 5),
                    }
                )

    def _keep_for_drawing(self, batch, per_sample) -> None:
        pixels, sizes = batch["pixel_values"], batch["orig_sizes"]
        masks = batch.get("pixel_mask")
        for i, (pred, target, _) in enumerate(per_sample[: SAMPLES_TO_DRAW - len(self.drawn)]):
            image = (pixels[i].detach().float().cpu() * self.std + self.mean).clamp(0, 1)
            if masks is not None:  # crop the padding away
                valid = masks[i].cpu()
                image = image[:, : int(valid.any(1).sum()), : int(valid.any(0).sum())]
            scale = torch.tensor([image.shape[2], image.shape[1]] * 2) / sizes[i].cpu().flip(0).repeat(2)
            keep = pred["scores"] >= DRAW_THRESHOLD
            shown = {"boxes": pred["boxes"][keep] * scale, "labels": pred["labels"][keep]}
            shown["scores"] = pred["scores"][keep]
            truth = {"boxes": target["boxes"] * scale, "labels": target["labels"]}
            self.drawn.append(((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8), shown, truth))

    def compute(self) -> dict:
        if self.num_images == 0:
            raise ValueError("No images were evaluated.")
        raw = self.metric.compute()
        metrics = {key: float(raw[key]) for key in SUMMARY_METRICS}
        classes = raw["classes"].reshape(-1).tolist()
        for class_id, ap in zip(classes, raw["map_per_class"].reshape(-1).tolist()):
            metrics[f"ap_{self.id2label.get(int(class_id), class_id)}"] = float(ap)
        metrics["num_images"] = self.num_images
        return metrics

    def save_artifacts(self, output_dir: str | Path, prefix: str) -> list[Path]:
        """`{prefix}_predictions.json` (COCO results; categories listed beside) and `{prefix}_predictions.png`."""
        return save_coco_artifacts(self, output_dir, prefix)

    def _draw(self, path: Path) -> Path:
        from hftl.plotting import pyplot

        plt = pyplot()
        from matplotlib.patches import Rectangle

        columns = min(3, len(self.drawn))
        rows = -(-len(self.drawn) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (image, pred, truth) in zip(axes.flat, self.drawn):
            ax.imshow(image)
            for box in truth["boxes"].tolist():
                ax.add_patch(_rect(Rectangle, box, "lime", "--"))
            for box, label, score in zip(pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist()):
                ax.add_patch(_rect(Rectangle, box, "red", "-"))
                name = self.id2label.get(int(label), str(label))
                ax.text(box[0], box[1], f"{name} {score:.2f}", color="white", fontsize=7, backgroundcolor="red")
        fig.suptitle("predicted (red, score >= 0.5) and true (green, dashed) boxes")
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def _rect(rectangle, box, colour: str, style: str):
    x0, y0, x1, y1 = box
    return rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linestyle=style, linewidth=1.5)


def _float_outputs(outputs):
    """Post-processing in float32 (outputs may be bf16 under autocast)."""
    for key in ("logits", "pred_boxes"):
        value = getattr(outputs, key, None)
        if value is not None and value.dtype != torch.float32:
            outputs[key] = value.float()
    return outputs

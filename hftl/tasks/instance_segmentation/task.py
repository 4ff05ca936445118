"""Instance segmentation (`recipes/segment.py --subtask instance`): what differs from the other tasks.

Data: COCO instances (polygons, RLE or one mask image per instance; iscrowd) or two-channel annotation PNGs, from the
Hub, a local folder, or the bundled `hftl/shapes-instances` (hftl/tasks/instance_segmentation/data.py). Models:
mask-classification models, and OneFormer with its task prompt (hftl/tasks/mask_classification.py). Metrics: COCO
mask and box mAP (eval.py). The output folder loads with `pipeline("image-segmentation", model=out,
subtask="instance")`.
"""

from __future__ import annotations

import numpy as np
import torch
from datasets import DatasetDict

from hftl.bundled import register_dataset
from hftl.data import ROW_COLUMN, add_row_numbers
from hftl.log import get_logger
from hftl.modeling import ensure_rgb, processor_input_size, processor_interpolation, processor_mean_std, train_crop
from hftl.tasks import mask_classification as mc
from hftl.tasks.base import Task
from hftl.tasks.instance_segmentation import data as isd
from hftl.tasks.instance_segmentation.args import InstanceSegmentationArgs
from hftl.tasks.instance_segmentation.eval import InstanceEvaluator

logger = get_logger(__name__)


register_dataset(isd.SHAPES_DATASET, "hftl.tasks.instance_segmentation.data:load_shapes_instances")
KNOWN_NAMES = {isd.SHAPES_DATASET: isd.shapes_class_names()}


class InstanceSegmentationTask(Task):
    name = "instance-segmentation"
    pipeline_tag = "image-segmentation"
    subtask = "instance"
    main_metric = "map_50"
    greater_is_better = True

    args = InstanceSegmentationArgs

    def __init__(self, config=None):
        super().__init__(config)
        self.image_column = None
        self.annotation_column = None
        self.layout = None
        self.label_column = None  # no per-image class: few-shot sampling does not apply
        self.num_labels = None
        self.dropped_instances = 0

    # ---- data -------------------------------------------------------------------------------------------------
    def load_local(self, path: str, data_args) -> DatasetDict:
        return isd.load_coco_folder(path)

    def label_names(self, dsd: DatasetDict, data_args) -> list[str]:
        """Finds the columns and layout, reads class names, and decodes the first rows of every split."""
        features = dsd["train"].features
        self.image_column, self.annotation_column, self.layout = isd.detect_layout(
            features, data_args.image_column, data_args.label_column
        )
        given = None
        if self.options.id2label:
            from hftl.tasks.segmentation.data import read_label_file

            given = read_label_file(self.options.id2label)
        names = isd.category_names(
            features, self.annotation_column, self.layout, dsd, given or KNOWN_NAMES.get(data_args.dataset)
        )
        self.num_labels = len(names)
        for split, ds in dsd.items():
            empty = isd.check_split(ds, split, self.image_column, self.annotation_column, self.layout, len(names))
            if empty:
                logger.info(f"{split}: {empty} image(s) without instances are kept as negatives.")
        return names

    def encode_labels(self, dsd: DatasetDict, names: list[str]) -> DatasetDict:
        return add_row_numbers(dsd)  # rows keep their number through subsampling, for errors in transforms

    # ---- model ------------------------------------------------------------------------------------------------
    def load_model(self, model_args, id2label: dict):
        from transformers import AutoConfig

        from hftl.modeling import resolve_model_path

        path = resolve_model_path(model_args.model, model_args.revision)
        config = AutoConfig.from_pretrained(
            path, revision=model_args.revision, trust_remote_code=model_args.trust_remote_code
        )
        image_size = self.config.data.image_size if self.config is not None else None
        if image_size:
            mc.check_image_size(image_size)
        if config.model_type == "timm_wrapper":
            model, processor = mc.mask2former_from_timm(path, config, id2label, image_size)
        elif mc.is_mask_classification(config) or mc.is_prompted(config):
            model, processor = mc.load_universal(model_args, id2label, image_size, config.model_type)
        else:
            raise ValueError(
                f"{model_args.model!r} ({config.model_type}) is not a mask-classification model. Use a Mask2Former, "
                "MaskFormer or OneFormer checkpoint (e.g. facebook/mask2former-swin-tiny-coco-instance) or a timm "
                "classifier (the backbone of a new Mask2Former)."
            )
        from hftl.tasks.detection.task import mark_backbone_offline

        mark_backbone_offline(model.config)
        model.config.hftl_subtask = self.subtask  # the Space and predict pick the instance post-processing
        return model, processor

    def backbone(self, model):
        return mc.backbone(model)

    def head_modules(self, model) -> list[str]:
        return mc.head_modules(model)

    def lora_targets(self, model) -> list[str]:
        return mc.lora_targets(model)

    # ---- preprocessing ----------------------------------------------------------------------------------------
    def prepare(self, dsd: DatasetDict, processor, data_args, spec=None) -> DatasetDict:
        from torchvision.transforms import v2

        prompt = mc.task_prompt(processor, self.subtask)  # OneFormer's "the task is instance"; None for others
        processor = mc.image_processor_of(processor)
        size = processor_input_size(processor)
        # images resized as the saved processor (evaluation, pipeline()) resizes them; masks always nearest
        geometric = [train_crop(processor, size, data_args.crop_scale_min)]
        if data_args.hflip:
            geometric.insert(0, v2.RandomHorizontalFlip())
        resize = v2.Resize((size, size), processor_interpolation(processor), antialias=True)
        augment = v2.Compose(geometric) if data_args.augment else resize
        normalise = v2.Normalize(*processor_mean_std(processor))
        columns = (self.image_column, self.annotation_column, self.layout, self.num_labels)

        def rows(batch, split):
            image_col, label_col, layout, num_labels = columns
            keys = list(batch)
            for i in range(len(batch[image_col])):
                row = {k: batch[k][i] for k in keys}
                where = f"{split} split, row {row.get(ROW_COLUMN)}"
                image = ensure_rgb(row[image_col])
                masks, classes, crowd = isd.decode_instances(row, image.size, label_col, layout, num_labels, where)
                yield image, masks, classes, crowd, int(row.get(ROW_COLUMN) or 0)

        def train_batch(batch):
            out = {"pixel_values": [], "mask_labels": [], "class_labels": []}
            for image, masks, classes, crowd, _ in rows(batch, "train"):
                masks, classes = masks[~crowd], classes[~crowd]  # crowd regions are not instances to match
                pixels, masks, classes = self._augment(augment, image, masks, classes)
                out["pixel_values"].append(normalise(pixels.float() / 255))
                out["mask_labels"].append(masks.float())
                out["class_labels"].append(classes)
            return _with_prompt(out, prompt)

        def eval_batch(batch, split):
            out = {
                "pixel_values": [],
                "mask_labels": [],
                "class_labels": [],
                "targets": [],
                "orig_size": [],
                "image_id": [],
            }
            items = list(rows(batch, split))
            if not items:
                return out
            pixels = processor([item[0] for item in items], return_tensors="pt")["pixel_values"]
            for pixel_values, (image, masks, classes, crowd, row) in zip(pixels, items):
                out["pixel_values"].append(pixel_values)
                # the loss sees the instances at the input size; metrics see them at the image's own
                solid = torch.from_numpy(masks[~crowd]).float()
                resized = torch.nn.functional.interpolate(solid[None], size=pixel_values.shape[-2:], mode="nearest")
                out["mask_labels"].append(resized[0])
                out["class_labels"].append(torch.from_numpy(classes[~crowd]))
                out["targets"].append(
                    {
                        "masks": torch.from_numpy(masks),
                        "labels": torch.from_numpy(classes),
                        "iscrowd": torch.from_numpy(crowd.astype(np.int64)),
                    }
                )
                out["orig_size"].append((image.size[1], image.size[0]))
                out["image_id"].append(row)
            return _with_prompt(out, prompt)

        return DatasetDict(
            {
                split: ds.with_transform(train_batch if split == "train" else (lambda b, s=split: eval_batch(b, s)))
                for split, ds in dsd.items()
            }
        )

    def _augment(self, augment, image, masks: np.ndarray, classes: np.ndarray):
        """The same flip and crop for the image and its instance masks; instances cropped away are dropped."""
        from torchvision import tv_tensors

        pixels = tv_tensors.Image(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1))
        # one extra all-ones channel keeps the mask tensor non-empty for images without instances
        stacked = np.concatenate([masks, np.ones((1, *masks.shape[1:]), bool)]).astype(np.uint8)
        pixels, moved = augment(pixels, tv_tensors.Mask(torch.from_numpy(stacked)))
        moved = moved.as_subclass(torch.Tensor)[:-1].bool()
        kept = moved.flatten(1).any(1)
        if not bool(kept.all()):
            self._count_dropped(int((~kept).sum()))
        return pixels.as_subclass(torch.Tensor), moved[kept], torch.from_numpy(classes)[kept]

    def _count_dropped(self, count: int) -> None:
        before = self.dropped_instances
        self.dropped_instances += count
        if before == 0 or len(str(self.dropped_instances)) > len(str(before)):  # first time, then each power of ten
            logger.warning("%d instance(s) cropped away by augmentation so far (dropped).", self.dropped_instances)

    @staticmethod
    def collate(examples: list[dict]) -> dict:
        batch = {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "mask_labels": [e["mask_labels"] for e in examples],
            "class_labels": [e["class_labels"] for e in examples],
        }
        if "task_inputs" in examples[0]:
            batch["task_inputs"] = torch.stack([e["task_inputs"] for e in examples])
        if "targets" in examples[0]:
            batch["targets"] = [e["targets"] for e in examples]
            batch["orig_sizes"] = torch.tensor([e["orig_size"] for e in examples], dtype=torch.long)
            batch["image_ids"] = [e["image_id"] for e in examples]
        return batch

    def forward(self, model, batch):
        prompt = {"task_inputs": batch["task_inputs"]} if "task_inputs" in batch else {}
        outputs = model(
            pixel_values=batch["pixel_values"],
            mask_labels=batch["mask_labels"],
            class_labels=batch["class_labels"],
            **prompt,
        )
        if outputs.loss is not None and outputs.loss.dim():
            outputs.loss = outputs.loss.reshape(())  # OneFormer's loss has shape (1,); the loop sums scalars
        return outputs

    def new_evaluator(self, id2label: dict, processor=None):
        processor = mc.image_processor_of(processor)
        return InstanceEvaluator(id2label, processor, *processor_mean_std(processor))


def _with_prompt(out: dict, prompt: torch.Tensor | None) -> dict:
    if prompt is not None:
        out["task_inputs"] = [prompt] * len(out["pixel_values"])
    return out


TASK = InstanceSegmentationTask

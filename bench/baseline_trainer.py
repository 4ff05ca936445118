"""Baseline: fine-tune an image classifier with a plain `transformers.Trainer`, as the transformers docs show
(image processor + `with_transform`, `DefaultDataCollator`, `TrainingArguments`). It stands for what a user would
otherwise run; bench/run.py times it against hftl on the same model, data, size, batch and precision.

Usage:
    python bench/baseline_trainer.py --model MODEL_DIR --data digits|IMAGEFOLDER --out result.json \
        [--epochs 3 --batch_size 32 --lr 2e-3 --bf16 --target 0.9]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RunRecord, write_json  # noqa: E402


def load_data(spec: str):
    from datasets import load_dataset

    if spec == "digits":
        from hftl.bundled import load_digits_dataset  # the same rows and splits hftl trains on

        return load_digits_dataset()
    if spec == "fashion-mnist":
        from hftl.bundled import load_bundled_dataset  # Debian's dataset-fashion-mnist, hftl's splits

        return load_bundled_dataset("hftl/fashion-mnist")
    return load_dataset("imagefolder", data_dir=spec)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--label_smoothing", type=float, default=0.0)
    parser.add_argument("--crop_scale_min", type=float, default=0.7)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--target", type=float, default=None)
    args = parser.parse_args(argv)

    import torch
    from torchvision.transforms import Compose, Normalize, RandomResizedCrop, ToTensor
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        DefaultDataCollator,
        Trainer,
        TrainingArguments,
    )

    dsd = load_data(args.data)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit and len(dsd[split]) > limit:
            dsd[split] = dsd[split].shuffle(seed=42).select(range(limit))
    labels = dsd["train"].features["label"].names
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(
        args.model,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,
    )

    # the docs' recipe: torchvision augmentation for train, the image processor for evaluation
    if hasattr(processor, "data_config"):  # timm models keep size and normalisation in data_config
        data_config = processor.data_config
        size, mean, std = data_config["input_size"][-1], data_config["mean"], data_config["std"]
    else:
        size, mean, std = processor.size["height"], processor.image_mean, processor.image_std
    train_transforms = Compose(
        [RandomResizedCrop(size, scale=(args.crop_scale_min, 1.0)), ToTensor(), Normalize(mean=mean, std=std)]
    )

    def train_transform(examples):
        examples["pixel_values"] = [train_transforms(image.convert("RGB")) for image in examples["image"]]
        del examples["image"]
        return examples

    def eval_transform(examples):
        images = [image.convert("RGB") for image in examples["image"]]
        examples["pixel_values"] = processor(images, return_tensors="pt")["pixel_values"]
        del examples["image"]
        return examples

    train_ds = dsd["train"].with_transform(train_transform)
    eval_ds = dsd["validation"].with_transform(eval_transform)

    def compute_metrics(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    record = RunRecord(args.target)

    class TimedTrainer(Trainer):
        """Only adds timestamps around each evaluation; training is the stock Trainer."""

        def evaluate(self, *a, **kw):
            started = record.eval_started()
            metrics = super().evaluate(*a, **kw)
            record.eval_finished(started, len(eval_ds), metrics.get("eval_accuracy"))
            return metrics

    training_args = TrainingArguments(
        output_dir=str(Path(args.out).with_suffix("")) + "-trainer",
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=0.1,
        lr_scheduler_type="cosine",
        label_smoothing_factor=args.label_smoothing,
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        remove_unused_columns=False,
        dataloader_num_workers=args.num_workers,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        seed=42,
        disable_tqdm=True,
    )
    trainer = TimedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DefaultDataCollator(),
        compute_metrics=compute_metrics,
    )
    record.begin()
    trainer.train()
    result = record.result(train_samples=args.epochs * len(train_ds), impl="baseline", epochs=args.epochs)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()

"""Linear probe on cached features: run the frozen model once, then train only the head on what it saw.

Under `linear-probe` every parameter before the head is frozen, so each epoch would recompute the same backbone
features. Instead the model runs once over train and validation with the evaluation transforms (no augmentation:
cached features cannot be re-augmented), a forward pre-hook on the head captures the head's input, and the shared
trainer loop trains a `HeadOnly` module, which holds the model's own head module, on those tensors. The head's
weights therefore end up in the full model, which is saved and tested as usual (so `pipeline()` loads it).

The head's input is not always the pooled features (ResNet's classifier is Sequential(Flatten, Linear); timm keeps
its classifier at `timm_model.classifier`): the task names the head layer, and the first batch checks that the head
applied to the captured input reproduces the model's logits. If it does not, the uncached path is used.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers.modeling_outputs import ImageClassifierOutput

from hftl.log import get_logger
from hftl.strategies import Adapted

logger = get_logger(__name__)

SUPPORTED_TASKS = ("classification",)


class HeadOnly(nn.Module):
    """The model's head module, fed cached head inputs through the `pixel_values` argument tasks already pass."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, pixel_values: torch.Tensor, **unused) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.head(pixel_values))


class FeatureDataset(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.features[index], "labels": self.labels[index]}


def collate_features(examples: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([e["labels"] for e in examples]).long(),
    }


class HeadMismatch(Exception):
    """The head applied to its captured input does not give the model's logits."""


@torch.no_grad()
def extract_head_inputs(model: nn.Module, head: nn.Module, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs and labels for every row `loader` yields, gathered from all ranks, in float32 on the CPU."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    model.eval()
    features, labels = [], []
    try:
        for batch in loader:
            captured.clear()
            with accelerator.autocast():
                logits = model(pixel_values=batch["pixel_values"]).logits
                if len(captured) != 1:
                    raise HeadMismatch(f"the head ran {len(captured)} times in one forward pass")
                if not features:  # once: the head alone must reproduce the model's output
                    again = head(captured[0])
                    same = again.shape == logits.shape and torch.allclose(again.float(), logits.float(), 1e-2, 1e-3)
                    if not same:
                        raise HeadMismatch("the head's output is post-processed before the logits")
            inputs = captured[0].float().contiguous()
            inputs, batch_labels = accelerator.gather_for_metrics((inputs, batch["labels"]))
            features.append(inputs.cpu())
            labels.append(batch_labels.cpu())
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(labels)


def cached_linear_probe(task, adapted: Adapted, dsd, processor, config, accelerator):
    """(Adapted for a HeadOnly module, train features, validation features, collate), or None where caching does
    not apply (then the caller trains the usual way)."""
    from hftl.trainer import make_loader, wants_channels_last

    if task.name not in SUPPORTED_TASKS or len(task.head_modules(adapted.model)) != 1:
        return None  # LeViT's two heads (averaged) are not one cached-feature head
    model = adapted.model.to(accelerator.device)
    if wants_channels_last(model, config.train.channels_last):
        model = model.to(memory_format=torch.channels_last)
    head = model.get_submodule(task.head_modules(model)[0])
    # evaluation transforms for every split: with augmentation off, train uses the image processor too
    plain = task.prepare(dsd, processor, replace(config.data, augment=False))
    args = config.train
    batch_size = args.eval_batch_size or 2 * args.batch_size
    cached = {}
    try:
        for split in ("train", "validation"):
            loader = make_loader(plain[split], task.collate, batch_size, False, args.seed, args.num_workers)
            features, labels = extract_head_inputs(model, head, accelerator.prepare(loader), accelerator)
            cached[split] = FeatureDataset(features, labels)
    except HeadMismatch as why:
        logger.info(f"cache_features: not used ({why}); the frozen backbone runs every epoch.")
        return None
    logger.info(
        f"cache_features: backbone ran once; head trains on {len(cached['train'])} cached features of size "
        f"{tuple(cached['train'].features.shape[1:])} (no augmentation)."
    )
    head_only = Adapted(HeadOnly(head), adapted.param_groups, adapted.trainable, adapted.total)
    return head_only, cached["train"], cached["validation"], collate_features

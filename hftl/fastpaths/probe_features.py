"""Linear probe on cached features: run the frozen model once, then train only the head on what it saw.

Under `linear-probe` every parameter before the head is frozen, so each epoch would recompute the same backbone
features. Instead the model runs once over train and validation with the evaluation transforms (no augmentation:
cached features cannot be re-augmented), a forward pre-hook on the head captures the head's input, and the shared
trainer loop trains a `HeadOnly` module, which holds the model's own head module, on those tensors. The head's
weights therefore end up in the full model, which is saved and tested as usual (so `pipeline()` loads it).

The head's input is not always the pooled features (ResNet's classifier is Sequential(Flatten, Linear); timm keeps
its classifier at `timm_model.classifier`): the task names the head layer, and the first batch checks that the head
applied to the captured input reproduces the model's logits. If it does not, the uncached path is used.

The head trains on features scaled to unit root-mean-square (one scale from the train features) and the scale is
folded into the head's Linear layer at the end, so the saved model takes raw features. Without it a backbone whose
features are tiny (a randomly initialised one: 1e-6 on digits) leaves the head untrained: AdamW's steps of lr
move the logits by lr × feature. The head's starting weights are rescaled to compute the same function (a
text-initialised head starts where it was), and a head that is not one Linear layer behind shape-only modules
trains on raw features. `InputScale` owns this for both paths: without the cache (`--cache_features false`, or a
head the cache cannot take) `scale_uncached_probe` runs the backbone once over the first train rows for the scale.
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
# the head-input rows the probe scale is estimated from, on both paths (the uncached one runs the backbone once
# over them before training)
SCALE_SAMPLE_ROWS = 512


class InputScale:
    """One unit-RMS scale on a probe head's input, the one owner of `--probe_standardise` for the cached and the
    uncached path: the head's Linear absorbs it while training (W' = W·s) and a forward pre-hook divides its input
    by s, so the head computes the same function; `fold` removes the hook and puts s back into W, after which the
    head takes raw features again."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.scale: float | None = None
        self._hook = None

    @torch.no_grad()
    def apply(self, features: torch.Tensor) -> str | None:
        """Scale from `features` (head inputs, first rows of train) from here on; returns why not where the head
        cannot take it (then nothing changed)."""
        linear = _only_linear(self.head)
        if linear is None or features[0].numel() != linear.in_features or len(features) < 2:
            return "the head is not one Linear layer over the flattened features"
        # one scale for every dimension, no centring: well-scaled features (RMS ~1, as pretrained backbones give)
        # are left as they are; per-dimension standardisation measured worse (digits, 10 shots, lr 0.02: a random
        # EfficientNet's probe 0.77 -> 0.34, its 1280 amplified dimensions overfit)
        rms = features[:SCALE_SAMPLE_ROWS].double().pow(2).mean().sqrt().item()
        scale = rms if rms > 0 else 1.0
        sample = features[:8].to(linear.weight.device, linear.weight.dtype)
        before = self.head(sample)
        _rescale(linear, scale)
        self.scale = scale
        self._hook = self.head.register_forward_pre_hook(lambda module, args: (args[0] / scale, *args[1:]))
        after = self.head(sample)
        if not torch.allclose(after.float(), before.float(), rtol=1e-3, atol=1e-5 * before.abs().max().item()):
            self.fold()  # the layer sees something other than the flattened input: back to raw features
            return "the head's Linear does not see the flattened features"
        return None

    @torch.no_grad()
    def fold(self) -> None:
        if self.scale is not None:
            self._hook.remove()
            _rescale(_only_linear(self.head), 1.0 / self.scale)
            self.scale, self._hook = None, None


class HeadOnly(nn.Module):
    """The model's head module, fed cached head inputs through the `pixel_values` argument tasks already pass;
    scaled first once `standardise` has run (call `fold` after training)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.input_scale = InputScale(head)

    @property
    def scale(self) -> float | None:
        return self.input_scale.scale

    def forward(self, pixel_values: torch.Tensor, **unused) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.head(pixel_values))

    def standardise(self, features: torch.Tensor) -> str | None:
        return self.input_scale.apply(features)

    def fold(self) -> None:
        self.input_scale.fold()


def _only_linear(head: nn.Module) -> nn.Linear | None:
    """The head's one Linear layer, where everything else in it is parameter-free (Flatten, Dropout, Identity)."""
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    others = sum(p.numel() for p in head.parameters()) - sum(p.numel() for m in linears for p in m.parameters())
    return linears[0] if len(linears) == 1 and others == 0 else None


def _rescale(linear: nn.Linear, factor: float) -> None:
    """W x = (W·s)(x / s): the weights times `factor` (the bias is unchanged, as the features are not centred)."""
    linear.weight.copy_((linear.weight.double() * factor).to(linear.weight.dtype))


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
    head_only = HeadOnly(head)
    if config.train.probe_standardise:
        why_not = head_only.standardise(cached["train"].features)
        if why_not:
            logger.info(f"cache_features: the head trains on raw features ({why_not}).")
    head_only = Adapted(head_only, adapted.param_groups, adapted.trainable, adapted.total)
    return head_only, cached["train"], cached["validation"], collate_features


def scale_uncached_probe(task, adapted: Adapted, dsd, processor, config, accelerator) -> InputScale | None:
    """`--probe_standardise` where the head trains inside the full model (`--cache_features false`, or a head the
    cache cannot take): the frozen backbone runs once over the first `SCALE_SAMPLE_ROWS` train rows (evaluation
    transforms, as the cache would) and the head gets the cached path's scale. Returns the applied `InputScale`
    (fold it after training), or None where the head trains on raw features."""
    from datasets import DatasetDict

    from hftl.trainer import make_loader

    names = task.head_modules(adapted.model)
    if len(names) != 1:
        logger.info("probe_standardise: the head trains on raw features (the model has more than one head).")
        return None
    model = adapted.model.to(accelerator.device)
    sample = dsd["train"].select(range(min(SCALE_SAMPLE_ROWS, len(dsd["train"]))))
    plain = task.prepare(DatasetDict({"train": sample}), processor, replace(config.data, augment=False))
    args = config.train
    loader = make_loader(
        plain["train"], task.collate, args.eval_batch_size or 2 * args.batch_size, False, args.seed, 0
    )
    head = model.get_submodule(names[0])
    try:
        features, _ = extract_head_inputs(model, head, accelerator.prepare(loader), accelerator)
    except HeadMismatch as why:
        logger.info(f"probe_standardise: the head trains on raw features ({why}).")
        return None
    scale = InputScale(head)
    why_not = scale.apply(features)
    if why_not:
        logger.info(f"probe_standardise: the head trains on raw features ({why_not}).")
        return None
    logger.info(f"probe_standardise: head inputs scaled by 1/{scale.scale:.3g} (RMS of {len(features)} train rows).")
    return scale

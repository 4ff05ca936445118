"""The accuracy toolkit timm's train.py users expect, as options: augmentation policies, random erasing,
mixup / cutmix, stochastic depth and an EMA of the weights. All from torchvision v2 and torch.optim.swa_utils.

Randomness: the per-item steps run inside `SeededItems` (hftl/trainer.py), whose generator is seeded by (seed,
epoch, index). The batch mixer runs in the collate function, outside that; so each train item also carries a
`mix_seed` drawn from its own seeded generator, and the mixer seeds itself from the batch's first item: the same
with any number of DataLoader workers and after a resume.
"""

from __future__ import annotations

import torch

AUTO_AUGMENT = ("none", "trivialaugment", "randaugment", "autoaugment")


def item_augmentations(data_args) -> list:
    """Steps after the random crop and flip, on PIL images or uint8 tensors: the policy, then random erasing
    (which needs a tensor: on the PIL path it runs after ToImage, before the float conversion)."""
    return policy_steps(data_args) + erasing_steps(data_args)


def policy_steps(data_args) -> list:
    from torchvision.transforms import v2

    policy = getattr(data_args, "auto_augment", "none") or "none"
    if policy == "none":
        return []
    if policy == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if policy == "randaugment":
        return [v2.RandAugment()]
    if policy == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]
    raise ValueError(f"--auto_augment {policy!r}: choose one of {', '.join(AUTO_AUGMENT)}.")


def erasing_steps(data_args) -> list:
    from torchvision.transforms import v2

    p = getattr(data_args, "random_erasing", 0.0) or 0.0
    return [v2.RandomErasing(p=p, value=0)] if p > 0 else []


class BatchMixer:
    """MixUp and/or CutMix (one of them per batch, chosen at random, as in torchvision's references) on a
    collated batch; labels become soft targets (N, num_classes). uint8 pixels stay uint8 (mixed in float and
    rounded: at most half a grey level off), so the decoded path keeps its 4x smaller batches."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        from torchvision.transforms import v2

        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixers:
            raise ValueError("BatchMixer needs --mixup_alpha or --cutmix_alpha above 0.")
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, batch: dict, seed: int) -> dict:
        pixels, labels = batch["pixel_values"], batch["labels"]
        was_uint8 = pixels.dtype == torch.uint8
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            pixels, labels = self.mix(pixels.float() if was_uint8 else pixels, labels)
        if was_uint8:
            pixels = pixels.round_().clamp_(0, 255).to(torch.uint8)
        return {**batch, "pixel_values": pixels, "labels": labels}


def mixes(data_args) -> bool:
    return (getattr(data_args, "mixup_alpha", 0.0) or 0.0) > 0 or (getattr(data_args, "cutmix_alpha", 0.0) or 0.0) > 0


def draw_mix_seed() -> int:
    """Drawn inside an item's seeded generator (after its augmentation, so the crops are unchanged)."""
    return int(torch.randint(2**62, ()))


class WithMixSeed(torch.utils.data.Dataset):
    """Adds `mix_seed` to each item of a train split; other attributes pass through (e.g. `.images`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "mix_seed": draw_mix_seed()}

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def batch_mixer(data_args, num_classes: int) -> BatchMixer | None:
    mixup, cutmix = getattr(data_args, "mixup_alpha", 0.0) or 0.0, getattr(data_args, "cutmix_alpha", 0.0) or 0.0
    return BatchMixer(mixup, cutmix, num_classes) if mixup > 0 or cutmix > 0 else None


def drop_path_kwargs(config, rate: float | None) -> dict:
    """`from_pretrained` kwargs that set stochastic depth, for models whose config has it (transformers' ConvNeXt,
    Swin, BEiT, DINOv2, …) and timm models (TimmWrapper: passed on to timm.create_model)."""
    if rate is None:
        return {}
    if not 0 <= rate < 1:
        raise ValueError(f"--drop_path_rate must be in [0, 1) (got {rate}).")
    if getattr(config, "model_type", None) == "timm_wrapper":
        return {"model_args": {**(getattr(config, "model_args", None) or {}), "drop_path_rate": rate}}
    if hasattr(config, "drop_path_rate"):
        return {"drop_path_rate": rate}
    raise ValueError(
        f"--drop_path_rate: model type {getattr(config, 'model_type', '?')!r} has no stochastic depth (its config "
        "has no drop_path_rate). timm models, ConvNeXt, Swin, BEiT and DINOv2 have it; leave the option unset here."
    )


def new_ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of `model`'s parameters and buffers (BatchNorm statistics included)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not 0 < decay < 1:
        raise ValueError(f"--ema_decay must be between 0 and 1, e.g. 0.999 (got {decay}).")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

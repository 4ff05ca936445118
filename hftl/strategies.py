"""Adaptation strategies, shared by every task.

A strategy takes a model and returns it ready to train: which parameters are frozen, the PEFT wrap, and the
optimizer's parameter groups (per-group learning rates for layer-wise decay and discriminative fine-tuning).
What counts as "head" and "backbone" comes from the task.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hftl.config import StrategyArgs

_BLOCK_INDEX = re.compile(r"^(.*?\.\d+)\.")


@dataclass
class Adapted:
    model: nn.Module
    param_groups: list[dict]
    trainable: int
    total: int
    # Called at the start of each epoch (gradual unfreezing); returns a line to log, or None.
    on_epoch_start: Callable[[int], str | None] = lambda epoch: None
    # Parameters that must not be updated this epoch (gradual unfreezing keeps them requires_grad=True so that
    # DistributedDataParallel still syncs them once they thaw; their gradients are dropped before the step).
    masked: set = field(default_factory=set)

    def trainable_now(self) -> int:
        """Parameters the optimizer updates this epoch: trainable and not held back by gradual unfreezing."""
        return sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and n not in self.masked)

    def summary(self) -> str:
        return (
            f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.trainable / max(self.total, 1):.2f}%)"
        )


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _names_under(model: nn.Module, module_names: list[str]) -> set[str]:
    # by identity: a head shared under two names (D-FINE's class_embed is also model.decoder.class_embed) is
    # listed by named_parameters() under only one of them
    ids = {id(p) for name in module_names for p in model.get_submodule(name).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _backbone_names(model: nn.Module, task) -> set[str]:
    backbone = task.backbone(model)
    ids = {id(p) for p in backbone.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def depth_levels(names: list[str]) -> dict[str, int]:
    """Depth of each parameter, in registration (input → output) order: the stem is 0, each numbered block
    (`encoder.layer.3`, `stages.2`, `blocks.5`) one more, and what follows the last block one more still."""
    order: list[str] = []
    depth = {}
    for name in names:
        match = _BLOCK_INDEX.match(name)
        if match:
            key = match.group(1)
            if key not in order:
                order.append(key)
            depth[name] = order.index(key) + 1
        else:
            depth[name] = 0 if not order else -1  # -1: after the blocks, fixed below
    top = len(order) + 1
    return {n: (top if d == -1 else d) for n, d in depth.items()}


def _groups_by_lr(model: nn.Module, lr_of: dict[str, float]) -> list[dict]:
    by_lr: dict[float, list] = {}
    params = dict(model.named_parameters())
    for name, lr in lr_of.items():
        by_lr.setdefault(lr, []).append((name, params[name]))
    return [{"named_params": named, "lr": lr} for lr, named in sorted(by_lr.items(), reverse=True)]


def _freeze_all_but(model: nn.Module, keep: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)


def apply_strategy(model: nn.Module, task, args: StrategyArgs, learning_rate: float) -> Adapted:
    strategy = args.strategy
    head = _names_under(model, task.head_modules(model))
    if not head:
        raise ValueError(f"Could not find the head modules {task.head_modules(model)} in {type(model).__name__}.")
    masked: set[str] = set()
    on_epoch_start = Adapted.on_epoch_start

    if strategy == "lora":
        model = _wrap_peft(model, task, args)
        lr_of = {n: learning_rate for n, p in model.named_parameters() if p.requires_grad}
    elif strategy in ("linear-probe", "frozen-backbone"):
        if strategy == "linear-probe":
            keep = head
        else:
            keep = {n for n, _ in model.named_parameters()} - _backbone_names(model, task)
        _freeze_all_but(model, keep)
        lr_of = {n: learning_rate * (args.head_lr_scale if n in head else 1.0) for n in keep}
    elif strategy in ("full", "gradual-unfreeze"):
        # every parameter trains, except those frozen in the loaded model itself (fixed embeddings). DETR's and
        # Conditional DETR's constructors freeze a ResNet backbone's stem (or, with transformers' ResNet naming, the
        # whole backbone), but from_pretrained drops that flag: `full` trains the backbone, as the transformers
        # examples do; `frozen-backbone` and --layer_decay are the ways to hold it back.
        _freeze_all_but(model, {n for n, p in model.named_parameters() if p.requires_grad} | head)
        body = [n for n, p in model.named_parameters() if n not in head and p.requires_grad]
        depth = depth_levels(body)
        top = max(depth.values(), default=0)
        if args.freeze_lowest_levels:
            frozen = {n for n in body if depth[n] < args.freeze_lowest_levels}
            _freeze_all_but(model, {n for n, p in model.named_parameters() if p.requires_grad} - frozen)
            body = [n for n in body if n not in frozen]
        decay = args.layer_decay if args.layer_decay is not None else (0.7 if strategy == "gradual-unfreeze" else 1.0)
        lr_of = {n: learning_rate * decay ** (top + 1 - depth[n]) for n in body}
        lr_of.update({n: learning_rate * args.head_lr_scale for n in head})
        if strategy == "gradual-unfreeze":
            on_epoch_start, masked = _gradual_schedule(body, depth, top, args)
    elif strategy == "zero-shot":  # the text-embedding head as it is (hftl/zeroshot.py): nothing trains
        _freeze_all_but(model, set())
        lr_of = {}
    else:  # config.validate rejects unknown names first; this guards direct library use
        raise ValueError(f"Unknown strategy {strategy!r}.")

    trainable, total = count_parameters(model)
    adapted = Adapted(model, _groups_by_lr(model, lr_of), trainable, total, masked=masked)
    if strategy == "gradual-unfreeze":
        adapted.on_epoch_start = lambda epoch: on_epoch_start(epoch, adapted)
        # what trains at the start (the head); each epoch's count is logged and kept in the run's history
        adapted.trainable = adapted.trainable_now()
    return adapted


def _gradual_schedule(body: list[str], depth: dict[str, int], top: int, args: StrategyArgs):
    """Head first; then every `unfreeze_every` epochs the next group of blocks, from the top down."""
    groups = max(1, min(args.unfreeze_groups, top + 1))
    # chunk depth levels 0..top into `groups` contiguous ranges; group 0 is the top-most
    bounds = [round((top + 1) * k / groups) for k in range(groups + 1)]
    group_of = {n: groups - 1 - next(g for g in range(groups) if bounds[g] <= depth[n] < bounds[g + 1]) for n in body}

    def on_epoch_start(epoch: int, adapted: Adapted) -> str | None:
        thawed = min(groups, epoch // max(1, args.unfreeze_every))
        adapted.masked = {n for n in body if group_of[n] >= thawed}
        return (
            f"gradual-unfreeze: epoch {epoch}: {thawed}/{groups} backbone groups trainable "
            f"({adapted.trainable_now():,} of {adapted.total:,} parameters train)"
        )

    return on_epoch_start, set(body)


def lora_targets(model: nn.Module, task, args: StrategyArgs) -> list[str]:
    if args.lora_target_modules:
        return [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    return task.lora_targets(model)


def _wrap_peft(model: nn.Module, task, args: StrategyArgs) -> nn.Module:
    from peft import LoHaConfig, LoraConfig

    from hftl import lora

    if getattr(model, "hftl_converted", False) and not args.merge_lora:
        raise ValueError(
            "--merge_lora false keeps only the LoRA adapter, but this model is hftl's conversion of a timm "
            "classifier (no hub holds its base, so the adapter could not be loaded); drop --merge_lora false."
        )
    targets = lora_targets(model, task, args)
    heads = task.head_modules(model)
    # every check before training: a run must not train for an hour and then fail to merge at the save
    lora.check_targets(model, targets, heads, rank=args.lora_r, merge=args.merge_lora)
    modules_to_save = lora.save_names(model, heads)
    if args.lora_method == "loha":
        config = LoHaConfig(
            r=args.lora_r, alpha=args.lora_alpha, target_modules=targets, modules_to_save=modules_to_save
        )
    elif args.lora_method in ("lora", "dora"):
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets,
            modules_to_save=modules_to_save,
            use_dora=args.lora_method == "dora",
        )
    else:
        raise ValueError(f"Unknown --lora_method {args.lora_method!r}; choose lora, dora or loha.")
    return lora.wrap(model, config)


def optimizer_groups(adapted: Adapted, weight_decay: float) -> list[dict]:
    """Split each LR group into decayed weights and undecayed norms/biases (the usual AdamW practice)."""
    groups = []
    for group in adapted.param_groups:
        decay = [p for n, p in group["named_params"] if p.ndim > 1]
        no_decay = [p for n, p in group["named_params"] if p.ndim <= 1]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": group["lr"], "weight_decay": wd})
    return groups


def set_frozen_norms_eval(model: nn.Module) -> None:
    """Frozen BatchNorm layers keep their pretrained statistics: a linear probe must not drift them."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def last_linear_named(model: nn.Module, out_features: int) -> str:
    """Name of the last Linear/1×1-conv producing `out_features` outputs: the classifier of most HF/timm models."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == out_features:
            name = module_name
        elif isinstance(module, nn.Conv2d) and module.out_channels == out_features and module.kernel_size == (1, 1):
            name = module_name
    if name is None:
        raise ValueError(f"No classifier layer with {out_features} outputs found in {type(model).__name__}.")
    return name


def peft_base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (`--gradient_checkpointing`):
    less memory for a slower step. Non-reentrant checkpointing, so frozen inputs (LoRA, frozen stems) still get
    gradients to the trainable layers above them."""
    base = peft_base(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(base).__name__} does not support gradient checkpointing; run without --gradient_checkpointing."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@torch.no_grad()
def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers on CPU: enough to restore the best epoch."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()})
    return state

"""Typed run configuration: one name, one default and one help text per option.

Every recipe parses the same shared dataclasses plus its task's own (`Task.args`, e.g. `--box_format` for
detection). `Literal` choices are checked by argparse for flags and by `validate` for values from YAML. A YAML file
given with `--config` sets defaults; command-line flags override it (`--learning_rate 1e-4` and `--learning-rate
1e-4` both work).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

Strategy = Literal["linear-probe", "frozen-backbone", "full", "lora", "gradual-unfreeze", "zero-shot"]
STRATEGIES = get_args(Strategy)


@dataclass
class DataArgs:
    dataset: str = field(
        default="hftl/digits",
        metadata={
            "help": "Hub dataset id, a local folder, or a bundled name (hftl/digits, hftl/shapes-detection, …)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Dataset revision (branch, tag or commit)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on each epoch (default: 'validation'/'valid'/'val')."}
    )
    test_split: str | None = field(default=None, metadata={"help": "Split for the final test (default: 'test')."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of train held out (stratified) when the dataset has no validation."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: auto-detect)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: auto-detect)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many eval/test rows."})
    shots: int | None = field(default=None, metadata={"help": "Few-shot: K labelled train images per class (seeded)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Square input size; overrides the image processor's (small = fast on CPU)."}
    )
    augment: bool = field(default=True, metadata={"help": "Train-time augmentation (random resized crop, flip)."})
    crop_scale_min: float = field(default=0.6, metadata={"help": "Smallest area fraction of the random crop."})
    decoded_cache_max_mb: float = field(
        default=2048,
        metadata={
            "help": "Classification: decode the train images once and augment them as uint8 tensors when their "
            "pixels (kept at the size the random crop needs) fit in this many MB per node (one memory-mapped "
            "copy shared by the local ranks and their workers); 0 decodes every epoch."
        },
    )
    hflip: bool = field(default=True, metadata={"help": "Random horizontal flip (turn off for digits, text, …)."})
    auto_augment: Literal["none", "trivialaugment", "randaugment", "autoaugment"] = field(
        default="none", metadata={"help": "Classification: augmentation policy (torchvision v2) after crop and flip."}
    )
    random_erasing: float = field(default=0.0, metadata={"help": "Classification: random erasing probability."})
    mixup_alpha: float = field(
        default=0.0, metadata={"help": "Classification: MixUp Beta(alpha, alpha) on train batches; 0 is off."}
    )
    cutmix_alpha: float = field(
        default=0.0, metadata={"help": "Classification: CutMix alpha; with MixUp too, one of them per batch."}
    )
    on_bad_image: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "'error': open every image before training (headers and a reduced-scale decode, in threads, "
            "once per run on the main process) and stop naming all unreadable ones; 'skip': drop them and name them "
            "in all_results.json. A --streaming train split, or a train split over 10,000 rows (where opening every "
            "image first would cost more than a few seconds), is checked as it is read instead: whatever this says, "
            "unreadable images are skipped and named in all_results.json."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Classification: read the train split as a stream (datasets IterableDataset, per-rank shards, a "
            "shuffle buffer) for data larger than disk or memory; evaluation uses a fixed, non-streamed split."
        },
    )
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "--streaming: rows in the shuffle buffer."})


@dataclass
class ModelArgs:
    model: str = field(
        default="hftl/efficientnet-lite0",
        metadata={"help": "Hub model id, local folder, or bundled name (hftl/efficientnet-lite0)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the model repo."})
    from_scratch: bool = field(
        default=False,
        metadata={"help": "Same architecture, random init (no pretrained weights): the baseline transfer must beat."},
    )
    drop_path_rate: float | None = field(
        default=None, metadata={"help": "Stochastic depth rate (timm models, ConvNeXt, Swin, BEiT, DINOv2)."}
    )


@dataclass
class StrategyArgs:
    strategy: Strategy = field(default="full", metadata={"help": f"How to adapt the model: {', '.join(STRATEGIES)}."})
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise LR decay (full, gradual-unfreeze): lr × decay^(depth from top)."}
    )
    freeze_lowest_levels: int = field(
        default=0,
        metadata={
            "help": "full, gradual-unfreeze: keep the N lowest depth levels frozen (1: the stem; 2: the stem and the "
            "first block or stage; ...). Their weight gradients are never computed: faster steps where the "
            "early high-resolution layers dominate (CNNs on CPU, bench/), at the cost of adapting them."
        },
    )
    unfreeze_every: int = field(
        default=1, metadata={"help": "gradual-unfreeze: epochs between unfreezing the next block group."}
    )
    unfreeze_groups: int = field(
        default=4, metadata={"help": "gradual-unfreeze: number of backbone block groups, unfrozen top first."}
    )
    head_lr_scale: float = field(default=1.0, metadata={"help": "Multiplier on the learning rate of the head."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None, metadata={"help": "Comma-separated module names for LoRA (default: per architecture)."}
    )
    lora_method: Literal["lora", "dora", "loha"] = field(
        default="lora", metadata={"help": "PEFT method: lora, dora, or loha."}
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "Also save merged weights so plain pipeline() loads the output folder."}
    )
    # zero-shot dual encoders (CLIP, SigLIP, SigLIP 2): hftl/zeroshot.py, hftl/wiseft.py
    head_init: Literal["random", "text"] = field(
        default="random",
        metadata={"help": "Dual encoders: 'text' starts the head from the class-prompt text embeddings (zero-shot)."},
    )
    prompt_templates: str | None = field(
        default=None,
        metadata={"help": "Dual encoders: class prompt templates separated by |, each with one {} for the name."},
    )
    wise_ft_alpha: str | None = field(
        default=None,
        metadata={
            "help": "WiSE-FT after fine-tuning a dual encoder: comma list of alphas (0 = zero-shot weights, 1 = "
            "fine-tuned); each is evaluated, the best by validation is saved."
        },
    )
    wise_ft_shift: str = field(
        default="blur,noise,contrast,rotation",
        metadata={"help": "Corruptions (severity 3) each WiSE-FT alpha is also tested under; 'none' to skip."},
    )
    wise_ft_eval_datasets: str | None = field(
        default=None,
        metadata={
            "help": "Other test sets with the same class names (ids, folders, bundled) each alpha is tested on."
        },
    )


@dataclass
class TrainArgs:
    output_dir: str = field(default="outputs/run", metadata={"help": "Where the model folder and results go."})
    num_epochs: int = field(default=5, metadata={"help": "Training epochs."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Per-device train batch size."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Per-device eval batch size (default 2×)."})
    learning_rate: float = field(
        default=1.0e-3, metadata={"help": "Peak learning rate, or 'auto': run the range test (hftl lr-find) first."}
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms and biases)."})
    optimizer: Literal["adamw", "sgd"] = field(default="adamw", metadata={"help": "adamw or sgd."})
    scheduler: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "cosine, linear or constant (after warmup)."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps for linear warmup."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps to accumulate per update."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Gradient clipping norm (None: off)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing for classification."})
    lr_find_steps: int = field(
        default=100, metadata={"help": "Steps of the learning-rate range test (hftl lr-find, --learning_rate auto)."}
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an EMA of the weights (e.g. 0.999), evaluated each epoch beside the raw weights; the "
            "better one is kept and saved."
        },
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "no, bf16 or fp16 (GPU); bf16 also on CPU."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for data order, augmentation, init and splits."})
    eval_every_epochs: int = field(default=1, metadata={"help": "Evaluate every N epochs."})
    logging_steps: int = field(
        default=10,
        metadata={
            "help": "Show and log the running train loss every N optimizer steps (reading it waits for the GPU)."
        },
    )
    metric_for_best: str | None = field(
        default=None, metadata={"help": "Metric for best-model selection and early stopping (default per task)."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after N evaluations without improvement."}
    )
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a checkpoint every N steps."})
    checkpoint_every_epoch: bool = field(default=True, metadata={"help": "Save a checkpoint at each epoch end."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest in output_dir."}
    )
    ignore_resume_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume even when settings that decide the data order or step count (batch size, accumulation, "
            "processes, split sizes, image size, seed) differ from the checkpoint's."
        },
    )
    num_workers: int | None = field(
        default=None,
        metadata={
            "help": "DataLoader worker processes. Unset: 0 without a GPU (the model's threads use every core), "
            "else the cores per local process less one, at most 8."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads. Unset: OMP_NUM_THREADS when you set it, else the cores per local process "
            "(the 1 that accelerate launch exports by default is not taken as a choice)."
        },
    )
    report_to: str = field(default="tensorboard", metadata={"help": "Accelerate trackers: tensorboard, none, …"})
    channels_last: bool | None = field(
        default=None,
        metadata={
            "help": "channels_last memory format. Unset: on for convolutional models (conv weights >= half the "
            "parameters), where it measured faster (bench/); true/false force it."
        },
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    cpu_keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "CPU training: keep freed memory in the process (glibc mallopt) instead of returning it to the "
            "OS and faulting it back every step (up to 1.3x faster steps, bench/); memory goes back at exit."
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute activations in the backward pass: less training memory, slower steps."},
    )
    cache_features: bool = field(
        default=True,
        metadata={
            "help": "linear-probe: run the frozen model once over train/validation with the evaluation transforms "
            "(so no augmentation) and train only the head on the cached features; falls back to the normal path "
            "when the head's output is post-processed."
        },
    )
    probe_standardise: bool = field(
        default=True,
        metadata={
            "help": "linear-probe: train the head on features scaled to unit RMS (one scale from the first 512 "
            "train rows' features, with or without --cache_features; folded into the head's weights at the end, so "
            "the saved model takes raw features)."
        },
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty folder."})


@dataclass
class HubArgs:
    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo id to push to (user/name)."})
    hub_private: bool = field(default=False, metadata={"help": "Create the repo private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to (default main)."})
    publish_space: str | None = field(default=None, metadata={"help": "Also publish a Gradio demo Space (user/name)."})
    license: str = field(default="apache-2.0", metadata={"help": "License written in the model card."})
    export: str | None = field(
        default=None,
        metadata={
            "help": "At the end, export to onnx or openvino (hftl export, parity-checked); pushed with the model."
        },
    )
    export_quantize: str | None = field(default=None, metadata={"help": "With --export: also an int8 model (int8)."})


CONFIG_CLASSES = (DataArgs, ModelArgs, StrategyArgs, TrainArgs, HubArgs)
GROUPS = ("data", "model", "strategy", "train", "hub")  # RunConfig's fields, in CONFIG_CLASSES order


@dataclass
class RunConfig:
    data: DataArgs
    model: ModelArgs
    strategy: StrategyArgs
    train: TrainArgs
    hub: HubArgs
    # the task's own options (its `Task.args` dataclass, e.g. hftl/tasks/detection/args.py); None for a task without
    task: Any = None

    def to_dict(self) -> dict:
        values = {group: vars(getattr(self, group)).copy() for group in GROUPS}
        if self.task is not None:
            values["task"] = vars(self.task).copy()
        return values

    @classmethod
    def from_dict(cls, values: dict, task_args: type | None = None) -> RunConfig:
        """The inverse of `to_dict` (e.g. the `config` a run wrote into its results file); `task_args` is the
        task's options dataclass, where it has one. Results written before the task-only options moved out of
        `data` (box_format, reduce_labels, …) still load: options a group no longer has are left out."""

        def build(group_cls, given: dict):
            known = {f.name for f in fields(group_cls)}
            return group_cls(**{k: v for k, v in given.items() if k in known})

        groups = (build(group_cls, values[group]) for group, group_cls in zip(GROUPS, CONFIG_CLASSES, strict=True))
        return cls(*groups, task=build(task_args, values.get("task", {})) if task_args is not None else None)


def config_file_values(parser, argv: list[str], defaults: dict | None = None) -> dict:
    """Adds `--config` to `parser`; returns the recipe's defaults updated by that YAML file's options, which the
    caller hands to `parser.set_defaults` so that command-line flags still win."""
    parser.add_argument("--config", default=None, help="YAML file of options; command-line flags override it.")
    # a parser of its own, so that --help and the other options are left to `parser`
    only_config = argparse.ArgumentParser(add_help=False)
    only_config.add_argument("--config", default=None)
    path = only_config.parse_known_args(argv)[0].config
    return {**(defaults or {}), **(_read_yaml(path) if path else {})}


AUTO = "auto"
# `--learning_rate auto` is kept in the float field as NaN (no learning rate can be NaN); see is_auto_lr
AUTO_LR = float("nan")


def is_auto_lr(value: float) -> bool:
    return value != value


def _auto_learning_rate(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--learning_rate", "--learning-rate") and i + 1 < len(out) and out[i + 1] == AUTO:
            out[i + 1] = "nan"
        elif arg in ("--learning_rate=auto", "--learning-rate=auto"):
            out[i] = "--learning_rate=nan"
    return out


def _read_yaml(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"Config file {path!r} not found.")
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"Config file {path!r} must hold a mapping of option: value.")
    return loaded


def _check_values(config: dict, known: dict) -> None:
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"Unknown config option(s) {unknown}. Run with --help for the list.")
    for key, value in config.items():
        if "float" in str(known[key]) and isinstance(value, str):
            # PyYAML reads 5e-5 (no dot) as a string: say so rather than fail deep inside the optimizer.
            raise ValueError(f"Option {key}: {value!r} is a string; write floats with a dot, e.g. 5.0e-5.")


def config_classes(task_args: type | None = None) -> tuple[type, ...]:
    """The shared option dataclasses, then the task's own (if it has any)."""
    return CONFIG_CLASSES if task_args is None else (*CONFIG_CLASSES, task_args)


def parse_config(
    argv: list[str] | None = None, defaults: dict | None = None, task_args: type | None = None
) -> RunConfig:
    """YAML (`--config`) < recipe defaults < command line. `task_args`: the task's options dataclass (`Task.args`)."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    classes = config_classes(task_args)
    # argparse's errors (a choice outside a Literal) become exceptions the caller sees, not an exit
    parser = HfArgumentParser(classes, exit_on_error=False)
    known = {f.name: f.type for cls in classes for f in fields(cls)}
    argv = _auto_learning_rate(argv)
    merged = config_file_values(parser, argv, defaults)
    if merged.get("learning_rate") == AUTO:
        merged["learning_rate"] = AUTO_LR
    _check_values(merged, known)
    parser.set_defaults(**merged)
    try:
        # returns the dataclasses, a namespace holding --config, and the unparsed strings
        *groups, _, extra = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except argparse.ArgumentError as error:
        raise ValueError(f"{error}. Run with --help for the list.") from None
    if extra:
        raise ValueError(f"Unrecognised arguments {extra}. Run with --help for the list.")
    config = RunConfig(*groups[: len(GROUPS)], task=groups[len(GROUPS)] if task_args is not None else None)
    validate(config)
    return config


def check_choices(options) -> None:
    """Every `Literal[...]` option of a dataclass holds one of its choices. argparse checks flags; this catches the
    values that bypass it (YAML files and recipe defaults, which become parser defaults, and code)."""
    for name, kind in get_type_hints(type(options)).items():
        choices = _literal_choices(kind)
        value = getattr(options, name)
        if choices and value not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise ValueError(f"--{name} {value!r}: choose one of {shown}.")


def _literal_choices(kind) -> tuple:
    """The choices of `Literal[...]` or `Literal[...] | None` (None among them); () for any other type."""
    if get_origin(kind) is Literal:
        return get_args(kind)
    parts = get_args(kind)
    literals = [part for part in parts if get_origin(part) is Literal]
    if not literals:
        return ()
    return tuple(c for part in literals for c in get_args(part)) + ((None,) if type(None) in parts else ())


def validate(config: RunConfig) -> None:
    for group in (*GROUPS, "task"):
        if getattr(config, group) is not None:
            check_choices(getattr(config, group))
    for name in ("batch_size", "gradient_accumulation_steps", "eval_every_epochs", "logging_steps"):
        if getattr(config.train, name) < 1:
            raise ValueError(f"--{name} must be at least 1 (got {getattr(config.train, name)}).")
    if config.hub.push_to_hub and not config.hub.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id user/name.")
    if config.strategy.prompt_templates is not None:
        from hftl.zeroshot import parse_templates  # noqa: PLC0415

        parse_templates(config.strategy.prompt_templates)
    if config.strategy.wise_ft_alpha is not None:
        from hftl.wiseft import parse_alphas  # noqa: PLC0415 (light module; checks before any work)

        parse_alphas(config.strategy.wise_ft_alpha, config.strategy)
        if config.model.from_scratch:
            raise ValueError("--wise_ft_alpha interpolates from pretrained zero-shot weights; drop --from_scratch.")
    elif config.strategy.wise_ft_eval_datasets:
        raise ValueError("--wise_ft_eval_datasets is the WiSE-FT evaluation: it needs --wise_ft_alpha (e.g. 0,0.5,1).")
    if config.hub.export not in (None, "onnx", "openvino") or config.hub.export_quantize not in (None, "int8"):
        raise ValueError("--export must be onnx or openvino, and --export_quantize int8 (or unset).")
    if config.strategy.freeze_lowest_levels < 0 or (
        config.strategy.freeze_lowest_levels and config.strategy.strategy not in ("full", "gradual-unfreeze")
    ):
        raise ValueError(
            f"--freeze_lowest_levels takes a number >= 0, with --strategy full or gradual-unfreeze "
            f"(got {config.strategy.freeze_lowest_levels} with {config.strategy.strategy})."
        )
    if config.data.shots is not None and config.data.shots < 1:
        raise ValueError("--shots must be a positive number of images per class.")
    # a value argparse accepts but the run cannot use: refused here, naming the option and what it takes, rather
    # than ignored (--image_size 0 trained at 224 px) or failing deep inside PIL or datasets
    at_least_one = {
        "image_size": config.data.image_size,
        "num_epochs": config.train.num_epochs,
        "max_steps": config.train.max_steps,
        "max_train_samples": config.data.max_train_samples,
        "max_eval_samples": config.data.max_eval_samples,
        "checkpointing_steps": config.train.checkpointing_steps,
        "num_threads": config.train.num_threads,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1 (got {value}).")
    if not 0 < config.data.validation_fraction < 1:
        raise ValueError(
            f"--validation_fraction must be between 0 and 1, exclusive (got {config.data.validation_fraction})."
        )
    if not 0 < config.data.crop_scale_min <= 1:
        raise ValueError(f"--crop_scale_min must be in (0, 1] (got {config.data.crop_scale_min}).")

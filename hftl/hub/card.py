"""The model card of a pushed run, built from its all_results.json with huggingface_hub's ModelCard / EvalResult.

Task-agnostic: metric names come from `results["test"]` (accuracy/f1 for classification, map for detection,
mean_iou for segmentation) and the headline is `metric_for_best`. The card holds no local path, user name or token:
`results` must already be scrubbed (hftl.hub.push.scrub), and local model/dataset paths are left out.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# metrics not worth a model-index entry (still shown in the table when numeric)
_NOT_METRICS = ("num_samples", "loss")
_HYPERPARAMETERS = (
    ("learning_rate", "train"),
    ("batch_size", "train"),
    ("gradient_accumulation_steps", "train"),
    ("num_epochs", "train"),
    ("optimizer", "train"),
    ("scheduler", "train"),
    ("warmup_ratio", "train"),
    ("weight_decay", "train"),
    ("label_smoothing", "train"),
    ("mixed_precision", "train"),
    ("seed", "train"),
    ("image_size", "data"),
    ("augment", "data"),
    ("shots", "data"),
    ("layer_decay", "strategy"),
)


def is_hub_id(name: str | None) -> bool:
    """`user/name` (or a bare name) rather than a local path."""
    if not name or Path(name).expanduser().exists():
        return False
    if name.startswith(("/", ".", "~")) or "\\" in name or ":" in name:
        return False
    return len(PurePath(name).parts) <= 2


def card_metrics(results: dict) -> dict[str, float]:
    """The test metrics that go into the model-index: numeric scalars, headline (`metric_for_best`) first."""
    test = results.get("test") or {}
    metrics = {
        k: v
        for k, v in test.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k not in _NOT_METRICS
    }
    headline = results.get("metric_for_best")
    if headline in metrics:
        metrics = {headline: metrics[headline], **{k: v for k, v in metrics.items() if k != headline}}
    return metrics


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _how_to_use(
    repo_id: str,
    pipeline_tag: str,
    adapter_only: bool,
    base_model: str | None,
    subtask: str | None = None,
    model_type: str | None = None,
) -> str:
    if not adapter_only:
        extra = f', subtask="{subtask}"' if subtask else ""  # Mask2Former/MaskFormer serve several subtasks
        return (
            "```python\nfrom transformers import pipeline\n\n"
            f'predict = pipeline("{pipeline_tag}", model="{repo_id}"{extra})\n'
            'print(predict("image.jpg"))\n```\n\n'
            f"Or from the command line: `hftl predict --model {repo_id} image.jpg`."
        )
    from hftl.lora import ADAPTER_NEEDS_HFTL
    from hftl.spaces.builder import AUTO_CLASSES

    auto = AUTO_CLASSES.get(pipeline_tag, AUTO_CLASSES["image-classification"])
    base = base_model or "<base model id>"
    # PEFT looks these models' word embeddings up and transformers raises for them; hftl's loader opts out
    hftl_loads = model_type in ADAPTER_NEEDS_HFTL
    note = (
        f"`PeftModel.from_pretrained` alone fails for this model family ({model_type}: PEFT asks it for word "
        "embeddings it does not have); hftl's `hftl.lora.load_adapter` loads it.\n\n"
        if hftl_loads
        else ""
    )
    load = (
        "model = load_adapter(base, repo).merge_and_unload()\n"
        if hftl_loads
        else "model = PeftModel.from_pretrained(base, repo).merge_and_unload()\n"
    )
    return (
        "This repo holds a PEFT adapter; the fine-tuned config (labels) and image processor sit next to it.\n\n"
        + note
        + "```python\n"
        + ("from hftl.lora import load_adapter\n" if hftl_loads else "from peft import PeftModel\n")
        + f"from transformers import AutoConfig, AutoImageProcessor, {auto}, pipeline\n\n"
        f'repo = "{repo_id}"\n'
        "config = AutoConfig.from_pretrained(repo)  # the fine-tuned labels\n"
        f'base = {auto}.from_pretrained("{base}", config=config, ignore_mismatched_sizes=True)\n'
        + load
        + "processor = AutoImageProcessor.from_pretrained(repo)\n"
        f'predict = pipeline("{pipeline_tag}", model=model, image_processor=processor)\n'
        'print(predict("image.jpg"))\n```\n\n'
        f"Or from the command line: `hftl predict --model {repo_id} image.jpg`."
    )


def _subtask(results: dict) -> str | None:
    return "instance" if results.get("task") == "instance-segmentation" else None


def _strategy_line(results: dict) -> str:
    strategy = results.get("strategy", "?")
    options = (results.get("config") or {}).get("strategy") or {}
    if strategy == "lora":
        extra = ", ".join(
            f"{k.removeprefix('lora_')}={options[k]}"
            for k in ("lora_method", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
            if options.get(k) is not None
        )
        return f"`{strategy}` ({extra})"
    if strategy == "gradual-unfreeze":
        return (
            f"`{strategy}` (every {options.get('unfreeze_every')} epoch(s), {options.get('unfreeze_groups')} groups)"
        )
    return f"`{strategy}`"


def build_model_card(
    results: dict,
    repo_id: str,
    *,
    adapter_only: bool,
    base_model: str | None,
    dataset: str | None,
    images: list[str] = (),
    license: str = "apache-2.0",
    model_type: str | None = None,
) -> ModelCard:
    """A ModelCard: metadata (incl. model-index) + a body saying what was trained, how, and with what results.

    `base_model` / `dataset` are Hub ids, or None when the run used local folders (their paths never go in a card).
    `model_type` (the fine-tuned config's) picks the adapter snippet's loader.
    """
    pipeline_tag = results.get("pipeline_tag") or "image-classification"
    task = results.get("task") or pipeline_tag
    strategy = results.get("strategy") or "unknown"
    dataset_label = dataset or PurePath(str(results.get("dataset") or "local data")).name
    model_name = repo_id.split("/")[-1]
    metrics = card_metrics(results)
    dataset_split = "test"

    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset or dataset_label,
            dataset_name=dataset_label,
            dataset_split=dataset_split,
            metric_type=name,
            metric_name=f"Test {name}",
            metric_value=value,
        )
        for name, value in metrics.items()
    ]
    tags = ["hftl", task, pipeline_tag, strategy, "transfer-learning"]
    if adapter_only or strategy == "lora":
        tags += ["peft", "lora"]
    data = ModelCardData(
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        base_model=base_model,
        base_model_relation=("adapter" if adapter_only else "finetune") if base_model else None,
        datasets=[dataset] if dataset else None,
        metrics=list(metrics) or None,
        tags=list(dict.fromkeys(tags)),
        model_name=model_name,
        eval_results=eval_results or None,
    )
    body = _body(results, repo_id, adapter_only, images, base_model, dataset, model_type)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _weights_line(train: dict, config: dict) -> str | None:
    decay = (config.get("train") or {}).get("ema_decay")
    if not decay:
        return None
    if train.get("weights") == "ema":
        return (
            f"- Weights: the EMA of the weights (decay {decay}), which scored better on validation than the raw ones"
        )
    return f"- Weights: the raw weights, which scored better on validation than their EMA (decay {decay})"


def _body(
    results: dict,
    repo_id: str,
    adapter_only: bool,
    images,
    base_model: str | None,
    dataset: str | None,
    model_type: str | None = None,
) -> str:
    pipeline_tag = results.get("pipeline_tag") or "image-classification"
    headline = results.get("metric_for_best")
    dataset_text = f"[{dataset}](../datasets/{dataset})" if dataset else "a local dataset"
    base_text = f"[{base_model}](../{base_model})" if base_model else "a local checkpoint"
    labels = results.get("labels") or []
    train = results.get("train") or {}
    trainable, total = results.get("trainable_parameters"), results.get("total_parameters")
    share = f" ({100 * trainable / total:.2f}%)" if trainable and total else ""
    config = results.get("config") or {}

    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An `{pipeline_tag}` model fine-tuned from {base_text} on {dataset_text} with "
        f"[hftl](https://github.com/hftl/hftl) using the {_strategy_line(results)} strategy"
        + (" (this repo holds the PEFT adapter only)." if adapter_only else "."),
        "",
        "## Results",
        "",
        f"On the test split ({test_count} images):"
        if (test_count := (results.get("num_samples") or {}).get("test"))
        else "On the test split:",
        "",
        "| metric | test | validation (best epoch) |",
        "|---|---|---|",
    ]
    evals = results.get("eval") or {}
    for name, value in (results.get("test") or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool) and name != "num_samples":
            shown = f"**{_fmt(value)}**" if name == headline else _fmt(value)
            lines.append(f"| {name} | {shown} | {_fmt(evals[name]) if name in evals else ''} |")
    for image in images:
        title = PurePath(image).stem.replace("_", " ").capitalize()
        lines += ["", f"### {title}", "", f"![{title}]({image})"]
    usage = _how_to_use(repo_id, pipeline_tag, adapter_only, base_model, _subtask(results), model_type)
    lines += ["", "## How to use", "", usage, ""]
    lines += [
        "## Training",
        "",
        f"- Strategy: {_strategy_line(results)}",
        f"- Parameters: {trainable:,} trainable of {total:,}{share}" if trainable is not None and total else None,
        f"- Epochs: {train.get('epochs')} ({train.get('steps')} optimizer steps), best epoch {train.get('best_epoch')}"
        f" by validation `{headline}`",
        _weights_line(train, config),
        f"- Time: {train.get('seconds')} s ({train.get('samples_per_second')} samples/s) on {results.get('hardware')}",
        "- Data: " + ", ".join(f"{k} {v}" for k, v in (results.get("num_samples") or {}).items()),
    ]
    if labels:
        shown = ", ".join(f"`{label}`" for label in labels[:50]) + (" …" if len(labels) > 50 else "")
        lines.append(f"- Labels ({len(labels)}): {shown}")
    lines += ["", "| hyperparameter | value |", "|---|---|"]
    for name, group in _HYPERPARAMETERS:
        value = (config.get(group) or {}).get(name)
        if value is not None:
            lines.append(f"| {name} | {value} |")
    lines += ["", "`all_results.json` in this repo holds every metric, the per-epoch history and the full config.", ""]
    return "\n".join(line for line in lines if line is not None)

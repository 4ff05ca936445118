"""WiSE-FT (Wortsman et al., CVPR 2022): after fine-tuning a zero-shot model, average its weights with the zero-shot
ones, θ(α) = (1 − α)·θ_zero-shot + α·θ_fine-tuned. Intermediate α often keeps most of the fine-tuned accuracy while
recovering the zero-shot model's robustness under distribution shift.

`--wise_ft_alpha 0,0.25,0.5,0.75,1` evaluates every α on validation and test and under the corruptions of
`hftl/compare/shift.py` (`--wise_ft_shift`, severity 3) and on the test splits of `--wise_ft_eval_datasets` (other
datasets with the same class names, checked before the model is built); the α with the best validation metric is
what the run saves. It needs `--head_init text`, so that α = 0 is the zero-shot model. The compare recipe sets the
shift targets from its own `--shift` and `--eval_datasets`. The formula is exact at the ends: α = 0 gives the
zero-shot weights and α = 1 the fine-tuned ones, bit for bit.
"""

from __future__ import annotations

import copy

import torch

from hftl.log import get_logger

logger = get_logger(__name__)

SHIFT_SEVERITY = 3


def parse_alphas(text: str, strategy_args=None) -> list[float]:
    alphas = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--wise_ft_alpha: {part!r} is not a number in [0, 1]; e.g. --wise_ft_alpha 0,0.5,1.")
        alphas.append(value)
    if strategy_args is not None:
        if strategy_args.strategy == "zero-shot":
            raise ValueError("--wise_ft_alpha interpolates towards fine-tuned weights; it needs a training strategy.")
        if strategy_args.strategy == "lora" and not strategy_args.merge_lora:
            raise ValueError("--wise_ft_alpha with LoRA needs --merge_lora true (it averages the merged weights).")
        if strategy_args.head_init != "text":
            raise ValueError(
                "--wise_ft_alpha interpolates from the zero-shot model, whose head is the class-prompt text "
                "embeddings: add --head_init text (with a random head, alpha 0 would not be the zero-shot model)."
            )
        from hftl.compare.shift import parse_corruptions  # noqa: PLC0415 (torchvision: only when WiSE-FT is on)

        parse_corruptions(strategy_args.wise_ft_shift, "--wise_ft_shift")
    return alphas


def eval_dataset_names(strategy_args) -> list[str]:
    return [d.strip() for d in (strategy_args.wise_ft_eval_datasets or "").split(",") if d.strip()]


def check_eval_datasets(config, label_names: list[str]) -> None:
    """`--wise_ft_eval_datasets` load and hold the training classes: checked once the training data is known and
    before the model is built, instead of after the whole fine-tune."""
    from hftl.compare.shift import check_eval_datasets as check  # noqa: PLC0415

    check(config, eval_dataset_names(config.strategy), label_names, "--wise_ft_eval_datasets")


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The zero-shot weights, on the CPU, before any strategy touches the model."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def interpolate(zero_shot: dict, fine_tuned: dict, alpha: float) -> dict:
    """(1 − α)·zero-shot + α·fine-tuned for floating tensors; counters (BatchNorm's num_batches_tracked) are the
    fine-tuned ones."""
    if zero_shot.keys() != fine_tuned.keys():
        missing = sorted(zero_shot.keys() ^ fine_tuned.keys())[:5]
        raise ValueError(f"WiSE-FT needs the same parameters before and after fine-tuning; these differ: {missing}.")
    out = {}
    for name, tuned in fine_tuned.items():
        start = zero_shot[name].to(tuned.device)
        out[name] = (1 - alpha) * start + alpha * tuned if tuned.is_floating_point() else tuned.clone()
    return out


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA runs are merged into a copy (the run still saves its adapter from the original)."""
    if hasattr(model, "peft_config"):
        return copy.deepcopy(model).merge_and_unload()
    return model


def _shift_sets(task, dsd, processor, config, label_names: list[str]) -> list[tuple[str, list, list]]:
    """(name, pixel batches, labels) for each corruption of the test split and each --wise_ft_eval_datasets test."""
    from hftl.compare.shift import eval_dataset, parse_corruptions, pixel_batches, shift_targets

    names = parse_corruptions(config.strategy.wise_ft_shift, "--wise_ft_shift")
    batch = config.train.eval_batch_size or 2 * config.train.batch_size
    out = []
    for name, _, dataset in shift_targets(dsd["test"], task.image_column, names, [SHIFT_SEVERITY], config.train.seed):
        if name != "clean":
            batches = pixel_batches(dataset, task.image_column, processor, batch)
            out.append((name, batches, list(dataset[task.label_column])))
    for name in eval_dataset_names(config.strategy):
        option = "--wise_ft_eval_datasets"
        dataset = eval_dataset(config, name, label_names, task.image_column, task.label_column, option)
        batches = pixel_batches(dataset, task.image_column, processor, batch)
        out.append((name, batches, list(dataset[task.label_column])))
    return out


def choose(
    task, model, zero_shot_state, prepared, dsd, processor, config, accelerator, id2label, metric, greater, tuned_test
):
    """Evaluates every α; loads the best (by validation `metric`) into the returned plain model. Returns
    (model, report, best test metrics, best test evaluator)."""
    from hftl.compare.shift import accuracy
    from hftl.trainer import evaluate, make_loader

    alphas = parse_alphas(config.strategy.wise_ft_alpha)
    model = plain_model(model)
    tuned = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    args = config.train
    batch = args.eval_batch_size or 2 * args.batch_size
    loaders = {
        split: accelerator.prepare(make_loader(prepared[split], task.collate, batch, False, args.seed, 0))
        for split in ("validation", "test")
    }
    names = [id2label[i] for i in range(len(id2label))]
    shifted = _shift_sets(task, dsd, processor, config, names) if accelerator.is_main_process else []
    rows, best = [], None
    for alpha in alphas:
        model.load_state_dict(interpolate(zero_shot_state, tuned, alpha))
        val, _ = evaluate(task, model, loaders["validation"], accelerator, id2label)
        test, evaluator = evaluate(task, model, loaders["test"], accelerator, id2label)
        row = {"alpha": alpha, "validation": val[metric], "test_accuracy": test["accuracy"]}
        row.update({f"{name}_accuracy": accuracy(model, batches, labels) for name, batches, labels in shifted})
        rows.append(row)
        logger.info("wise-ft: " + "  ".join(f"{k}={v:.4f}" for k, v in row.items()))
        better = best is None or (val[metric] > best[0] if greater else val[metric] < best[0])
        if better:
            best = (val[metric], alpha, test, evaluator)
    _, alpha, test, evaluator = best
    model.load_state_dict(interpolate(zero_shot_state, tuned, alpha))
    report = {
        "alphas": rows,
        "best_alpha": alpha,
        "selected_by": f"validation {metric}",
        "shift_severity": SHIFT_SEVERITY,
        "fine_tuned_test_accuracy": tuned_test["accuracy"],
    }
    return model, report, test, evaluator

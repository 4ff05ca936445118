"""Learning-rate range test (Smith 2015; fastai's lr_find): a short run whose learning rate grows exponentially
from `start` to `end`, recording the smoothed loss; the suggestion is the rate of the steepest descent of the loss,
before it blows up. `hftl lr-find` runs it alone (loss-curve PNG + JSON); `--learning_rate auto` runs it first and
trains with the suggestion, from the same initial weights."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LR_FIND_FILE = "lr_find.png"


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # smoothed
    suggestion: float


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The rate where the smoothed loss falls fastest (per log-LR), looking only before the loss exceeds 4x its
    minimum (divergence); a tenth of the rate at the minimum when the curve never falls."""
    if len(lrs) < 3:
        raise ValueError("The range test needs at least 3 steps (--lr_find_steps).")
    best = min(range(len(losses)), key=losses.__getitem__)
    stop = next((i for i in range(best, len(losses)) if losses[i] > 4 * losses[best]), len(losses))
    logs = [math.log10(lr) for lr in lrs[:stop]]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(logs) - 1)]
    if not slopes or min(slopes) >= 0:
        return lrs[best] / 10
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def range_test(task, adapted, train_dataset, collate_fn, args, accelerator, start=1e-6, end=1.0, steps=100):
    """Runs the test on `adapted` (its param groups' lr are multipliers: 1.0 for the base rate) and restores the
    model's weights and buffers afterwards. Stops early once the loss diverges."""
    from hftl.image_check import SKIPPED, collate_readable
    from hftl.strategies import optimizer_groups
    from hftl.trainer import SeededItems, make_loader

    model = adapted.model
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    groups = optimizer_groups(adapted, args.weight_decay)
    for group in groups:
        group["lr"] = group["lr"] * start
    optimizer = torch.optim.AdamW(groups) if args.optimizer == "adamw" else torch.optim.SGD(groups, momentum=0.9)
    factor = (end / start) ** (1 / max(1, steps - 1))
    items = SeededItems(train_dataset, args.seed)
    loader = make_loader(items, collate_readable(collate_fn), args.batch_size, True, args.seed, args.num_workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    lrs, losses, smooth, beta = [], [], 0.0, 0.9
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            del batch[SKIPPED]  # named by the training run that follows
            if not batch:
                continue
            loss = task.forward(model, batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = accelerator.gather(loss.detach().float().reshape(1)).mean().item()
            smooth = beta * smooth + (1 - beta) * value
            losses.append(smooth / (1 - beta ** (step + 1)))
            lrs.append(start * factor**step)
            step += 1
            if step >= steps or not math.isfinite(value) or losses[-1] > 4 * min(losses) and step > 10:
                break
            for group in optimizer.param_groups:
                group["lr"] *= factor
        else:
            continue
        break
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.load_state_dict(initial)  # the full state: BatchNorm statistics too
    accelerator.free_memory()
    return RangeTest(lrs, losses, suggest(lrs, losses))


def save_range_test(result: RangeTest, output_dir: str | Path) -> Path:
    from hftl.plotting import pyplot

    plt = pyplot()

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(json.dumps(asdict(result), indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / LR_FIND_FILE, dpi=100)
    plt.close(fig)
    return out / LR_FIND_FILE

"""AdamW's step on a model's parameters: the per-tensor loop, `foreach` and `fused` side by side.

Usage:
    python bench/optimizer_step.py [--repeats 20]

hftl trains with `torch.optim.AdamW(..., fused=True)` (hftl/trainer.py), on the CPU too; this times one step of each
implementation on the bench's ViT-small and EfficientNet-Lite0 (random gradients, no forward pass) and prints the
median and the ratio to `fused`. transformers.Trainer's default optimizer in this version is printed beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, write_effnet_folder, write_vit_folder  # noqa: E402

IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def time_steps(params: list, options: dict, repeats: int) -> float:
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # allocates the moment buffers
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForImageClassification, TrainingArguments

    folders = {
        "vit-small": write_vit_folder(WORK / "models" / "vit-small", "vit-small", 64, 4),
        "effnet-lite0": write_effnet_folder(WORK / "models" / "effnet-64", 64),
    }
    trainer_default = TrainingArguments(output_dir=str(WORK / "optim-args"), use_cpu=True).optim
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformers.Trainer default optim: "
          f"{getattr(trainer_default, 'value', trainer_default)}\n")  # fmt: skip
    columns = " | ".join(f"{name} ms" for name in IMPLEMENTATIONS)
    print(f"| model | parameters | tensors | {columns} | for-loop/fused | foreach/fused |")
    print("|---|---|---|" + "---|" * (len(IMPLEMENTATIONS) + 2))
    results = {}
    for name, folder in folders.items():
        model = AutoModelForImageClassification.from_pretrained(folder)
        params = [p for p in model.parameters() if p.requires_grad]
        ms = {impl: 1000 * time_steps(params, options, args.repeats) for impl, options in IMPLEMENTATIONS.items()}
        results[name] = ms
        count = sum(p.numel() for p in params)
        cells = " | ".join(f"{ms[impl]:.2f}" for impl in IMPLEMENTATIONS)
        print(f"| {name} | {count / 1e6:.1f}M | {len(params)} | {cells} | "
              f"{ms['for-loop'] / ms['fused']:.1f}× | {ms['foreach'] / ms['fused']:.1f}× |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()

r"""The zero-shot → k-shot learning curve on Fashion-MNIST, offline, through hftl's own runs.

The dual encoder is bench/imagenet_dual_encoder.py's (the bundled ImageNet EfficientNet-Lite0 + a tiny BERT trained
on WordNet names and glosses; no pretrained CLIP is reachable here). Every cell is `hftl.runner.run` as the CLI
runs it: `--strategy zero-shot` (0 shots), then `linear-probe` on k labelled images per class from the zero-shot
text head (`--head_init text`, LP-FT's start) or from a random head, over a few seeds. Validation and test are the
first `--eval_rows` rows of each split (fixed, the same for every cell). Cells are resumable: a finished one
(all_results.json) is read back, not rerun.

    python bench/zero_shot_curve.py --dual /tmp/hftl-bench/imagenet-wordnet-dual --shots 1,5,25,100 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from bench.common import WORK  # noqa: E402

# the compare quickstart's linear-probe setting (recipes/configs/compare/quickstart.yaml): cached features
PROBE = ["--learning_rate", "2.0e-2", "--max_steps", "300", "--batch_size", "16", "--eval_every_epochs", "1000"]


def cell_argv(args, out: Path, strategy: str, shots: str, head: str, seed: int) -> list[str]:
    argv = [
        "--dataset", "hftl/fashion-mnist", "--model", str(args.dual), "--output_dir", str(out),
        "--image_size", str(args.image_size), "--max_eval_samples", str(args.eval_rows), "--seed", str(seed),
        "--report_to", "none", "--checkpoint_every_epoch", "false", "--hflip", "false", "--strategy", strategy,
        "--num_threads", str(args.num_threads),
    ]  # fmt: skip
    if strategy != "zero-shot":
        argv += ["--head_init", head, *PROBE] + (["--shots", shots] if shots != "all" else [])
    return argv


def run_cell(args, strategy: str, shots: str, head: str, seed: int) -> float:
    from hftl.outputs import is_finished, read_results
    from hftl.runner import run

    out = args.work / f"{strategy}__{head}__{shots}__seed{seed}"
    if not is_finished(out):
        start = time.time()
        run("classification", cell_argv(args, out, strategy, shots, head, seed))
        print(f"{out.name}: {time.time() - start:.0f} s", flush=True)
    return read_results(out)["test"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dual", type=Path, default=WORK / "imagenet-wordnet-dual")
    parser.add_argument("--work", type=Path, default=WORK / "zero-shot-curve")
    parser.add_argument("--shots", default="1,5,25,100")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--all_heads", default="", help="Also probe on all 55,000 train images: text,random.")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--eval_rows", type=int, default=1000)
    # on the shared 2-core machine two contending threads stepped 12x slower than one (bench/README)
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args()

    rows = [("zero-shot", "0", "text", [run_cell(args, "zero-shot", "0", "text", 0)])]
    for shots in args.shots.split(","):
        for head in ("text", "random"):
            accs = [run_cell(args, "linear-probe", shots, head, seed) for seed in range(args.seeds)]
            rows.append(("linear-probe", shots, head, accs))
    for head in args.all_heads.split(",") if args.all_heads else []:  # every train image: one seed
        rows.append(("linear-probe", "all", head, [run_cell(args, "linear-probe", "all", head, 0)]))
    print(f"\nFashion-MNIST test (first {args.eval_rows} rows), {args.image_size} px, dual encoder {args.dual.name}")
    print("| shots per class | strategy | head | test accuracy (mean ± std) | seeds |\n|---|---|---|---|---|")
    for strategy, shots, head, accs in rows:
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {shots} | {strategy} | {head} | {statistics.mean(accs):.3f} ± {std:.3f} | {len(accs)} |")


if __name__ == "__main__":
    main()

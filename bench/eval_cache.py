"""Eval-split data path with and without the processed-tensor cache (hftl/fastpaths/processed_cache.py),
in one process.

Usage:
    python bench/eval_cache.py [--repeats 3]

Times one pass of the validation DataLoader (decode, image processor, collate; no model) through the plain split
and through the cached split after its first pass, alternating, and prints the median of each and their ratio.
The model's own cost per epoch is the same either way; bench/run.py shows the whole-epoch effect.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, write_effnet_folder  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from hftl.config import parse_config
    from hftl.fastpaths.processed_cache import cache_processed
    from hftl.runner import prepare_data
    from hftl.tasks import get_task
    from hftl.trainer import make_loader

    model = write_effnet_folder(WORK / "models" / "effnet-64", 64)
    config = parse_config(["--dataset", "hftl/digits", "--model", str(model), "--image_size", "64"])
    task = get_task("classification", config)
    dsd, spec = prepare_data(task, config)
    _, processor = task.load_model(config.model, spec.id2label)
    plain = task.prepare(dsd, processor, config.data)["validation"]
    cached = cache_processed({"validation": plain}, ["validation"])["validation"]

    def one_pass(dataset) -> float:
        started = time.perf_counter()
        for _ in make_loader(dataset, task.collate, 64, False, 0, 0):
            pass
        return time.perf_counter() - started

    one_pass(cached)  # fills the cache: what the first evaluation pays
    times = {"plain": [], "cached": []}
    for _ in range(args.repeats):
        times["plain"].append(one_pass(plain))
        times["cached"].append(one_pass(cached))
    plain_s, cached_s = statistics.median(times["plain"]), statistics.median(times["cached"])
    rows = len(plain)
    print(f"validation rows: {rows}")
    print(f"plain:  {plain_s:.3f}s/pass  ({rows / plain_s:.0f} images/s)")
    print(f"cached: {cached_s:.3f}s/pass  ({rows / cached_s:.0f} images/s)  → {plain_s / cached_s:.1f}× faster")
    return {"plain_s": plain_s, "cached_s": cached_s}


if __name__ == "__main__":
    main()

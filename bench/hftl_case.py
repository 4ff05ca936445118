"""One hftl run under a stopwatch: `hftl.runner.run("classification", argv)` with timestamps around training,
each evaluation, the linear-probe feature pass and the one-time decoding of the train images. Nothing in the
training path is replaced; the decoding, done before training starts, is booked to the first epoch's train time.

Usage:
    python bench/hftl_case.py --out result.json [--target 0.9] [--no_eval_cache] -- <hftl options>
    accelerate launch --multi_gpu --num_processes 2 bench/hftl_case.py --out r.json -- <hftl options>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RunRecord, write_json  # noqa: E402


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    hftl_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--no_eval_cache", action="store_true", help="Turn the in-memory eval tensor cache off.")
    args = parser.parse_args(own)

    # one-time import of the metric functions the evaluator uses, so it is not booked as evaluation time
    import torchmetrics.functional.classification  # noqa: F401

    import hftl.fastpaths.decoded_images
    import hftl.fastpaths.probe_features
    import hftl.fastpaths.processed_cache
    import hftl.runner
    import hftl.trainer

    if args.no_eval_cache:
        hftl.fastpaths.processed_cache.CACHE_MAX_MB = 0
    record = RunRecord(args.target)
    timings = {"feature_pass_seconds": None, "decode_seconds": 0.0}

    train, evaluate, feature_pass = (
        hftl.runner.train,
        hftl.trainer.evaluate,
        hftl.fastpaths.probe_features.cached_linear_probe,
    )

    def timed_train(*a, **kw):
        record.begin()
        return train(*a, **kw)

    def timed_evaluate(*a, **kw):
        started = record.eval_started()
        metrics, evaluator = evaluate(*a, **kw)
        record.eval_finished(started, int(metrics.get("num_samples", 0)), metrics.get("accuracy"))
        return metrics, evaluator

    def timed_feature_pass(*a, **kw):
        started = time.perf_counter()
        out = feature_pass(*a, **kw)
        timings["feature_pass_seconds"] = time.perf_counter() - started
        return out

    def timed_decode(*a, **kw):
        started = time.perf_counter()
        out = decode(*a, **kw)
        timings["decode_seconds"] += time.perf_counter() - started
        return out

    decode = hftl.fastpaths.decoded_images.decode_images
    (
        hftl.runner.train,
        hftl.trainer.evaluate,
        hftl.fastpaths.probe_features.cached_linear_probe,
        hftl.fastpaths.decoded_images.decode_images,
    ) = (
        timed_train,
        timed_evaluate,
        timed_feature_pass,
        timed_decode,
    )
    results = hftl.runner.run("classification", hftl_argv)
    if record.epoch_train_seconds:
        record.epoch_train_seconds[0] += timings["decode_seconds"]
    if record.time_to_target is not None:
        record.time_to_target += timings["decode_seconds"]
    epochs = results["train"]["epochs"]
    train_rows = results["num_samples"]["train"]
    out = record.result(
        train_samples=epochs * train_rows,
        impl="hftl",
        epochs=epochs,
        test_accuracy=results["test"]["accuracy"],
        trainable_parameters=results["trainable_parameters"],
        **timings,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        out["processes"] = PartialState().num_processes
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()

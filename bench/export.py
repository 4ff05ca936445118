"""PyTorch vs ONNX Runtime vs OpenVINO (fp32 and int8) on one trained model, side by side, at 1 and 2 threads.

Usage:
    accelerate launch recipes/classify.py --config recipes/configs/classification/quickstart.yaml \
        --output_dir /tmp/quickstart
    python bench/export.py /tmp/quickstart          # exports (onnx, openvino, int8) first when missing

Latency p50/p95 at batch 1 and throughput at batch 32 on the run's own test images; accuracy on its test split.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hftl.export import check  # noqa: E402
from hftl.export.main import export_model, find_images, resolve_source  # noqa: E402
from hftl.export.runtime import FORMATS, MODEL_FILES, OUTPUT_NAMES, Session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, nargs=2, default=[50, 5], help="batch-1 calls, batch-32 calls")
    args = parser.parse_args()
    from hftl.predict import infer_task, load_pipeline

    for fmt in FORMATS:
        if not (Path(args.output_dir) / fmt / MODEL_FILES[fmt][1]).is_file():
            export_model(args.output_dir, fmt, quantize_mode="int8", bench_iters=(3, 1))
    source, run = resolve_source(args.output_dir)
    task = infer_task(source)
    pipe = load_pipeline(source, task)
    model, processor, names = pipe.model.eval(), pipe.image_processor, OUTPUT_NAMES[task]
    images = find_images(run, task, None)
    batch = check.pixel_values(processor, images.parity)
    one, many = batch[:1], check.tile(batch, check.BATCH)
    print(f"{args.output_dir}: {task}, input {list(one.shape)}, {torch.get_num_threads()} torch threads by default")
    print(
        f"{'runtime':<16}{'threads':>8}{'p50 ms':>10}{'p95 ms':>10}{'img/s b32':>11}{'speed-up b1':>13}"
        f"{'test acc':>10}"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        runtimes = {"pytorch": lambda pixels: check.torch_outputs(model, names, pixels)}
        for fmt in FORMATS:
            for quantized in (False, True):
                path = Path(args.output_dir) / fmt / MODEL_FILES[fmt][int(quantized)]
                runtimes[fmt + (" int8" if quantized else "")] = Session(path, fmt, threads)
        base = None
        for name, predict in runtimes.items():
            timing = check.latency(predict, one, many, tuple(args.iters))
            base = base or timing["batch1_p50_ms"]
            accuracy = check.accuracy(predict, processor, images) if threads == args.threads[0] else None
            print(
                f"{name:<16}{threads:>8}{timing['batch1_p50_ms']:>10.2f}{timing['batch1_p95_ms']:>10.2f}"
                f"{timing['batch32_images_per_second']:>11.0f}{base / timing['batch1_p50_ms']:>12.2f}x"
                f"{'' if accuracy is None else f'{accuracy:>10.4f}'}"
            )


if __name__ == "__main__":
    main()

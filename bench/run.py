"""hftl next to a plain transformers.Trainer baseline, and each fast path on and off, in one run.

Usage:
    python bench/run.py            # every case (~7 min on an idle 2-core CPU)
    python bench/run.py --quick    # fewer rows, fewer samples (~2 min)
    python bench/run.py --compile  # also a torch.compile row (slow to compile on CPU)
    python bench/run.py --only vit-small   # rows whose "case: row" matches this regular expression
    python bench/run.py --only "quickstart.*: (baseline Trainer|hftl)$" --repeats 5   # the headline, 5 times
    python bench/run.py --threads 1        # on a busy shared machine: 2 OpenMP threads per process thrash there
    python bench/run.py --gpu_case         # ViT-B/16 224 px bf16 with MFU (automatic when CUDA is present)

Each row runs in its own subprocess (so peak RSS is per case) with the same model folder, data, image size, batch
size, precision and hardware on both sides. Results go to bench/results/<quick|default>[-<only>].json and .md.
Columns: train and eval images/s (training time excludes evaluation), peak RSS (on GPU: peak allocated),
train ΔRSS (peak RSS minus RSS when training starts: what training itself added), time from the start of training
to the first evaluation at or above the case's target accuracy, and each ratio against the row named in `vs`.
With --repeats N every row runs N times, interleaved (all rows, then all rows again), and each number in the table
is its median: on a shared machine single runs of the same row vary by ±20%.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DIR,
    WORK,
    bf16_peak_flops,
    train_flops_per_image,
    write_effnet_folder,
    write_synthetic_folder,
    write_vit_folder,
)

PYTHON = sys.executable


def hftl_cmd(out, model, data, epochs, batch, lr, target, extra=(), bench_flags=(), ranks=1):
    # the README's launcher, as users run it: what it does to threads (OMP_NUM_THREADS=1 without --cpu) is measured
    launcher = [PYTHON, "-m", "accelerate.commands.launch", "--num_processes", str(ranks)]
    if ranks > 1:
        launcher.insert(3, "--multi_gpu")
    threads = os.environ.get("HFTL_BENCH_THREADS")  # --threads: hftl takes a count only as its own option
    return [
        *launcher,
        str(BENCH_DIR / "hftl_case.py"),
        "--out",
        str(out),
        "--target",
        str(target),
        *bench_flags,
        "--",
        "--dataset",
        data,
        "--model",
        str(model),
        "--num_epochs",
        str(epochs),
        "--batch_size",
        str(batch),
        "--learning_rate",
        str(lr),
        "--output_dir",
        str(Path(out).with_suffix("")),
        "--overwrite_output_dir",
        "--report_to",
        "none",
        "--checkpoint_every_epoch",
        "false",
        *(["--num_threads", threads] if threads else []),
        *extra,
    ]


def baseline_cmd(out, model, data, epochs, batch, lr, target, extra=()):
    return [
        PYTHON,
        str(BENCH_DIR / "baseline_trainer.py"),
        "--out",
        str(out),
        "--model",
        str(model),
        "--data",
        data,
        "--epochs",
        str(epochs),
        "--batch_size",
        str(batch),
        "--lr",
        str(lr),
        "--target",
        str(target),
        *extra,
    ]


def cases(quick: bool, compile_row: bool, gpu_case: bool = False, gpu_tiny: bool = False) -> list[dict]:
    """(case, row, vs, command); `vs` names the row a ratio is taken against."""
    epochs = 1 if quick else 3
    effnet = write_effnet_folder(WORK / "models" / "effnet-64", 64)
    # default: all 1257 training digits, so each row trains long enough (~120 steps) for a steady figure
    digits_limits = ["--max_train_samples", "128", "--max_eval_samples", "64"] if quick else []
    quick_common = ["--image_size", "64", "--hflip", "false", "--crop_scale_min", "0.7", "--label_smoothing", "0.1"]
    quick_common += ["--weight_decay", "0.01", *digits_limits]
    base_common = ["--label_smoothing", "0.1", *digits_limits]
    per_class = {"train": 32, "validation": 16, "test": 16} if quick else {"train": 128, "validation": 32, "test": 32}
    synthetic = str(write_synthetic_folder(WORK / "data" / f"synthetic-64-{per_class['train']}", 64, per_class))
    tiny = write_vit_folder(WORK / "models" / "vit-tiny", "vit-tiny", 64, 4)
    small = write_vit_folder(WORK / "models" / "vit-small", "vit-small", 64, 4)
    vit_common = ["--image_size", "64", "--hflip", "false", "--crop_scale_min", "0.7", "--weight_decay", "0.01"]
    vit_base = ["--weight_decay", "0.01"]

    rows = []

    def add(case, row, vs, make):
        rows.append({"case": case, "row": row, "vs": vs, "make": make})

    q = "quickstart effnet-lite0 digits 64px"
    common = (effnet, "hftl/digits", epochs, 32, 2e-3, 0.3 if quick else 0.9)
    add(q, "baseline Trainer", None, lambda o: baseline_cmd(o, effnet, "digits", *common[2:], extra=base_common))
    add(q, "hftl", "baseline Trainer", lambda o: hftl_cmd(o, *common, extra=quick_common))
    if not quick:
        cl_off = [*quick_common, "--channels_last", "false"]
        add(q, "hftl channels_last off", "hftl", lambda o: hftl_cmd(o, *common, cl_off))
        keep_off = [*quick_common, "--cpu_keep_freed_memory", "false"]
        add(q, "hftl keep-freed-memory off", "hftl", lambda o: hftl_cmd(o, *common, keep_off))
        add(q, "hftl eval-cache off", "hftl", lambda o: hftl_cmd(o, *common, quick_common, ["--no_eval_cache"]))
        no_decoded = [*quick_common, "--decoded_cache_max_mb", "0"]
        add(q, "hftl decoded-images off", "hftl", lambda o: hftl_cmd(o, *common, no_decoded))
        add(q, "hftl num_workers 1", "hftl", lambda o: hftl_cmd(o, *common, [*quick_common, "--num_workers", "1"]))
        bf16 = ["--mixed_precision", "bf16"]
        base_bf16 = [*base_common, "--bf16"]
        add(q, "baseline Trainer bf16", None, lambda o: baseline_cmd(o, effnet, "digits", *common[2:], base_bf16))
        add(q, "hftl bf16", "baseline Trainer bf16", lambda o: hftl_cmd(o, *common, [*quick_common, *bf16]))
    if compile_row:
        add(q, "hftl compile", "hftl", lambda o: hftl_cmd(o, *common, [*quick_common, "--compile", "true"]))

    # real data with a public leaderboard: a stratified-size subset of Fashion-MNIST, same augmentation both sides
    f = "fashion-mnist effnet-lite0 64px"
    fm_limits = ["--max_train_samples", "1024" if quick else "10800", "--max_eval_samples", "512" if quick else "2000"]
    fm = (effnet, "hftl/fashion-mnist", epochs, 32, 1e-3, 0.5 if quick else 0.85)
    fm_hftl = ["--image_size", "64", "--hflip", "false", "--crop_scale_min", "0.7", "--weight_decay", "0.01"]
    add(f, "baseline Trainer", None, lambda o: baseline_cmd(o, effnet, "fashion-mnist", *fm[2:], extra=fm_limits))
    add(f, "hftl", "baseline Trainer", lambda o: hftl_cmd(o, *fm, extra=[*fm_hftl, *fm_limits]))

    t = "vit-tiny (h64 L4) synthetic 64px"
    tiny_args = (tiny, synthetic, epochs + 1, 32, 1e-3, 0.9)
    add(t, "baseline Trainer", None, lambda o: baseline_cmd(o, tiny, synthetic, *tiny_args[2:], extra=vit_base))
    add(t, "hftl", "baseline Trainer", lambda o: hftl_cmd(o, *tiny_args, extra=vit_common))
    if not quick:
        no_decoded = [*vit_common, "--decoded_cache_max_mb", "0"]
        add(t, "hftl decoded-images off", "hftl", lambda o: hftl_cmd(o, *tiny_args, extra=no_decoded))
    add(t, "hftl 2 ranks", "hftl", lambda o: hftl_cmd(o, *tiny_args, extra=vit_common, ranks=2))

    s = "vit-small (h384 L6) synthetic 64px"
    small_args = (small, synthetic, epochs + 1, 32, 5e-4, 0.9)
    add(s, "baseline Trainer full", None, lambda o: baseline_cmd(o, small, synthetic, *small_args[2:], extra=vit_base))
    add(s, "hftl full", "baseline Trainer full", lambda o: hftl_cmd(o, *small_args, extra=vit_common))
    add(s, "hftl lora", "hftl full", lambda o: hftl_cmd(o, *small_args, extra=[*vit_common, "--strategy", "lora"]))
    if not quick:
        lora_gc = [*vit_common, "--strategy", "lora", "--gradient_checkpointing", "true"]
        add(s, "hftl lora gradient checkpointing", "hftl full", lambda o: hftl_cmd(o, *small_args, extra=lora_gc))
    lp = [*vit_common, "--strategy", "linear-probe", "--learning_rate", "1.0e-2"]
    lp_off = [*lp, "--cache_features", "false"]
    add(s, "hftl linear-probe uncached", "hftl full", lambda o: hftl_cmd(o, *small_args, lp_off))
    add(s, "hftl linear-probe cached", "hftl linear-probe uncached", lambda o: hftl_cmd(o, *small_args, lp))
    if compile_row:
        compiled = [*vit_common, "--compile", "true"]
        add(s, "hftl full compile", "hftl full", lambda o: hftl_cmd(o, *small_args, extra=compiled))

    if not quick:  # the memory of full vs LoRA on a model of the size people fine-tune (ViT-B/16's shape)
        b = "vit-base/16 (h768 L12) synthetic 64px"
        base64 = write_vit_folder(WORK / "models" / "vit-base-64", "vit-base", 64, 4)
        base_args = (base64, synthetic, 2, 32, 2e-4, 0.9)
        add(b, "hftl full", None, lambda o: hftl_cmd(o, *base_args, extra=vit_common))
        add(b, "hftl lora", "hftl full", lambda o: hftl_cmd(o, *base_args, extra=[*vit_common, "--strategy", "lora"]))

    if gpu_case:  # ViT-B/16 at 224 px in bf16: the GPU case (MFU in the table); tiny: the same rows, CPU-sized
        g = GPU_CASE
        size, px, batch = ("vit-tiny", 32, 8) if gpu_tiny else ("vit-base", 224, 64)
        base = write_vit_folder(WORK / "models" / f"{size}-{px}", size, px, 4)
        count = {"train": 16, "validation": 8, "test": 8} if gpu_tiny else {"train": 64 if quick else 2048}
        count = {"validation": 64, "test": 16, **count}
        data = str(write_synthetic_folder(WORK / "data" / f"synthetic-{px}-{count['train']}", px, count))
        base_args = (base, data, 1 if gpu_tiny else 2 if quick else 3, batch, 5e-4, 0.9)
        bf16 = ["--image_size", str(px), "--hflip", "false", "--weight_decay", "0.01", "--mixed_precision", "bf16"]
        base_bf16 = ["--weight_decay", "0.01", "--bf16"]
        add(g, "baseline Trainer bf16", None, lambda o: baseline_cmd(o, base, data, *base_args[2:], extra=base_bf16))
        add(g, "hftl bf16", "baseline Trainer bf16", lambda o: hftl_cmd(o, *base_args, extra=bf16))
        if not gpu_tiny:  # compiling on 2 CPU cores takes minutes; --compile has its own tests
            compiled = [*bf16, "--compile", "true"]
            add(g, "hftl bf16 compile", "baseline Trainer bf16", lambda o: hftl_cmd(o, *base_args, extra=compiled))
        add(g, "hftl bf16 lora", "hftl bf16", lambda o: hftl_cmd(o, *base_args, extra=[*bf16, "--strategy", "lora"]))
    return rows


GPU_CASE = "vit-base/16 synthetic 224px bf16"


def run_row(row: dict, out_dir: Path, index: int) -> dict:
    out = out_dir / f"{index:02d}.json"
    out.unlink(missing_ok=True)
    command = row["make"](out)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  FAILED ({proc.returncode}):\n{tail}", file=sys.stderr)
        return {"error": tail[-500:], "wall_s": wall}
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    return result


def mfu_reference(rows: list[dict], model_folder, image_size: int) -> None:
    """Model FLOPs per training image and the card's bf16 peak, for the MFU column of the GPU case."""
    import torch

    flops = train_flops_per_image(model_folder, image_size)
    peak = bf16_peak_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    for row in rows:
        if row["case"] == GPU_CASE:
            row["train_flops_per_image"], row["bf16_peak_flops"] = flops, peak


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def fmt(value, digits=1):
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    head = (
        "| case | row | train img/s | eval img/s | peak RSS MB | train ΔRSS MB | later epoch s | to target s "
        "| val acc | vs | train × | eval × | peak mem × | ΔRSS × | later epoch × | MFU |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_name = {(r["case"], r["row"]): r["result"] for r in rows}
    for r in rows:
        res, ref = r["result"], by_name.get((r["case"], r["vs"]), {}) if r["vs"] else {}
        if "error" in res:
            lines.append(f"| {r['case']} | {r['row']} | failed |" + " |" * 13)
            continue
        mem = res.get("cuda_peak_mb") or res["peak_rss_mb"]
        ref_mem = ref.get("cuda_peak_mb") or ref.get("peak_rss_mb")
        cells = [
            r["case"],
            r["row"],
            fmt(res["train_images_per_s"]),
            fmt(res["eval_images_per_s"]),
            fmt(mem, 0),
            fmt(res["train_rss_delta_mb"], 0),
            fmt(res.get("later_epoch_seconds"), 2),
            fmt(res.get("time_to_target_s")),
            fmt(res.get("best_val_accuracy"), 3),
            r["vs"] or "",
            fmt(ratio(res["train_images_per_s"], ref.get("train_images_per_s")), 2),
            fmt(ratio(res["eval_images_per_s"], ref.get("eval_images_per_s")), 2),
            fmt(ratio(mem, ref_mem), 2),
            fmt(ratio(res["train_rss_delta_mb"], ref.get("train_rss_delta_mb")), 2),
            fmt(ratio(ref.get("later_epoch_seconds"), res.get("later_epoch_seconds")), 1),
            _mfu(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mfu(row: dict) -> str:
    """Model FLOP utilisation: training FLOPs per image x train images/s over the card's bf16 peak."""
    flops, peak = row.get("train_flops_per_image"), row.get("bf16_peak_flops")
    if not flops or not peak:
        return "—"
    return f"{100 * flops * row['result']['train_images_per_s'] / peak:.1f}%"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer rows and samples (~2 min on 2 CPU cores).")
    parser.add_argument("--compile", action="store_true", help="Add a torch.compile row.")
    parser.add_argument("--only", default=None, help='Run only rows whose "case: row" matches this regex.')
    parser.add_argument("--repeats", type=int, default=1, help="Run every row N times (interleaved); report medians.")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS for every row (1 on a shared, busy machine)."
    )
    parser.add_argument(
        "--gpu_case", action="store_true", help="Add the ViT-B/16 224 px bf16 case (automatic with a GPU)."
    )
    parser.add_argument(
        "--gpu_tiny", action="store_true", help="The GPU case's rows at CPU size (gpu_check.py --dry_run)."
    )
    parser.add_argument("--results", default=str(BENCH_DIR / "results"), help="Folder for the .json / .md results.")
    args = parser.parse_args(argv)

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every row's subprocess
        os.environ["HFTL_BENCH_THREADS"] = str(args.threads)
    out_dir = WORK / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    gpu_case = args.gpu_case or torch.cuda.is_available()
    rows = [
        r
        for r in cases(args.quick, args.compile, gpu_case, args.gpu_tiny)
        if not args.only or re.search(args.only, f"{r['case']}: {r['row']}")
    ]
    if any(r["case"] == GPU_CASE for r in rows):
        size, px = ("vit-tiny", 32) if args.gpu_tiny else ("vit-base", 224)
        mfu_reference(rows, WORK / "models" / f"{size}-{px}", px)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = []
    for repeat in range(args.repeats):
        for index, row in enumerate(rows):
            print(f"[{repeat + 1}.{index + 1}/{len(rows)}] {row['case']}: {row['row']}", flush=True)
            row.setdefault("runs", []).append(run_row(row, out_dir, index))
            row["result"] = median_result(row["runs"])
            if row not in done:
                done.append(row)
            header, text = report(done, args, load, started)  # rewritten after each row: a cut-off run keeps rows
            save(Path(args.results) / run_name(args), header, text, done)
    print("\n" + header + "\n\n" + text)


def median_result(runs: list[dict]) -> dict:
    """Each number's median over the runs that finished (a row with no finished run keeps its error)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    merged = dict(ok[-1])
    for key, value in merged.items():
        values = [r.get(key) for r in ok]
        if key == "time_to_target_s":  # a run that never reached the target counts as slower than any that did
            middle = statistics.median([math.inf if v is None else v for v in values])
            merged[key] = None if math.isinf(middle) else middle
        elif _number(value) and all(_number(v) for v in values):
            merged[key] = statistics.median(values)
    merged["runs_finished"] = len(ok)
    return merged


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def report(rows: list[dict], args, load: float, started: float) -> tuple[str, str]:
    import torch

    hardware = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    header = (
        f"hftl bench ({'quick' if args.quick else 'default'}, {time.strftime('%Y-%m-%d')}) on {hardware}, "
        f"{platform.machine()}, torch "
        f"{torch.__version__}; load average at start {load:.1f}; total {time.perf_counter() - started:.0f}s"
        + (f"; each number the median of {args.repeats} interleaved runs" if args.repeats > 1 else "")
    )
    return header, table(rows)


def run_name(args) -> str:
    name = "quick" if args.quick else "default"
    if not args.only:
        return name
    return name + "-" + re.sub(r"[^0-9A-Za-z]+", "-", args.only).strip("-")[:40]


def save(stem: Path, header: str, text: str, rows: list[dict]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "make"} for r in rows]
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "rows": slim}, indent=2, default=str))
    stem.with_suffix(".md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()

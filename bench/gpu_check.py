"""The GPU check: one command that runs hftl where users run it and writes down what it measured.

Usage:
    bash bench/gpu_wheels.sh                 # here, with a package index: wheels of what the GPU image lacks
    python bench/gpu_check.py --install .gpu-wheels   # on the GPU machine (no index): install them, then check
    python bench/gpu_check.py --dry_run --results /tmp/gpu-dry   # same steps at CPU size, no CUDA, no compile row
                                                                 # (tests run this)

Steps, each in its own subprocess under a time limit (the results files are rewritten after every step, so a step
that runs out of time still leaves the ones before it):
  1. the device tests (`pytest -m device`: mixed precision, channels_last, pinned non-blocking copies, fused AdamW,
     persistent DataLoader workers with the shared augmentation epoch, the decoded-image path, checkpoint resume,
     LoRA merge) on CUDA;
  2. the offline quickstart in bf16 through the documented `accelerate launch`: test accuracy and wall time;
  3. bench/run.py's GPU case: ViT-B/16 at 224 px in bf16, hftl vs the plain Trainer script on the same data, with
     and without --compile, and LoRA vs full for peak GPU memory, with GPU utilisation sampled meanwhile.
Writes <results>/gpu-<date>.json and .md; the JSON's top-level keys `train_ratio`, `mfu`, `compile_train_ratio`,
`lora_memory_ratio`, `gpu_utilisation` and `quickstart_test_accuracy` are the numbers to read back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
# Each step's limit on one H200: together they stay under ~8 minutes.
LIMITS_S = {"device tests": 240, "quickstart bf16": 150, "gpu case": 300}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry_run", action="store_true", help="The same steps at CPU size, without CUDA.")
    parser.add_argument("--install", default=None, help="A folder of wheels to `pip install --no-deps` first.")
    parser.add_argument("--results", default=str(BENCH_DIR / "results"), help="Folder for gpu-<date>.json/.md.")
    parser.add_argument("--work", default=None, help="Scratch folder (default: $HFTL_BENCH_WORK or /tmp).")
    args = parser.parse_args(argv)

    if args.install:
        install(Path(args.install))
    work = Path(args.work or os.environ.get("HFTL_BENCH_WORK", "/tmp/hftl-gpu-check"))
    env = dict(os.environ, HFTL_BENCH_WORK=str(work), HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    env["HFTL_CACHE"] = str(work / "cache")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run must not need, nor use, a GPU
    else:
        env["HFTL_TEST_DEVICE"] = "cuda"  # tests/conftest.py keeps the GPU visible for the device tests
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA device is visible: run on a GPU machine, or pass --dry_run for the CPU dry run.")

    stem = Path(args.results) / f"gpu-{time.strftime('%Y-%m-%d')}{'-dry-run' if args.dry_run else ''}"
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "CPU",
        "torch": torch.__version__,
        "steps": {},
    }
    for name, step in (("device tests", device_tests), ("quickstart bf16", quickstart), ("gpu case", gpu_case)):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            report["steps"][name] = step(args.dry_run, work, env)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as err:
            report["steps"][name] = {"error": _tail(err)}
        report["steps"][name]["seconds"] = round(time.perf_counter() - started, 1)
        summarise(report)
        write(stem, report)
    print(stem.with_suffix(".md").read_text())
    return report


def install(wheels: Path) -> None:
    """What the GPU image lacks, without a package index: the carried wheels, then hftl itself (editable)."""
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    if found:
        subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", *found], check=True)
    subprocess.run(
        [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)], check=True
    )


def device_tests(dry_run: bool, work: Path, env: dict) -> dict:
    command = [PYTHON, "-m", "pytest", "-m", "device", "-q", "-p", "no:cacheprovider", "--durations=0"]
    if dry_run:  # the suite runs these tests on the CPU already; here only check that the selection still exists
        command.append("--collect-only")
    out = _run(command, env, _limit("device tests", dry_run), check=False)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)\b", out)}
    result = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0)}
    # with --collect-only -q, pytest prints one test id a line
    result["collected"] = len(re.findall(r"^tests/\S+::\S+", out, re.M)) or result["passed"] + result["failed"]
    if result["failed"] or not result["collected"]:
        result["output_tail"] = out[-3000:]
    return result


def quickstart(dry_run: bool, work: Path, env: dict) -> dict:
    config = REPO / "recipes/configs/classification/quickstart.yaml"
    out_dir = work / "quickstart-bf16"
    command = [PYTHON, "-m", "accelerate.commands.launch", "--num_processes", "1", str(REPO / "recipes/classify.py")]
    command += ["--config", str(config), "--mixed_precision", "bf16", "--output_dir", str(out_dir)]
    command += ["--report_to", "none", "--overwrite_output_dir"]
    if dry_run:
        command += ["--max_train_samples", "64", "--max_eval_samples", "32", "--num_epochs", "1", "--image_size", "32"]
    started = time.perf_counter()
    _run(command, env, _limit("quickstart bf16", dry_run))
    results = json.loads((out_dir / "all_results.json").read_text())
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "test_accuracy": results["test"]["accuracy"],
        "train_seconds": results["train"].get("train_seconds"),
        "mixed_precision": "bf16",
    }


def gpu_case(dry_run: bool, work: Path, env: dict) -> dict:
    results = work / "bench-results"
    for old in results.glob("*"):
        old.unlink()
    command = [PYTHON, str(BENCH_DIR / "run.py"), "--gpu_case", "--only", "^vit-base/16 synthetic 224px bf16"]
    command += ["--results", str(results)]
    if dry_run:
        command.append("--gpu_tiny")
    sampler = UtilisationSampler()
    with sampler:
        _run(command, env, _limit("gpu case", dry_run))
    rows = json.loads(next(results.glob("*.json")).read_text())["rows"]
    extra = ("train_flops_per_image", "bf16_peak_flops")
    by_row = {r["row"]: {**r["result"], **{k: r.get(k) for k in extra}} for r in rows}
    return {"rows": by_row, "gpu_utilisation_mean": sampler.mean()}


class UtilisationSampler:
    """Mean GPU utilisation (nvidia-ml, through torch) while a step runs: shows whether data loading starves it."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import torch

        while not self._stop.wait(self.every_s):
            try:
                self.samples.append(torch.cuda.utilization())
            except Exception:  # no GPU (dry run) or no NVML: utilisation is simply not reported
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self) -> float | None:
        busy = [s for s in self.samples if s is not None]
        return round(sum(busy) / len(busy), 1) if busy else None


def summarise(report: dict) -> None:
    """The headline numbers as top-level keys, ratio first; None where a step did not produce them."""
    rows = report["steps"].get("gpu case", {}).get("rows", {})
    names = ("hftl bf16", "baseline Trainer bf16", "hftl bf16 compile", "hftl bf16 lora")
    full, base, comp, lora = (rows.get(k, {}) for k in names)

    def speed(row):
        return row.get("train_images_per_s")

    def memory(row):
        return row.get("cuda_peak_mb") or row.get("peak_rss_mb")

    def mfu(row):
        flops, peak = row.get("train_flops_per_image"), row.get("bf16_peak_flops")
        return flops * speed(row) / peak if flops and peak and speed(row) else None

    report["train_ratio"] = _ratio(speed(full), speed(base))
    report["compile_train_ratio"] = _ratio(speed(comp), speed(base))
    report["mfu"] = mfu(full)
    report["mfu_compile"] = mfu(comp)
    report["lora_memory_ratio"] = _ratio(memory(lora), memory(full))
    report["gpu_utilisation"] = report["steps"].get("gpu case", {}).get("gpu_utilisation_mean")
    report["quickstart_test_accuracy"] = report["steps"].get("quickstart bf16", {}).get("test_accuracy")


def write(stem: Path, report: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))


def markdown(report: dict) -> str:
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    def num(x, digits=2):
        return "—" if x is None else f"{x:.{digits}f}"

    steps = report["steps"]
    lines = [
        f"# hftl GPU check{' (dry run, CPU)' if report['dry_run'] else ''}: {report['device']}, "
        f"torch {report['torch']}, {report['date']}",
        "",
        "| target | measured |",
        "|---|---|",
        f"| train images/s vs Trainer, ViT-B/16 224 px bf16 (≥ 1.5×) | {num(report['train_ratio'])}× |",
        f"| same with --compile | {num(report['compile_train_ratio'])}× |",
        f"| MFU, hftl bf16 / with compile (≥ 40%) | {pct(report['mfu'])} / {pct(report['mfu_compile'])} |",
        f"| LoRA peak memory vs full (≤ 0.6×) | {num(report['lora_memory_ratio'])}× |",
        f"| GPU utilisation during the GPU case | {num(report['gpu_utilisation'], 1)} |",
        f"| quickstart bf16 test accuracy | {num(report['quickstart_test_accuracy'], 4)} |",
        "",
        "| step | seconds | result |",
        "|---|---|---|",
    ]
    for name, step in steps.items():
        shown = {k: v for k, v in step.items() if k not in ("seconds", "rows", "output_tail", "error")}
        lines.append(f"| {name} | {step.get('seconds')} | {'error: see JSON' if 'error' in step else shown} |")
    rows = steps.get("gpu case", {}).get("rows", {})
    if rows:
        lines += [
            "",
            "| GPU case row | train img/s | eval img/s | peak memory MB | val acc |",
            "|---|---|---|---|---|",
        ]
        for name, r in rows.items():
            mem = r.get("cuda_peak_mb") or r.get("peak_rss_mb")
            lines.append(
                f"| {name} | {num(r.get('train_images_per_s'), 1)} | {num(r.get('eval_images_per_s'), 1)} "
                f"| {num(mem, 0)} | {num(r.get('best_val_accuracy'), 3)} |"
            )
    return "\n".join(lines) + "\n"


def _limit(step: str, dry_run: bool) -> int:
    return LIMITS_S[step] * (3 if dry_run else 1)  # the dry run runs on 2 CPU cores, maybe beside other work


def _ratio(a, b):
    return a / b if a and b else None


def _run(command: list[str], env: dict, limit_s: int, check: bool = True) -> str:
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=limit_s)
    out = proc.stdout + proc.stderr
    print(out[-2000:], flush=True)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, command, output=out)
    return out


def _tail(err: Exception) -> str:
    out = getattr(err, "output", None) or ""
    if isinstance(out, bytes):
        out = out.decode(errors="replace")
    return f"{type(err).__name__}: {err}\n{out[-3000:]}"


if __name__ == "__main__":
    main()

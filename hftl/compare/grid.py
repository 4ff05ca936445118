"""The grid: compare options, one run configuration per cell, and running the cells (child processes or
in-process) with their peak memory."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from copy import deepcopy
from dataclasses import dataclass, field, fields
from pathlib import Path

from hftl.compare.shift import ADAPT_METHODS, CORRUPTIONS, parse_corruptions
from hftl.config import CONFIG_CLASSES, STRATEGIES, RunConfig, config_file_values
from hftl.config import parse_config as parse_run_config
from hftl.config import validate as validate_run_config
from hftl.log import get_logger
from hftl.outputs import is_finished
from hftl.runner import run_config
from hftl.system import peak_rss_mb

logger = get_logger(__name__)

SCRATCH = "scratch"
ZERO_SHOT = "zero-shot"  # one cell per model at shots 0: the start of every learning curve (dual encoders)
RESOURCES_FILE = "resources.json"
CELL_CONFIG_FILE = "cell_config.json"
LOG_FILE = "log.txt"


@dataclass
class CompareArgs:
    models: str = field(
        default="hftl/efficientnet-lite0", metadata={"help": "Comma-separated models (Hub ids, folders, bundled)."}
    )
    strategies: str = field(
        default="linear-probe,lora,full",
        metadata={"help": f"Comma-separated strategies: {', '.join(STRATEGIES)}, or {SCRATCH} (random init, full)."},
    )
    shots: str = field(
        default="1,5,10,all",
        metadata={"help": "Labelled images per class: numbers and/or 'all'; 0 is the zero-shot strategy's point."},
    )
    seeds: int = field(default=3, metadata={"help": "Seeds per cell (train seed + 0..seeds-1; also the sample)."})
    report_dir: str = field(default="outputs/compare", metadata={"help": "Runs go to runs/, the report to report/."})
    scratch_baseline: bool = field(
        default=True, metadata={"help": f"Add the '{SCRATCH}' strategy to the grid (learning-curve baseline)."}
    )
    budget_seconds: float | None = field(
        default=None, metadata={"help": "Recommend the best cell whose mean train time is at most this."}
    )
    budget_params: int | None = field(
        default=None, metadata={"help": "Recommend the best cell with at most this many trainable parameters."}
    )
    isolate: bool = field(
        default=True, metadata={"help": "Run each cell in a child process (its own peak memory; crash-safe)."}
    )
    shift: str | None = field(
        default="blur,noise,contrast,rotation",
        metadata={"help": f"Corruptions for the shift evaluation ({', '.join(CORRUPTIONS)}); 'none' to skip."},
    )
    shift_severities: str = field(default="1,2,3", metadata={"help": "Corruption severities, 1..5."})
    adapt: str = field(
        default="adabn,tent", metadata={"help": f"Label-free adaptation under shift: {', '.join(ADAPT_METHODS)}."}
    )
    shift_cells: str = field(
        default="best",
        metadata={
            "help": "Shift-evaluate 'best' (the recommendation), 'all' model×strategy pairs at the largest label "
            "budget, or the best cell of each listed strategy plus the recommendation (e.g. full,scratch)."
        },
    )
    eval_datasets: str | None = field(
        default=None,
        metadata={
            "help": "Extra test sets with the same labels (ids, folders, bundled), comma list. With --wise_ft_alpha, "
            "every alpha of every cell is also tested on them and on --shift (severity 3)."
        },
    )
    push_report: str | None = field(default=None, metadata={"help": "Upload report/ to this Hub dataset repo."})
    rank: bool = field(
        default=True,
        metadata={
            "help": "With several models: score them with `hftl rank`'s proxies and report each proxy's Kendall τ "
            "and top-1 hit against the fine-tuned ranking (report/rank.md)."
        },
    )
    strategy_options: str | None = field(
        default=None,
        metadata={
            "help": "Per-strategy run options, JSON or a YAML mapping, e.g. "
            '\'{"linear-probe": {"learning_rate": 0.02, "num_epochs": 30}}\' (a probe wants a higher rate).'
        },
    )


COMPARE_KEYS = {f.name for f in fields(CompareArgs)}


@dataclass(frozen=True)
class Cell:
    model: str
    strategy: str
    shots: int | None  # None = all
    seed_index: int

    @property
    def name(self) -> str:
        return f"{model_slug(self.model)}__{self.strategy}__{shots_label(self.shots)}__seed{self.seed_index}"


def model_slug(model: str) -> str:
    """A folder-safe name: Hub ids keep owner and name, local folders their last component."""
    path = Path(model)
    name = path.name if (path.is_dir() or model.startswith((".", "/"))) else model.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) or "model"


def shots_label(shots: int | None) -> str:
    return "all" if shots is None else str(shots)


def split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def parse_shots(text: str) -> list[int | None]:
    values = []
    for part in split_list(text):
        if part.lower() == "all":
            values.append(None)
        elif part.isdigit():
            values.append(int(part))
        else:
            raise ValueError(f"--shots: {part!r} is neither a number of images per class nor 'all'.")
    if not values:
        raise ValueError("--shots is empty; e.g. --shots 1,5,10,all.")
    return values


def parse_compare_config(argv: list[str] | None = None, defaults: dict | None = None) -> tuple[CompareArgs, RunConfig]:
    """Compare options and the per-cell run options, from one YAML (`--config`) and one command line."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(CompareArgs, allow_abbrev=False)  # --model must never abbreviate to --models
    merged = config_file_values(parser, argv, defaults)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nEvery option of a single run applies to each cell as well:\n")  # noqa: T201 (--help text)
        HfArgumentParser(CONFIG_CLASSES).print_help()
        raise SystemExit(0)
    if isinstance(merged.get("shots"), list):  # YAML lists read as lists; the flag takes a comma string
        merged["shots"] = ",".join(str(s) for s in merged["shots"])
    for key in ("models", "strategies", "shift", "adapt", "shift_severities", "eval_datasets"):
        if isinstance(merged.get(key), list):
            merged[key] = ",".join(str(v) for v in merged[key])
    compare_defaults = {k: v for k, v in merged.items() if k in COMPARE_KEYS}
    run_defaults = {k: v for k, v in merged.items() if k not in COMPARE_KEYS}
    parser.set_defaults(**compare_defaults)
    args, _, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    rest = _drop_config_flag(rest)
    base = parse_run_config(rest, run_defaults)
    validate(args)
    flags = {token.split("=")[0][2:].replace("-", "_") for token in rest if token.startswith("--")}
    _wise_ft_targets(args, base, flags | set(run_defaults))
    return args, base


def _wise_ft_targets(args: CompareArgs, base: RunConfig, given: set[str]) -> None:
    """With --wise_ft_alpha, every alpha is tested under the grid's own shift evaluation (--shift corruptions at
    WiSE-FT's severity, --eval_datasets): one place sets it, so the per-alpha table and the shift table agree."""
    if not base.strategy.wise_ft_alpha:
        return
    own = sorted({"wise_ft_shift", "wise_ft_eval_datasets"} & given)
    if own:
        raise ValueError(
            f"compare sets WiSE-FT's shift evaluation from --shift and --eval_datasets: drop --{' --'.join(own)}."
        )
    base.strategy.wise_ft_shift = ",".join(shift_corruptions(args)) or "none"
    base.strategy.wise_ft_eval_datasets = ",".join(split_list(args.eval_datasets)) or None


def _drop_config_flag(argv: list[str]) -> list[str]:
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("--config="):
            out.append(token)
    return out


def validate(args: CompareArgs) -> None:
    models = split_list(args.models)
    if not models:
        raise ValueError("--models is empty; e.g. --models hftl/efficientnet-lite0,google/vit-base-patch16-224.")
    slugs = [model_slug(m) for m in models]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--models {models} give the same folder name twice ({slugs}); rename a local folder.")
    for strategy in split_list(args.strategies):
        if strategy not in (*STRATEGIES, SCRATCH):
            raise ValueError(f"--strategies: unknown {strategy!r}; choose from {', '.join((*STRATEGIES, SCRATCH))}.")
    if 0 in parse_shots(args.shots) and ZERO_SHOT not in split_list(args.strategies):
        raise ValueError(f"--shots 0 is the zero-shot point: add {ZERO_SHOT} to --strategies (needs CLIP/SigLIP).")
    if args.seeds < 1:
        raise ValueError("--seeds must be at least 1.")
    for name, value in (("--budget_seconds", args.budget_seconds), ("--budget_params", args.budget_params)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive.")
    shift_corruptions(args)
    for severity in split_list(args.shift_severities):
        if not (severity.isdigit() and 1 <= int(severity) <= 5):
            raise ValueError(f"--shift_severities: {severity!r} is not a severity 1..5.")
    for method in split_list(args.adapt):
        if method not in ADAPT_METHODS:
            raise ValueError(f"--adapt: unknown {method!r}; choose from {', '.join(ADAPT_METHODS)}.")
    strategy_options(args)
    if args.shift_cells not in ("best", "all") and not set(split_list(args.shift_cells)) <= {*STRATEGIES, SCRATCH}:
        raise ValueError("--shift_cells must be 'best', 'all', or a comma list of strategies (e.g. full,lora).")


def check_extra_test_sets(args: CompareArgs, base: RunConfig) -> None:
    """--eval_datasets load and hold the dataset's classes: checked before the first cell, where a bad one used to
    be found by the report, after the whole grid (and, with WiSE-FT, after each cell's fine-tune)."""
    extra = split_list(args.eval_datasets)
    if extra:
        from hftl.compare.shift import check_eval_datasets
        from hftl.runner import prepare_data
        from hftl.tasks import get_task

        _, spec = prepare_data(get_task("classification", base), base, check=False)
        check_eval_datasets(base, extra, spec.label_names, "--eval_datasets")


def shift_corruptions(args: CompareArgs) -> list[str]:
    return parse_corruptions(args.shift, "--shift")


def grid(args: CompareArgs) -> list[Cell]:
    strategies = split_list(args.strategies)
    if args.scratch_baseline and SCRATCH not in strategies:
        strategies.append(SCRATCH)
    cells = []
    for model in split_list(args.models):
        for strategy in strategies:
            if strategy == ZERO_SHOT:  # nothing trains, so neither labels nor seeds change it
                cells.append(Cell(model, strategy, 0, 0))
                continue
            budgets = [shots for shots in parse_shots(args.shots) if shots != 0]
            cells += [Cell(model, strategy, shots, k) for shots in budgets for k in range(args.seeds)]
    return cells


def strategy_options(args: CompareArgs) -> dict[str, dict]:
    """{strategy: {run option: value}}, checked against the grid's strategies and the run options."""
    raw = args.strategy_options
    if raw is None or raw == "":
        return {}
    options = json.loads(raw) if isinstance(raw, str) else raw
    known = {f.name for cls in CONFIG_CLASSES for f in fields(cls)}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError('--strategy_options must map strategy -> {option: value}, e.g. {"full": {"num_epochs": 3}}.')
    for strategy, values in options.items():
        if strategy not in (*STRATEGIES, SCRATCH):
            raise ValueError(f"--strategy_options: unknown strategy {strategy!r}.")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--strategy_options[{strategy!r}]: unknown run option(s) {unknown}.")
    return options


def cell_config(base: RunConfig, cell: Cell, run_dir: Path, overrides: dict | None = None) -> RunConfig:
    config = deepcopy(base)
    for key, value in (overrides or {}).get(cell.strategy, {}).items():
        group = next(
            g for g in (config.data, config.model, config.strategy, config.train, config.hub) if hasattr(g, key)
        )
        setattr(group, key, value)
    config.model.model = cell.model
    config.model.from_scratch = cell.strategy == SCRATCH
    if cell.strategy in (SCRATCH, ZERO_SHOT):  # no zero-shot start, or nothing fine-tuned, to interpolate
        config.strategy.wise_ft_alpha = config.strategy.wise_ft_eval_datasets = None
    config.strategy.strategy = "full" if cell.strategy == SCRATCH else cell.strategy
    config.data.shots = 1 if cell.shots == 0 else cell.shots  # zero-shot never reads train: load the least
    config.train.seed = base.train.seed + cell.seed_index
    config.train.output_dir = str(run_dir)
    config.train.overwrite_output_dir = True  # an unfinished cell (no all_results.json) is redone from the start
    config.train.resume_from_checkpoint = None
    config.hub.push_to_hub, config.hub.publish_space = False, None  # cells are experiments; push the winner yourself
    validate_run_config(config)
    return config


def run_grid(args: CompareArgs, base: RunConfig) -> list[Path]:
    """Runs every unfinished cell; returns all cells' run folders."""
    runs = Path(args.report_dir) / "runs"
    cells = grid(args)
    overrides = strategy_options(args)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    isolate = args.isolate and not distributed
    done = sum(is_finished(runs / cell.name) for cell in cells)
    logger.info(f"compare: {len(cells)} cells, {done} already finished, {len(cells) - done} to run ({runs})")
    for number, cell in enumerate(cells, 1):
        run_dir = runs / cell.name
        if is_finished(run_dir):
            continue
        config = cell_config(base, cell, run_dir, overrides)
        started = time.perf_counter()
        logger.info(f"[{number}/{len(cells)}] {cell.name} ...")
        if isolate:
            run_cell_subprocess(config, run_dir)
        else:
            run_cell_in_process(config, run_dir)
        logger.info(f"[{number}/{len(cells)}] {cell.name} done in {time.perf_counter() - started:.1f}s")
    return [runs / cell.name for cell in cells]


def run_cell_subprocess(config: RunConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / CELL_CONFIG_FILE
    config_path.write_text(json.dumps(config.to_dict(), indent=2))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    with open(run_dir / LOG_FILE, "w") as log:
        code = subprocess.call(
            [sys.executable, "-m", "hftl.compare", str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    if code != 0 or not is_finished(run_dir):
        tail = "".join((run_dir / LOG_FILE).read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"Cell {run_dir.name} failed (exit code {code}); log {run_dir / LOG_FILE}:\n{tail}")


def run_cell_in_process(config: RunConfig, run_dir: Path) -> None:
    """Peak RSS sampled while the cell runs (the process's, so earlier cells' leftovers count too)."""
    import psutil
    import torch

    process, peak, stop = psutil.Process(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler.start()
    try:
        run_config("classification", config)
    finally:
        stop.set()
        sampler.join()
    _write_resources(run_dir, peak[0] / 2**20, "sampled in-process (psutil, 50 ms)")


def run_cell_file(config_path: str) -> None:
    """Child-process entry: one cell, then its own peak memory from the kernel (exact, not sampled)."""
    config = RunConfig.from_dict(json.loads(Path(config_path).read_text()))
    run_config("classification", config)
    _write_resources(Path(config.train.output_dir), peak_rss_mb(), "process peak RSS (VmHWM)")


def _write_resources(run_dir: Path, peak_mb: float, how: str) -> None:
    import torch

    values = {"peak_rss_mb": round(peak_mb, 1), "measured": how}
    if torch.cuda.is_available():
        values["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        tmp = run_dir / f".{RESOURCES_FILE}.tmp"
        tmp.write_text(json.dumps(values))
        os.replace(tmp, run_dir / RESOURCES_FILE)

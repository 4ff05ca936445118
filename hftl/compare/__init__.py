"""Choosing how to transfer: run a grid of backbones × strategies × label budgets × seeds, then report.

Every cell is a normal hftl classification run into `<report_dir>/runs/<model>__<strategy>__<shots>__seed<k>/`.
A cell whose `all_results.json` exists is finished and skipped, so an interrupted grid resumes where it stopped.
The strategy name `scratch` means "full fine-tuning of the same architecture from random init" (`--from_scratch`):
the baseline every transfer strategy has to beat, drawn on every learning-curve plot.

Cells run in child processes by default, so each cell's peak memory (RSS, and CUDA when used) is its own; under a
multi-process `accelerate launch` they run in-process, every rank stepping through the same grid.

Usage:
    accelerate launch recipes/compare.py --dataset hftl/digits --models hftl/efficientnet-lite0 \
        --strategies linear-probe,lora,full --shots 1,5,10,all --seeds 3 --report_dir outputs/compare
    python -m hftl.compare <cell_config.json>      # one cell (what the grid's child processes run)

Modules, each importing only those above it: shift (corruptions, AdaBN/TENT) < grid (options, cells, running
them) < aggregate (leaderboard numbers) < plots < write (report files, shift evaluation, push).
"""

import os
from pathlib import Path

from hftl.compare.grid import (
    Cell,
    CompareArgs,
    cell_config,
    check_extra_test_sets,
    grid,
    model_slug,
    parse_compare_config,
    parse_shots,
    run_grid,
    split_list,
    strategy_options,
)
from hftl.log import console, get_logger

logger = get_logger(__name__)

__all__ = [
    "Cell",
    "CompareArgs",
    "cell_config",
    "compare",
    "grid",
    "model_slug",
    "parse_compare_config",
    "parse_shots",
    "run_grid",
    "strategy_options",
]


def compare(argv: list[str] | None = None, defaults: dict | None = None) -> dict:
    """The recipe: parse, run the grid, evaluate under shift, write (and push) the report. Returns the summary."""
    # the report's modules pull in matplotlib and the shift evaluation; a grid's child process needs neither
    from hftl.compare.write import push_report, write_report

    console()
    args, base = parse_compare_config(argv, defaults)
    check_extra_test_sets(args, base)
    run_dirs = run_grid(args, base)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    summary = write_report(args, run_dirs)
    if args.rank and len(split_list(args.models)) > 1:  # how far hftl rank's proxies agree with the real ranking
        from hftl.rank import compare_agreement

        summary["rank"] = compare_agreement(args, base, summary["leaderboard"])
    if args.push_report:
        logger.info(f"report pushed: {push_report(Path(args.report_dir) / 'report', args.push_report)}")
    return summary

r"""Choosing how to transfer: backbones × strategies × label budgets × seeds, then a report with plots.

Usage:
    accelerate launch recipes/compare.py --config recipes/configs/compare/quickstart.yaml     # offline, minutes
    accelerate launch recipes/compare.py --dataset beans \
        --models google/vit-base-patch16-224-in21k,microsoft/resnet-50 \
        --strategies linear-probe,lora,full --shots 1,5,10,all --seeds 3 --report_dir outputs/compare-beans \
        --budget_seconds 600 --push_report user/beans-transfer-report
    python recipes/compare.py --help           # compare options, then every per-run option

Each cell is a normal hftl run in <report_dir>/runs/<model>__<strategy>__<shots>__seed<k>/ (rerun = resume: finished
cells are skipped); the report (README.md, leaderboard.md/.csv, PNG plots, summary.json) goes to <report_dir>/report/.
The strategy "scratch" (added unless --scratch_baseline false) trains the same architecture from random init.
Shift evaluation: --shift blur,noise,contrast,rotation --shift_severities 1,2,3 --adapt adabn,tent.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl.compare import compare  # noqa: E402

# Grid cells are short: one checkpoint at the end is enough (a cell is the unit of resumption), no trackers.
DEFAULTS = {"report_to": "none", "checkpoint_every_epoch": False}

if __name__ == "__main__":
    compare(defaults=DEFAULTS)

"""Fine-tune a pretrained image classifier.

Usage:
    accelerate launch recipes/classify.py --config recipes/configs/classification/quickstart.yaml
    accelerate launch recipes/classify.py --dataset beans --model google/vit-base-patch16-224-in21k --strategy lora
    accelerate launch --multi_gpu --num_processes 2 recipes/classify.py \
        --config recipes/configs/classification/quickstart.yaml
    python recipes/classify.py --help          # every option, with its default and help text

Options come from a YAML file (--config) and are overridden by flags; see hftl/config.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from hftl.exits import run_or_exit  # noqa: E402
from hftl.runner import run  # noqa: E402

if __name__ == "__main__":
    run_or_exit(run, "classification")

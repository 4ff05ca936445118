"""The output folder's contract: what a run writes where, read back by push, predict, compare and the trainer.

<output_dir>/
    config.json, model.safetensors, preprocessor_config.json   a standard Hugging Face folder (`save_model`)
    all_results.json        metrics, labels, config, hardware: a finished run has one (RESULTS_FILE)
    adapter/                LoRA-family runs: the PEFT adapter, its processor and the fine-tuned config
    checkpoints/checkpoint-<step>/   resumable training state (hftl.trainer)
    test_*.png / test_*.json        the evaluator's artefacts
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hftl.log import get_logger

logger = get_logger(__name__)

RESULTS_FILE = "all_results.json"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / RESULTS_FILE).is_file()


def read_results(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / RESULTS_FILE).read_text())


def write_results(output_dir: str | Path, results: dict) -> None:
    """Atomic: a results file exists only complete, since its presence marks the run finished."""
    path = Path(output_dir) / RESULTS_FILE
    tmp = path.with_name(f".{RESULTS_FILE}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    os.replace(tmp, path)


def save_model(model, processor, base_model: str, merge_lora: bool, out: Path) -> None:
    """A standard Hugging Face folder; LoRA runs also keep the adapter (in `adapter/`), merged by option."""
    out = Path(out)
    model.to(memory_format=torch.contiguous_format)  # trained in channels_last or not, saved in the standard layout
    if hasattr(model, "peft_config") and getattr(model.get_base_model(), "hftl_converted", False):
        # the adapter's base would be the timm classifier, but the detector/decoder around it exists only in this
        # run: an adapter nobody can load is not offered (strategies._wrap_peft refuses --merge_lora false up front)
        logger.warning(
            "LoRA adapter not saved: its base is hftl's conversion of the timm classifier, which no hub holds; "
            "the merged model is the result.",
            main_process_only=False,
        )
        model = model.merge_and_unload()
    elif hasattr(model, "peft_config"):
        for peft_config in model.peft_config.values():
            # record the id the user named, not the local cache path it resolved to
            peft_config.base_model_name_or_path = base_model
        model.save_pretrained(out / ADAPTER_DIR)
        processor.save_pretrained(out / ADAPTER_DIR)
        # PEFT writes no config.json: keep the label names (id2label) the new head was trained with
        model.get_base_model().config.save_pretrained(out / ADAPTER_DIR)
        if not merge_lora:
            return
        model = model.merge_and_unload()
    model.save_pretrained(out)
    processor.save_pretrained(out)

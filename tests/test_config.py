import os
import subprocess
import sys

import pytest

from hftl.config import parse_config
from hftl.tasks import task_args


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5.0e-5\nstrategy: lora\nnum_epochs: 3\nimage_size: 64\n")
    config = parse_config(["--config", str(path), "--num_epochs", "7", "--lora-r", "4"])
    assert config.train.learning_rate == pytest.approx(5e-5)
    assert config.strategy.strategy == "lora"
    assert config.train.num_epochs == 7  # the flag wins over the file
    assert config.strategy.lora_r == 4  # dashed spelling works too
    assert config.data.image_size == 64


def test_float_without_dot_is_rejected_with_the_fix(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 5e-5\n")  # PyYAML reads this as a string
    with pytest.raises(ValueError, match="with a dot"):
        parse_config(["--config", str(path)])


def test_unknown_options_are_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learnin_rate: 0.1\n")
    with pytest.raises(ValueError, match="learnin_rate"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="--not-an-option"):
        parse_config(["--not-an-option", "1"])


def test_bad_strategy_and_push_without_repo():
    with pytest.raises(ValueError, match="gradual-unfreeze"):
        parse_config(["--strategy", "finetune-everything"])
    with pytest.raises(ValueError, match="hub_model_id"):
        parse_config(["--push_to_hub"])
    with pytest.raises(ValueError, match="--logging_steps must be at least 1"):
        parse_config(["--logging_steps", "0"])


def test_every_shipped_config_parses():
    from pathlib import Path

    configs = sorted(Path("recipes/configs").rglob("*.yaml"))
    assert configs, "recipes/configs holds no configs"
    for path in configs:
        text = path.read_text()
        assert text.startswith("#"), f"{path} needs a header comment with its launch command"
        if "compare" in path.parts:
            continue  # compare has its own options (tests/test_compare.py)
        parse_config(["--config", str(path)], task_args=task_args(path.parent.name))


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "recipes/classify.py", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--dataset", "--strategy", "--lora_r", "--layer_decay", "--resume_from_checkpoint", "--shots"):
        assert option in out
    assert "Layer-wise LR decay" in out
    for other_tasks_option in ("--reduce_labels", "--ignore_index", "--mask_palette", "--box_format"):
        assert other_tasks_option not in out  # each task owns its options


def test_task_options_belong_to_their_task(tmp_path):
    config = parse_config(["--box_format", "xyxy"], task_args=task_args("detection"))
    assert config.task.box_format == "xyxy" and config.to_dict()["task"] == {"box_format": "xyxy"}
    config = parse_config(["--reduce_labels", "true", "--ignore_index", "0"], task_args=task_args("segmentation"))
    assert config.task.reduce_labels is True and config.task.ignore_index == 0
    with pytest.raises(ValueError, match="box_format"):
        parse_config(["--box_format", "xyxy"])  # a classification run has no box format
    path = tmp_path / "seg.yaml"
    path.write_text("box_format: xyxy\n")
    with pytest.raises(ValueError, match="box_format"):
        parse_config(["--config", str(path)], task_args=task_args("segmentation"))


def test_results_written_before_options_moved_to_their_task_still_load():
    from hftl.config import RunConfig

    old = parse_config([]).to_dict()
    old["data"] |= {"box_format": "coco", "reduce_labels": None, "ignore_index": 255, "mask_palette": None}
    config = RunConfig.from_dict(old)
    assert config.data.dataset == "hftl/digits" and config.task is None
    detection = parse_config(["--box_format", "xyxy"], task_args=task_args("detection"))
    assert RunConfig.from_dict(detection.to_dict(), task_args("detection")).task.box_format == "xyxy"


def test_choices_are_checked_from_flags_and_from_yaml(tmp_path):
    with pytest.raises(ValueError, match="invalid choice.*cxcywh"):
        parse_config(["--box_format", "xywh"], task_args=task_args("detection"))
    for option, value in (("box_format", "xywh"), ("scheduler", "step"), ("on_bad_image", "ignore")):
        path = tmp_path / "run.yaml"
        path.write_text(f"{option}: {value}\n")
        with pytest.raises(ValueError, match=f"--{option} '{value}': choose one of"):
            parse_config(["--config", str(path)], task_args=task_args("detection"))


def test_default_dataloader_workers_follow_the_hardware():
    from hftl.system import default_num_workers

    assert default_num_workers(gpu=False, cores=64) == 0  # CPU training: the model's threads use every core
    assert default_num_workers(gpu=True, cores=16, local_processes=2) == 7
    assert default_num_workers(gpu=True, cores=96, local_processes=1) == 8
    assert default_num_workers(gpu=True, cores=1, local_processes=1) == 0


_FREED_MEMORY_PROBE = """
import sys, psutil, torch
from hftl.system import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory()
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(200)]
del blocks
print(rss() - before)
"""


def test_cpu_training_keeps_freed_memory_for_the_next_step():
    """200 freed 1 MiB tensors: glibc at its starting thresholds hands them back to the OS, and keeps them (for the
    next training step to reuse without page faults) once `keep_freed_memory` has run. Fresh processes, since the
    setting is global; GLIBC_TUNABLES pins glibc's starting thresholds, which it otherwise raises on its own as
    imports free large blocks (so the default alone sometimes keeps them too)."""
    pinned = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"
    env = {**os.environ, "GLIBC_TUNABLES": pinned}

    def kept_mb(mode: str) -> float:
        command = [sys.executable, "-c", _FREED_MEMORY_PROBE, mode]
        probe = subprocess.run(command, capture_output=True, text=True, env=env)
        assert probe.returncode == 0, probe.stderr
        return float(probe.stdout.split()[-1])

    assert kept_mb("off") < 50
    assert kept_mb("on") > 150


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--image_size", "0", "--image_size must be at least 1 \\(got 0\\)"),
        ("--image_size", "-8", "--image_size must be at least 1 \\(got -8\\)"),
        ("--num_epochs", "0", "--num_epochs must be at least 1"),
        ("--num_epochs", "-1", "--num_epochs must be at least 1"),
        ("--max_steps", "0", "--max_steps must be at least 1"),
        ("--validation_fraction", "1.5", "--validation_fraction must be between 0 and 1"),
        ("--validation_fraction", "0", "--validation_fraction must be between 0 and 1"),
        ("--crop_scale_min", "0", "--crop_scale_min must be in"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_option_and_range(flag, value, message):
    with pytest.raises(ValueError, match=message):
        parse_config([flag, value])


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """getrusage's ru_maxrss keeps the parent's RSS across fork and exec: every child of the scale bench, which holds
    1.4 GB after writing its data, reported ≥ 1.4 GB whatever it used. The parent here holds 1 GB; the child imports
    torch (~0.3-0.5 GB) and must report that."""
    held = b"x" * (1 << 30)
    code = "from hftl.system import peak_rss_mb; print(peak_rss_mb())"
    child_peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 50 < child_peak < 900, child_peak
    assert len(held) == 1 << 30

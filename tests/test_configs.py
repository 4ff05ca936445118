"""Every shipped config (recipes/configs/<task>/*.yaml): its header names the recipe that runs it, with its own path,
and every offline one (bundled data and model) runs through that recipe for 2 steps on a few samples."""

import json
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
RECIPES = {
    "classification": "classify.py",
    "detection": "detect.py",
    "segmentation": "segment.py",
    "compare": "compare.py",
}
SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


def _offline(values: dict) -> bool:
    models = [values.get("model"), *str(values.get("models", "")).split(",")]
    return str(values.get("dataset", "")).startswith("hftl/") and all(m.startswith("hftl/") for m in models if m)


def _launch_command(path: Path) -> list[str]:
    header = [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    commands = [shlex.split(line) for line in header if line.startswith("accelerate launch")]
    assert len(commands) == 1, f"{path}: the header needs exactly one `accelerate launch` line, found {len(commands)}"
    return commands[0]


def test_configs_are_found_in_every_task_folder():
    assert {p.parent.name for p in SHIPPED} == set(RECIPES), SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_header_launches_the_right_recipe_with_this_config(path):
    command = _launch_command(path)
    assert f"recipes/{RECIPES[path.parent.name]}" in command, command
    assert command[command.index("--config") + 1] == str(path.relative_to(REPO)), command
    assert (REPO / "recipes" / RECIPES[path.parent.name]).is_file()


# a few samples, 2 steps, small images: what the config says is exercised, not how well it trains
SMOKE = ["--max_steps", "2", "--max_train_samples", "16", "--max_eval_samples", "8", "--batch_size", "4"]
SMOKE += ["--image_size", "64", "--report_to", "none", "--num_workers", "0", "--checkpoint_every_epoch", "false"]
COMPARE_SMOKE = ["--strategies", "full", "--shots", "all", "--seeds", "1", "--scratch_baseline", "false"]
COMPARE_SMOKE += ["--shift", "blur", "--shift_severities", "1", "--adapt", "adabn", "--shift_cells", "best"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [p for p in SHIPPED if _offline(yaml.safe_load(p.read_text()))],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_offline_config_runs_two_steps_through_its_recipe(path, tmp_path, monkeypatch):
    command = _launch_command(path)
    recipe = REPO / command[command.index("--config") - 1]
    if path.parent.name == "compare":
        argv = [*command[command.index("--config") :], *COMPARE_SMOKE, "--report_dir", str(tmp_path)]
    else:
        argv = [*command[command.index("--config") :], "--output_dir", str(tmp_path), "--overwrite_output_dir", "true"]
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [str(recipe), *argv, *SMOKE])
    runpy.run_path(str(recipe), run_name="__main__")
    results = sorted(tmp_path.rglob("all_results.json"))
    assert results, f"{path}: no finished run under {tmp_path}"
    for result in results:
        values = json.loads(result.read_text())
        assert values["train"]["steps"] == 2
        assert all(v == v for v in values["test"].values() if isinstance(v, float))  # no NaN
    if path.parent.name == "compare":
        assert (tmp_path / "report" / "README.md").is_file()

"""Device code on whatever device the run gets: the CPU here, CUDA under bench/gpu_check.py (`pytest -m device`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hftl.runner import run
from tests.fixtures.data import classification_argv as _argv

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.device
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_saves_full_precision_weights(precision, tiny_vit_dir, colour_folder, tmp_path):
    results = run(
        "classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "out", "--mixed_precision", precision)
    )
    losses = [r["train_loss"] for r in results["history"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert results["test"]["accuracy"] >= 0.9
    from safetensors.torch import load_file

    # autocast computes in half precision; the weights the run saves stay float32
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float32}


@pytest.mark.device
def test_fused_adamw_steps_on_the_runs_device(tiny_vit_dir):
    """The fused AdamW kernel runs where the parameters live (CUDA under gpu_check, the CPU here)."""
    from transformers import AutoModelForImageClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    model(
        pixel_values=torch.randn(2, 3, 32, 32, device=device), labels=torch.tensor([0, 1], device=device)
    ).loss.backward()
    optimizer.step()
    assert all(p.device.type == device for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_the_numbers_to_read_back(tmp_path):
    """bench/gpu_check.py's CPU dry run: every step runs at CPU size and the results carry the headline keys."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry_run", "--results", str(tmp_path / "results")]
        + ["--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = (tmp_path / "results").glob("gpu-*-dry-run.json")
    report = json.loads(result.read_text())
    assert not [name for name, step in report["steps"].items() if "error" in step], report["steps"]
    assert report["steps"]["device tests"]["collected"] >= 8
    assert 0 <= report["quickstart_test_accuracy"] <= 1
    rows = report["steps"]["gpu case"]["rows"]
    assert set(rows) == {"baseline Trainer bf16", "hftl bf16", "hftl bf16 lora"}  # no compile row on the CPU
    assert report["train_ratio"] > 0 and report["lora_memory_ratio"] > 0
    assert "train_ratio" in report and "mfu" in report  # MFU needs a GPU's bf16 peak: None on the CPU
    assert "| train images/s vs Trainer" in result.with_suffix(".md").read_text()

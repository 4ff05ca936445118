"""The `hftl` command: help, push and predict (as subprocesses, the way users run them) against the local Hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.data import COLOURS
from tests.test_hub_push import TRAIN_ARGS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _hftl(*args: str, env: dict | None = None, background: bool = False):
    command = [sys.executable, "-m", "hftl.cli", *args]
    kwargs = dict(
        cwd=REPO_ROOT, env=env or dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if background:
        return subprocess.Popen(command, **kwargs)
    return subprocess.run(command, timeout=120, **kwargs)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_every_subcommand():
    top = _hftl("--help")
    assert top.returncode == 0
    for command in ("train", "predict", "push", "hub", "space"):
        assert command in top.stdout
    hub, space = _hftl("hub", "--help"), _hftl("space", "--help")
    assert "serve" in hub.stdout and "seed" in hub.stdout
    assert "run" in space.stdout and "publish" in space.stdout


def test_push_a_folder_that_is_not_a_run_fails_clearly(tmp_path, capsys):
    from hftl.cli import main

    assert main(["push", str(tmp_path), "someone/model"]) == 1
    assert "not a finished hftl run" in capsys.readouterr().err


@pytest.mark.slow
def test_push_then_predict_by_folder_and_by_repo_id(local_hub, tmp_path, tiny_vit_dir, colour_folder, capsys):
    from hftl.cli import main
    from hftl.runner import run

    out = tmp_path / "run"
    run("classification", ["--dataset", str(colour_folder), "--model", str(tiny_vit_dir), "--output_dir", str(out),
                           *TRAIN_ARGS])  # fmt: skip
    repo_id = local_hub.repo_id("cli-push")
    assert main(["push", str(out), repo_id]) == 0
    assert repo_id in capsys.readouterr().out

    images = [str(sorted((colour_folder / "test" / name).glob("*.png"))[0]) for name in COLOURS]
    # the Hub commands run as subprocesses, side by side (each pays the torch import); the folder one in-process
    offline_env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_TOKEN")}
    offline_env["HF_HOME"] = str(tmp_path / "empty-hf-home")
    processes = {
        "repo": _hftl("predict", "--model", repo_id, *images, "--top-k", "2", background=True),
        "offline": _hftl(
            "predict",
            "--model",
            "someone/not-cached",
            images[0],
            "--endpoint",
            f"http://127.0.0.1:{_closed_port()}",
            env=offline_env,
            background=True,
        ),
    }
    folder_code = main(["predict", "--model", str(out), *images, "--top-k", "1"])
    folder_out = capsys.readouterr().out
    results = {name: _finish(process) for name, process in processes.items()}
    results["folder"] = subprocess.CompletedProcess("predict", folder_code, folder_out, "")

    for name in ("folder", "repo"):
        assert results[name].returncode == 0, results[name].stderr
        lines = results[name].stdout.splitlines()
        for image in images:
            assert f"{image}:" in lines
    # top-k 1: one label line per image; top-k 2: both labels
    folder_labels = [line.split()[0] for line in results["folder"].stdout.splitlines() if line.startswith("  ")]
    assert len(folder_labels) == len(images) and set(folder_labels) <= set(COLOURS)
    repo_labels = [line.split()[0] for line in results["repo"].stdout.splitlines() if line.startswith("  ")]
    assert sorted(repo_labels) == sorted(list(COLOURS) * len(images))

    offline = results["offline"]
    assert offline.returncode == 1
    assert "not reachable" in offline.stderr and "hftl hub serve" in offline.stderr, offline.stderr
    assert "Traceback" not in offline.stderr

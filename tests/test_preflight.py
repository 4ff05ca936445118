"""Fail fast and clear: checks that must run before any data or model work, and how a stopped run ends."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from hftl.runner import run

REPO = Path(__file__).resolve().parents[1]


def _argv(data, model, out, *extra):
    return [
        "--dataset", str(data), "--model", str(model), "--output_dir", str(out), "--num_epochs", "1",
        "--batch_size", "8", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


@pytest.fixture
def unlabelled_folder(tmp_path) -> Path:
    """Images with no class sub-folders: loading it fails, so an error about anything else proves it came first."""
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return folder


@contextmanager
def immutable(path: Path):
    """Root ignores permission bits; the immutable attribute stops even root from writing into a folder."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_output_dir_that_is_a_file_fails_before_the_data(unlabelled_folder, tiny_vit_dir, tmp_path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="--output_dir .*taken is an existing file"):
        run("classification", _argv(unlabelled_folder, tiny_vit_dir, out))
    with pytest.raises(NotADirectoryError, match="cannot be created: .*taken is a file"):
        run("classification", _argv(unlabelled_folder, tiny_vit_dir, out / "run"))


def test_unwritable_output_dir_fails_before_the_data(unlabelled_folder, tiny_vit_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with immutable(locked):
        with pytest.raises(PermissionError, match="--output_dir .*locked cannot be written to"):
            run("classification", _argv(unlabelled_folder, tiny_vit_dir, locked))
        with pytest.raises(PermissionError, match=r"--output_dir .*locked/a/run cannot be created \(in .*locked\)"):
            run("classification", _argv(unlabelled_folder, tiny_vit_dir, locked / "a" / "run"))
        assert list(locked.iterdir()) == []  # the probes leave nothing behind
    # a writable one is probed without a trace: a later failure leaves no empty output folder
    with pytest.raises(ValueError, match="no class sub-folders"):
        run("classification", _argv(unlabelled_folder, tiny_vit_dir, tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()


def test_mistyped_model_fails_before_the_data(local_hub, unlabelled_folder, tmp_path):
    with pytest.raises(ValueError, match="'nobody/no-such-model' could not be loaded: no such model on http"):
        run("classification", _argv(unlabelled_folder, "nobody/no-such-model", tmp_path / "out"))


def test_model_folder_without_config_is_named_as_such(unlabelled_folder, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="Model folder .*weights.* has no config.json.*model.safetensors"):
        run("classification", _argv(unlabelled_folder, weights, tmp_path / "out"))


@pytest.mark.parametrize("name", ["nobody/no-such-dataset", "my_imgs"])
def test_unknown_dataset_is_named_in_seconds(local_hub, tiny_vit_dir, tmp_path, name):
    """Neither a folder here nor on the (real, local) Hub: one request, not ~27 s of download retries."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"Dataset '{name}' could not be loaded: no such dataset on http.*folder"):
        run("classification", _argv(name, tiny_vit_dir, tmp_path / "out"))
    assert time.perf_counter() - start < 10


def test_empty_and_unlabelled_folders_say_what_imagefolder_needs(unlabelled_folder, tiny_vit_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files. imagefolder needs one sub-folder per class"):
        run("classification", _argv(empty, tiny_vit_dir, tmp_path / "out"))
    with pytest.raises(ValueError, match="has no class sub-folders.*one sub-folder per class"):
        run("classification", _argv(unlabelled_folder, tiny_vit_dir, tmp_path / "out"))


def _recipe(*argv, launcher=(), **env):
    cmd = [sys.executable, *launcher, str(REPO / "recipes" / "classify.py"), *argv]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)


def test_a_stopped_recipe_ends_with_its_message_and_a_nonzero_code(unlabelled_folder, tiny_vit_dir, tmp_path):
    proc = _recipe(*_argv(unlabelled_folder, tiny_vit_dir, tmp_path / "out"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: Dataset folder '{unlabelled_folder}' has no")


@pytest.mark.slow
def test_under_accelerate_launch_the_message_comes_with_a_hint(unlabelled_folder, tiny_vit_dir, tmp_path):
    launcher = ["-m", "accelerate.commands.launch", "--num_processes", "1"]
    proc = _recipe(*_argv(unlabelled_folder, tiny_vit_dir, tmp_path / "out"), launcher=launcher)
    assert proc.returncode != 0
    ours = proc.stderr.index("error: Dataset folder")
    assert "accelerate launch shows its own traceback after this" in proc.stderr[:ours]
    assert "Traceback" not in proc.stderr[:ours]  # only the launcher's, after the message


@pytest.mark.slow
def test_documented_launch_trains_on_every_core(colour_folder, tiny_vit_dir, tmp_path):
    """`accelerate launch` without --cpu exports OMP_NUM_THREADS=1; hftl gives torch the cores anyway."""
    from hftl.system import cores_per_local_process

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    cmd = [
        *launch,
        str(REPO / "recipes" / "classify.py"),
        *_argv(colour_folder, tiny_vit_dir, out, "--max_steps", "1"),
    ]
    proc = subprocess.run(cmd, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = cores_per_local_process()
    assert f"torch threads: {cores} (cores per local process)" in proc.stdout
    import json

    assert json.loads((out / "all_results.json").read_text())["train"]["torch_threads"] == cores


def test_thread_count_the_user_chose_is_kept():
    code = "from hftl.system import configure_threads; print(*configure_threads({}), sep='|')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def threads(num_threads=None, **extra):
        out = subprocess.run([sys.executable, "-c", code.format(num_threads)], env={**env, **extra},
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return out.strip()

    from hftl.system import cores_per_local_process

    cores = cores_per_local_process()
    launched = {"ACCELERATE_DYNAMO_BACKEND": "no"}
    assert threads(OMP_NUM_THREADS="1", **launched) == f"{cores}|cores per local process"  # accelerate's default
    assert threads(OMP_NUM_THREADS="1") == "1|OMP_NUM_THREADS"  # the user's own
    assert threads(OMP_NUM_THREADS="3", **launched).endswith("|OMP_NUM_THREADS")  # torch may cap it at the cores
    assert threads(1, OMP_NUM_THREADS="1", **launched) == "1|--num_threads"

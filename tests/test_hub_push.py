"""hftl.hub.push / card / seed against the real local Hub server, with runs really trained on tiny models."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.data import COLOURS

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # pushes to the live local Hub on 127.0.0.1

TRAIN_ARGS = [
    "--num_epochs",
    "1",
    "--max_train_samples",
    "16",
    "--max_eval_samples",
    "8",
    "--batch_size",
    "16",
    "--learning_rate",
    "3.0e-3",
    "--report_to",
    "none",
]


def _train(output_dir: Path, model: str, data: Path, *extra: str) -> Path:
    from hftl.runner import run

    run(
        "classification",
        ["--dataset", str(data), "--model", model, "--output_dir", str(output_dir), *TRAIN_ARGS, *extra],
    )
    return output_dir


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_vit_dir, colour_folder) -> Path:
    return _train(tmp_path_factory.mktemp("run-full") / "out", str(tiny_vit_dir), colour_folder, "--strategy", "full")


@pytest.fixture(scope="module")
def pushed_full(local_hub, full_run) -> str:
    from hftl.hub.push import push_run

    repo_id = local_hub.repo_id("full-run")
    url = push_run(full_run, repo_id)
    assert repo_id in url
    return repo_id


def _images(colour_folder: Path) -> dict[str, str]:
    return {name: str(sorted((colour_folder / "test" / name).glob("*.png"))[0]) for name in COLOURS}


def _run_card_snippet(card_text: str, image: str) -> list:
    """Executes the card's 'How to use' Python block as a user would paste it, on a real image."""
    code = re.search(r"## How to use.*?```python\n(.*?)```", card_text, re.S).group(1)
    namespace: dict = {}
    exec(code.replace("image.jpg", image).replace("print(predict(", "result = (predict("), namespace)
    return namespace["result"]


def _all_pushed_text(api, repo_id: str, tmp_path: Path) -> dict[str, str]:
    folder = Path(api.snapshot_download(repo_id, local_dir=tmp_path / "download"))
    return {
        str(p.relative_to(folder)): p.read_bytes().decode("utf-8", "replace")
        for p in folder.rglob("*")
        if p.is_file() and ".cache" not in p.parts
    }


def test_pushed_run_loads_with_pipeline_and_card_holds_test_results(local_hub, pushed_full, full_run, colour_folder):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    from hftl.hub.card import card_metrics

    files = set(local_hub.api().list_repo_files(pushed_full))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"} <= files
    assert {"test_confusion_matrix.png", "test_confusion_matrix.json"} <= files
    assert not any(f.startswith(("checkpoints/", "runs/")) or "tfevents" in f for f in files)

    classifier = pipeline("image-classification", model=pushed_full)
    for image in _images(colour_folder).values():
        predicted = classifier(image, top_k=2)
        assert {p["label"] for p in predicted} == set(COLOURS)

    card = ModelCard.load(pushed_full)
    results = json.loads((full_run / "all_results.json").read_text())
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers"
    assert card.data.eval_results, "the model-index must hold the test results"
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == card_metrics(results)
    assert card.data.eval_results[0].metric_type == results["metric_for_best"]
    for name, value in card_metrics(results).items():
        assert results["test"][name] == value
    assert "](test_confusion_matrix.png)" in card.text
    # the model came from a local folder: no base_model id can be claimed
    assert card.data.base_model is None
    predicted = _run_card_snippet(card.content, _images(colour_folder)["red"])
    assert {p["label"] for p in predicted} <= set(COLOURS)


def test_pushed_files_hold_no_token_or_local_path(local_hub, pushed_full, full_run, tiny_vit_dir, tmp_path):
    texts = _all_pushed_text(local_hub.api(), pushed_full, tmp_path)
    assert "README.md" in texts and "all_results.json" in texts
    forbidden = [local_hub.token, str(full_run), str(tiny_vit_dir), str(full_run.parent.parent), str(Path.home())]
    for name, text in texts.items():
        for secret in forbidden:
            assert secret not in text, f"{secret!r} leaked into pushed file {name}"
    pushed_results = json.loads(texts["all_results.json"])
    assert "output_dir" not in pushed_results["config"]["train"]
    assert pushed_results["model"] == tiny_vit_dir.name


def test_pushing_the_same_run_twice_changes_nothing(local_hub, pushed_full, full_run):
    from hftl.hub.push import push_run

    api = local_hub.api()
    files_before = sorted(api.list_repo_files(pushed_full))
    commits_before = [c.commit_id for c in api.list_repo_commits(pushed_full)]
    push_run(full_run, pushed_full)
    assert sorted(api.list_repo_files(pushed_full)) == files_before
    # the client drops unchanged files; an empty commit is skipped altogether
    assert [c.commit_id for c in api.list_repo_commits(pushed_full)] == commits_before


def test_push_to_a_new_branch(local_hub, pushed_full, full_run):
    from hftl.hub.push import push_run

    push_run(full_run, pushed_full, revision="experiment")
    assert "experiment" in [b.name for b in local_hub.api().list_repo_refs(pushed_full).branches]
    assert "README.md" in local_hub.api().list_repo_files(pushed_full, revision="experiment")


def test_bad_token_is_refused_before_anything_is_uploaded(local_hub, full_run, hub_repo_id):
    from hftl.hub.push import PushError, push_run

    with pytest.raises(PushError, match="rejected the token.*Nothing was uploaded"):
        push_run(full_run, hub_repo_id, token="hf_not_a_valid_token")
    assert not local_hub.api().repo_exists(hub_repo_id)


def test_adapter_only_run_pushes_the_adapter_and_loads_through_peft(local_hub, tmp_path, tiny_vit_dir, colour_folder):
    from huggingface_hub import ModelCard

    from hftl.hub.push import push_run
    from hftl.predict import predict

    api = local_hub.api()
    base_id = local_hub.repo_id("tiny-vit-base")
    api.create_repo(base_id)
    api.upload_folder(repo_id=base_id, folder_path=tiny_vit_dir)
    out = _train(tmp_path / "lora", base_id, colour_folder, "--strategy", "lora", "--merge_lora", "false")
    repo_id = local_hub.repo_id("lora-adapter")
    push_run(out, repo_id)

    files = set(api.list_repo_files(repo_id))
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "preprocessor_config.json"} <= files
    assert "model.safetensors" not in files
    card = ModelCard.load(repo_id)
    assert (card.data.library_name, card.data.base_model, card.data.base_model_relation) == (
        "peft",
        base_id,
        "adapter",
    )
    adapter_config = json.loads(Path(api.hf_hub_download(repo_id, "adapter_config.json")).read_text())
    assert adapter_config["base_model_name_or_path"] == base_id

    images = _images(colour_folder)
    predicted = _run_card_snippet(card.content, images["blue"])
    assert {p["label"] for p in predicted} == set(COLOURS)
    for found in predict(repo_id, list(images.values()), top_k=1):
        assert found[0]["label"] in COLOURS


def _failing_hub(data_dir: Path, token: str, fail_commits: dict):
    """A second real server whose commit endpoint answers 500 while fail_commits['remaining'] > 0."""
    import uvicorn
    from fastapi.responses import JSONResponse

    from hftl.hub.server import create_app

    app = create_app(data_dir, token=token, user="hftl-tester")

    @app.middleware("http")
    async def fail_commit(request, call_next):
        if request.method == "POST" and "/commit/" in request.url.path and fail_commits["remaining"] > 0:
            fail_commits["remaining"] -= 1
            fail_commits["seen"] += 1
            return JSONResponse({"error": "injected failure"}, status_code=500)
        return await call_next(request)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


def test_failed_commit_leaves_previous_revision_and_names_the_rerun(local_hub, full_run, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from hftl.hub import push
    from hftl.hub.push import PushError, push_run

    monkeypatch.setattr(push, "BACKOFF_SECONDS", 0.01)
    fail = {"remaining": 0, "seen": 0}
    url, server, thread = _failing_hub(tmp_path / "hub", local_hub.token, fail)
    try:
        api = HfApi(endpoint=url, token=local_hub.token)
        repo_id = "hftl-tester/flaky"
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=b"first version\n", path_in_repo="notes.txt", repo_id=repo_id)
        before = api.repo_info(repo_id).sha

        fail["remaining"] = 100
        with pytest.raises(PushError, match=rf"Nothing was committed.*Rerun: hftl push {re.escape(str(full_run))} "):
            push_run(full_run, repo_id, endpoint=url, retries=3)
        assert fail["seen"] == 3
        assert api.repo_info(repo_id).sha == before
        assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "notes.txt"]

        # a transient failure is retried: two 500s, then the commit goes through
        fail.update(remaining=2, seen=0)
        push_run(full_run, repo_id, endpoint=url, retries=3)
        assert fail["seen"] == 2
        assert "model.safetensors" in api.list_repo_files(repo_id)
    finally:
        server.should_exit = True
        thread.join(10)

    # the server is gone: the push fails before uploading and says what to rerun
    with pytest.raises(PushError, match="Rerun: hftl push"):
        push_run(full_run, repo_id, endpoint=url, retries=2)


def test_seeded_hub_serves_bundled_model_and_digits_by_their_ids(local_hub):
    from datasets import ClassLabel, Image, load_dataset
    from transformers import AutoModelForImageClassification

    from hftl.bundled import load_bundled_dataset
    from hftl.hub.seed import seed_hub

    urls = seed_hub(datasets=["hftl/digits"], log=lambda _: None)
    assert urls == [f"{local_hub.url}/hftl/efficientnet-lite0", f"{local_hub.url}/datasets/hftl/digits"]

    digits = load_dataset("hftl/digits")
    bundled = load_bundled_dataset("hftl/digits")
    assert {split: len(ds) for split, ds in digits.items()} == {split: len(ds) for split, ds in bundled.items()}
    assert isinstance(digits["train"].features["image"], Image)
    assert isinstance(digits["train"].features["label"], ClassLabel)
    assert digits["train"].features["label"].names == [str(d) for d in range(10)]
    assert digits["test"][0]["image"].size == (8, 8)

    model = AutoModelForImageClassification.from_pretrained("hftl/efficientnet-lite0")
    assert model.config.num_labels == 1000
    assert "hftl_bundled.json" not in local_hub.api().list_repo_files("hftl/efficientnet-lite0")

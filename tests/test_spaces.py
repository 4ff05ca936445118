"""Gradio demo Spaces: real apps on 127.0.0.1 driven through gradio_client, publishing to the local Hub, and the
published Space started from its own download (without hftl importable)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from hftl.spaces import TASKS, build_demo, infer_task, load_pipeline, publish_space, render_app
from hftl.spaces.builder import InvalidImage, Predictor, prepare_image
from tests.fixtures.models import PET_LABELS as DETECTION_LABELS

pytestmark = pytest.mark.integration  # Gradio demos served on 127.0.0.1

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model, task, examples=()):
    """The demo launched in this process on a free loopback port, with a client connected to it."""
    demo = build_demo(str(model), task, examples=list(examples))
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def save_image(path: Path, size=(48, 40), mode="RGB", colour=(200, 40, 40)) -> Path:
    Image.new(mode, size, colour if mode != "L" else 120).save(path)
    return path


@pytest.fixture(scope="module")
def classifier(tiny_vit_dir):
    with serving(tiny_vit_dir, "image-classification") as client:
        yield client


def test_thin_apps_are_what_publish_writes():
    for task in TASKS:
        assert (REPO_ROOT / "spaces" / task / "app.py").read_text() == render_app(task), f"regenerate {task}/app.py"


def test_task_is_read_from_the_model(tiny_vit_dir, tiny_detector_dir, tiny_segmenter_dir):
    assert infer_task(str(tiny_vit_dir)) == "image-classification"
    assert infer_task(str(tiny_detector_dir)) == "object-detection"
    assert infer_task(str(tiny_segmenter_dir)) == "image-segmentation"


def test_prepare_image_converts_and_downscales_and_says_so():
    rgba = prepare_image(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))
    assert rgba.image.mode == "RGB" and rgba.image.getpixel((0, 0)) == (255, 255, 255)
    assert "flattened onto white" in rgba.notes[0]
    gray = prepare_image(Image.new("L", (10, 10), 7))
    assert gray.image.mode == "RGB" and "grayscale" in gray.notes[0]
    huge = prepare_image(Image.new("RGB", (8192, 16)))
    assert huge.image.size == (4096, 8) and "Downscaled from 8192x16 to 4096x8" in huge.notes[0]
    assert prepare_image(Image.new("RGB", (30, 20))).notes == []


def test_classification_api_returns_labels_by_name(classifier, tmp_path):
    result, notes = classifier.predict(handle_file(save_image(tmp_path / "red.png")), api_name="/predict")
    names = {c["label"] for c in result["confidences"]}
    assert names == {"blue", "red"} and result["label"] in names
    assert sum(c["confidence"] for c in result["confidences"]) == pytest.approx(1.0, abs=1e-4)
    assert notes == ""
    _, notes = classifier.predict(handle_file(save_image(tmp_path / "gray.png", mode="L")), api_name="/predict")
    assert "grayscale" in notes


def test_bad_input_is_a_clear_note_and_the_app_keeps_serving(classifier, tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not pixels")
    result, notes = classifier.predict(handle_file(not_an_image), api_name="/predict")
    assert notes == "notes.txt is not an image this demo can read. Upload a PNG, JPEG or WebP file."
    assert not result or not result.get("confidences")
    _, notes = classifier.predict(None, api_name="/predict")
    assert notes.startswith("No image: upload one")
    result, _ = classifier.predict(handle_file(save_image(tmp_path / "ok.png")), api_name="/predict")
    assert result["label"] in {"blue", "red"}


def test_each_concurrent_user_gets_only_their_own_message(tiny_vit_dir, tmp_path):
    """Every request of a batch bad (or one good): no user may see another's file name, and a bad file gets the
    same answer alone as batched. Separate clients, like separate browsers, submitting at once."""
    files = {name: tmp_path / name for name in ("corrupt.jpg", "notes.txt", "empty.png", "truncated.png")}
    files["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files["notes.txt"].write_text("shopping list")
    files["empty.png"].write_bytes(b"")
    files["truncated.png"].write_bytes(save_image(tmp_path / "full.png").read_bytes()[:40])
    with serving(tiny_vit_dir, "image-classification") as first:
        alone = {name: first.predict(handle_file(path), api_name="/predict")[1] for name, path in files.items()}
        for name, note in alone.items():
            assert name in note and not any(other in note for other in files if other != name)
        clients = [first] + [Client(first.src, verbose=False) for _ in range(4)]
        for mix in (list(files.items()), [*files.items(), ("good.png", save_image(tmp_path / "good.png"))]):
            jobs = [(name, client.submit(handle_file(path), api_name="/predict")) for (name, path), client in
                    zip(mix, clients)]  # fmt: skip
            for name, job in jobs:
                result, note = job.result(timeout=120)
                if name == "good.png":
                    assert result["label"] in {"blue", "red"} and note == ""
                else:
                    assert note == alone[name]


def test_concurrent_requests_are_served(classifier, tmp_path):
    image = handle_file(save_image(tmp_path / "img.png"))
    jobs = [classifier.submit(image, api_name="/predict") for _ in range(4)]
    assert all(job.result(timeout=60)[0]["label"] in {"blue", "red"} for job in jobs)


def test_one_bad_request_does_not_fail_its_batch(tiny_vit_dir):
    predictor = Predictor(load_pipeline(str(tiny_vit_dir), "image-classification"), "image-classification")
    labels, notes = predictor.classify([Image.new("RGB", (40, 40)), None, InvalidImage("x.bin is not an image")])
    assert set(labels[0]) == {"blue", "red"} and labels[1] is None and labels[2] is None
    assert notes[1].startswith("No image") and notes[2] == "x.bin is not an image"


def test_detection_returns_boxes_above_the_threshold(tiny_detector_dir, tmp_path):
    image = handle_file(save_image(tmp_path / "scene.png", size=(96, 72)))
    with serving(tiny_detector_dir, "object-detection") as client:
        drawn, boxes, notes = client.predict(image, 0.0, api_name="/predict")
        assert boxes and all(b["label"] in DETECTION_LABELS.values() for b in boxes)
        assert all(set(b["box"]) == {"xmin", "ymin", "xmax", "ymax"} and 0 <= b["score"] <= 1 for b in boxes)
        assert Image.open(drawn).size == (96, 72)
        _, none_kept, notes = client.predict(image, 1.0, api_name="/predict")
        assert none_kept == [] and "No objects scored 1.00" in notes


def test_segmentation_returns_an_overlay_of_the_input_size(tiny_segmenter_dir, tmp_path):
    image = handle_file(save_image(tmp_path / "scene.png", size=(90, 60), mode="RGBA", colour=(9, 9, 9, 255)))
    with serving(tiny_segmenter_dir, "image-segmentation") as client:
        overlay, notes = client.predict(image, api_name="/predict")
    assert Image.open(overlay["image"]).size == (90, 60)
    assert overlay["annotations"] and {a["label"] for a in overlay["annotations"]} <= set(DETECTION_LABELS.values())
    assert Image.open(overlay["annotations"][0]["image"]).size == (90, 60)
    assert "flattened onto white" in notes


def test_peft_adapter_is_applied_to_its_base(tiny_vit_dir, tmp_path):
    """An adapter folder (adapter_config.json + head in modules_to_save + fine-tuned config.json) loads on its base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ViTForImageClassification, ViTImageProcessor

    id2label = {0: "ant", 1: "bee", 2: "cow"}
    model = ViTForImageClassification.from_pretrained(
        tiny_vit_dir, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True
    )
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]))
    with torch.no_grad():  # a head that always says "cow", so the test sees the adapter's head was used
        head = model.base_model.model.classifier.modules_to_save["default"]
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    model.peft_config["default"].base_model_name_or_path = str(tiny_vit_dir)
    model.save_pretrained(tmp_path)
    model.base_model.model.config.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    prediction = load_pipeline(str(tmp_path), "image-classification")(Image.new("RGB", (32, 32)))
    assert prediction[0]["label"] == "cow" and prediction[0]["score"] > 0.9


def _model_card(model_id: str) -> str:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    result = EvalResult(task_type="image-classification", dataset_type="colours", dataset_name="colours",
                        dataset_split="test", metric_type="accuracy", metric_value=0.875)  # fmt: skip
    data = ModelCardData(
        model_name=model_id, pipeline_tag="image-classification", license="mit", eval_results=[result]
    )
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n# tiny\n"))


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "config", timeout=2) as response:
                return json.loads(response.read())
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


@pytest.mark.slow
def test_published_space_runs_from_its_own_download(local_hub, tiny_vit_dir, tmp_path):
    from huggingface_hub import SpaceCard, snapshot_download

    api = local_hub.api()
    model_id, space_id = local_hub.repo_id("tiny-classifier"), local_hub.repo_id("tiny-classifier-demo")
    api.create_repo(model_id)
    api.upload_folder(repo_id=model_id, folder_path=tiny_vit_dir)
    api.upload_file(repo_id=model_id, path_or_fileobj=_model_card(model_id).encode(), path_in_repo="README.md")

    url = publish_space(model_id, space_id, token=local_hub.token)  # task from the card's pipeline_tag
    assert url == f"{local_hub.url}/spaces/{space_id}"
    assert len(api.list_repo_commits(space_id, repo_type="space")) == 2  # the repo's first commit + ONE from publish
    space = Path(snapshot_download(space_id, repo_type="space", local_dir=tmp_path / "space"))
    card = SpaceCard.load(space / "README.md").data
    assert card.sdk == "gradio" and card.app_file == "app.py" and card.models == [model_id]
    assert card.sdk_version == __import__("gradio").__version__ and card.license == "mit"
    assert 0 < len(card.short_description) <= 60 and card.emoji and card.colorFrom and card.colorTo
    pins = (space / "requirements.txt").read_text().split()
    assert {p.split("==")[0] for p in pins} >= {"gradio", "transformers", "torch", "pillow"} and "peft" not in str(
        pins
    )
    assert all("==" in p for p in pins)
    assert sorted(p.name for p in (space / "examples").iterdir()) == ["china.jpg", "flower.jpg"]

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_ID", "PYTHONPATH")}
    block_hftl = "import sys, runpy; sys.modules['hftl'] = None; runpy.run_path('app.py', run_name='__main__')"
    process = subprocess.Popen(
        [sys.executable, "-c", block_hftl, "--port", str(port)], cwd=space, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        config = json.dumps(_wait_for(f"http://127.0.0.1:{port}/", process))
        assert "accuracy = 0.875" in config and f"{local_hub.url}/{model_id}" in config
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        result, _ = client.predict(handle_file(space / "examples" / "china.jpg"), api_name="/predict")
        assert result["label"] in {"blue", "red"}
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_publish_refuses_a_local_model_folder(tiny_vit_dir):
    with pytest.raises(ValueError, match="local path"):
        publish_space(str(tiny_vit_dir), "someone/demo")


def test_publish_needs_the_model_on_the_hub(local_hub):
    with pytest.raises(ValueError, match="not found"):
        publish_space(local_hub.repo_id("missing-model"), local_hub.repo_id("space"), token=local_hub.token)

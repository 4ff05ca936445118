"""hftl export: ONNX / OpenVINO exports of every task reload with their runtimes and match PyTorch; int8 keeps
accuracy; LoRA runs export merged; bad options get clear messages; pushes carry the card's Deploy section."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hftl.export import export_model
from hftl.export.convert import UnsupportedModel
from hftl.export.runtime import REPORT_FILE, Session, load_runtime_model
from hftl.runner import run
from hftl.spaces.builder import default_examples

# ONNX Runtime and OpenVINO load their own thread pools into the process: these tests run in a pytest process of
# their own (README's test command), after a SIGSEGV once followed them in one process with the training tests
pytestmark = pytest.mark.export

FAST = {"bench_iters": (3, 1), "threads": 1}


def _argv(data, model, out, *extra):
    return [
        "--dataset", str(data), "--model", str(model), "--output_dir", str(out), "--num_epochs", "1",
        "--batch_size", "8", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


def _photos():
    return [Image.open(path).convert("RGB") for path in default_examples()]


def _torch_logits(folder, images, key="logits"):
    from transformers import AutoImageProcessor, pipeline

    pipe = pipeline("image-classification", model=str(folder))
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return getattr(pipe.model.eval()(pixel_values=pixels), key).numpy(), pixels.numpy()


@pytest.fixture(scope="module")
def lora_run(tiny_vit_dir, colour_folder, tmp_path_factory) -> Path:
    """A LoRA run saved without merged weights, exported at the end of training by the recipe option."""
    out = tmp_path_factory.mktemp("lora-run") / "out"
    argv = _argv(colour_folder, tiny_vit_dir, out, "--strategy", "lora", "--lora_r", "4", "--merge_lora", "false")
    run("classification", argv + ["--export", "onnx", "--learning_rate", "3.0e-2"])
    return out


def test_bad_format_and_options_are_named_before_any_work(tiny_vit_dir, capsys):
    from hftl.cli import main

    with pytest.raises(SystemExit):
        main(["export", str(tiny_vit_dir), "--format", "tflite"])
    assert "'onnx', 'openvino'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="supported: onnx, openvino"):
        export_model(str(tiny_vit_dir), "coreml")
    with pytest.raises(ValueError, match="supported: int8"):
        export_model(str(tiny_vit_dir), "onnx", quantize_mode="int4")


def test_unsupported_architecture_names_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(UnsupportedModel, match="ForImageClassification.*ForObjectDetection.*ForSemanticSegmentation"):
        export_model(str(tmp_path), "onnx")
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "onnx.partial").exists()


def test_recipe_export_of_a_lora_run_is_merged_checked_and_served(lora_run, colour_folder, tiny_vit_dir):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hftl.predict import predict

    folder = lora_run / "onnx"
    report = json.loads((folder / REPORT_FILE).read_text())
    assert report["parity"]["fp32"]["passed"] and report["parity"]["fp32"]["agreement"] == 1.0
    assert report["checked_on"].endswith("test split") and report["accuracy"]["test_images"] == 16
    assert set(report["latency"]) == {"pytorch", "onnx"}
    # the ONNX graph is the merged adapter: same logits as base + adapter, not as the base alone
    images = [Image.open(p).convert("RGB") for p in sorted((colour_folder / "test").rglob("*.png"))][:6]
    pixels = AutoImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    config_dir = lora_run / "adapter"
    base = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    fresh = AutoModelForImageClassification.from_pretrained(
        tiny_vit_dir, config=config_dir / "config.json", ignore_mismatched_sizes=True
    )
    merged = PeftModel.from_pretrained(fresh, config_dir).merge_and_unload().eval()
    with torch.no_grad():
        expected, untrained = merged(pixel_values=pixels).logits.numpy(), base(pixel_values=pixels).logits.numpy()
    got = Session(folder / "model.onnx", "onnx")(pixels.numpy())["logits"]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(got - untrained).max() > 1e-3
    # hftl predict --runtime onnx serves it, with the run's label names
    paths = [str(p) for p in sorted((colour_folder / "test").rglob("*.png"))][:2]
    onnx_top = [found[0]["label"] for found in predict(str(lora_run), paths, runtime="onnx")]
    assert onnx_top == [
        expected_top["label"] for expected_top in [p[0] for p in predict(str(lora_run / "adapter"), paths)]
    ]


@pytest.fixture(scope="module")
def vit_run(tiny_vit_dir, tmp_path_factory) -> Path:
    """A finished-run folder (merged weights, all_results.json without a dataset) exported to ONNX + int8."""
    model = tmp_path_factory.mktemp("vit-run") / "vit"
    shutil.copytree(tiny_vit_dir, model)
    results = {"task": "classification", "pipeline_tag": "image-classification", "model": "tiny", "strategy": "full"}
    (model / "all_results.json").write_text(json.dumps({**results, "labels": ["blue", "red"]}))
    assert export_model(str(model), "onnx", quantize_mode="int8", opset=18, **FAST) == model / "onnx"
    return model


def test_onnx_int8_classification_reloads_with_onnxruntime_and_pipeline(vit_run):
    import onnxruntime
    from transformers import AutoImageProcessor, pipeline

    model, out = vit_run, vit_run / "onnx"
    assert (out / "model_quantized.onnx").is_file()
    photos = _photos()
    expected, pixels = _torch_logits(model, photos)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixel_values": pixels})[0], expected, atol=1e-4)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["opset"] == 18 and "onnx int8" in report["latency"] and "int8" in report["parity"]
    runtime = load_runtime_model(out, quantized=False)
    pipe = pipeline("image-classification", model=runtime, image_processor=AutoImageProcessor.from_pretrained(out))
    reference = pipeline("image-classification", model=str(model))
    for got, want in zip(pipe(photos), reference(photos)):
        assert got[0]["label"] == want[0]["label"] and abs(got[0]["score"] - want[0]["score"]) < 1e-4


def test_openvino_export_of_a_timm_model_reloads_with_openvino(tiny_timm_dir, tmp_path):
    import openvino as ov

    out = export_model(str(tiny_timm_dir), "openvino", out=tmp_path / "ov", **FAST)
    photos = _photos()
    expected, pixels = _torch_logits(tiny_timm_dir, photos)
    compiled = ov.Core().compile_model(str(out / "openvino_model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(pixels)[compiled.output("logits")], expected, atol=1e-4)
    assert json.loads((out / REPORT_FILE).read_text())["parity"]["fp32"]["passed"]


@pytest.mark.slow
def test_detection_and_segmentation_exports_match_pytorch(tmp_path):
    from transformers import (
        DetrConfig,
        DetrForObjectDetection,
        DetrImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
        pipeline,
    )

    torch.manual_seed(0)
    labels = {"id2label": {0: "a", 1: "b"}, "label2id": {"a": 0, "b": 1}}
    det, seg = tmp_path / "det", tmp_path / "seg"
    backbone = {"model_type": "timm_backbone", "backbone": "test_resnet", "out_indices": [-1],
                "features_only": True, "use_pretrained_backbone": False}  # fmt: skip
    DetrForObjectDetection(
        DetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64,
                   decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, **labels)
    ).save_pretrained(det)  # fmt: skip
    DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(det)
    SegformerForSemanticSegmentation(
        SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                        decoder_hidden_size=16, **labels)
    ).save_pretrained(seg)  # fmt: skip
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(seg)

    photos = _photos()  # two aspect ratios: the detection export takes any height and width
    for folder, fmt, task in ((det, "onnx", "object-detection"), (seg, "openvino", "image-segmentation")):
        out = export_model(str(folder), fmt, **FAST)
        report = json.loads((out / REPORT_FILE).read_text())
        assert report["task"] == task and report["parity"]["fp32"]["passed"], report["parity"]
        served = pipeline(task, model=load_runtime_model(out), image_processor=str(out))
        reference = pipeline(task, model=str(folder))
        for got, want in zip(
            served(photos[:1] + [photos[1].resize((48, 80))]), reference(photos[:1] + [photos[1].resize((48, 80))])
        ):
            assert [g["label"] for g in got] == [w["label"] for w in want]
            if task == "object-detection":
                assert all(abs(g["score"] - w["score"]) < 1e-3 for g, w in zip(got, want))


@pytest.mark.slow
def test_bundled_efficientnet_lite0_exports_to_both_formats(effnet_dir, tmp_path):
    photos = _photos()
    expected, pixels = _torch_logits(effnet_dir, photos)
    for fmt in ("onnx", "openvino"):
        out = export_model("hftl/efficientnet-lite0", fmt, out=tmp_path / fmt, **FAST)
        got = load_runtime_model(out)(pixel_values=torch.from_numpy(pixels)).logits.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.slow
def test_int8_keeps_digits_accuracy_within_one_point(effnet_dir, tmp_path):
    """A quickstart-like run (bundled EfficientNet-Lite0 on digits, short), exported int8 through both runtimes."""
    out = tmp_path / "digits"
    run("classification", ["--dataset", "hftl/digits", "--model", "hftl/efficientnet-lite0", "--output_dir",
                           str(out), "--image_size", "32", "--num_epochs", "1", "--batch_size", "32",
                           "--learning_rate", "2.0e-3", "--hflip", "false", "--report_to", "none"])  # fmt: skip
    for fmt in ("onnx", "openvino"):
        report = json.loads((export_model(str(out), fmt, quantize_mode="int8", **FAST) / REPORT_FILE).read_text())
        accuracy = report["accuracy"]
        assert accuracy["test_images"] > 100 and accuracy["pytorch"] > 0.5, accuracy
        assert accuracy[fmt] == pytest.approx(accuracy["pytorch"], abs=0.006), accuracy  # fp32: at most 1 image
        assert accuracy["int8_within_1_point"] and accuracy["int8_drop_points"] <= 1.0, accuracy


def test_push_puts_the_export_in_the_repo_and_the_deploy_section_in_the_card(vit_run, local_hub, hub_repo_id):
    from huggingface_hub import ModelCard

    from hftl.export.deploy import push_export
    from hftl.hub.push import collect_files
    from hftl.predict import predict

    # `--export onnx --push_to_hub` on a recipe: the run's push carries onnx/ and the Deploy section
    files = collect_files(vit_run, hub_repo_id)
    assert {"onnx/model.onnx", "onnx/config.json", f"onnx/{REPORT_FILE}"} <= set(files)
    assert "## Deploy" in files["README.md"].decode()
    # `hftl export --push_to_hub` on its own: uploads onnx/ and rewrites the card's Deploy section, once
    api = local_hub.api()
    api.create_repo(hub_repo_id)
    api.upload_file(
        path_or_fileobj=b"# model\n\n## Training\n\nsteps\n", path_in_repo="README.md", repo_id=hub_repo_id
    )
    for _ in range(2):
        push_export(vit_run / "onnx", hub_repo_id)
    assert "onnx/model.onnx" in api.list_repo_files(hub_repo_id)
    card = str(ModelCard.load(hub_repo_id))
    assert card.count("## Deploy") == 1 and card.index("## Deploy") < card.index("## Training")
    assert "| onnx int8 |" in card and f'snapshot_download("{hub_repo_id}"' in card
    assert predict(hub_repo_id, default_examples()[:1], runtime="onnx")[0][0]["label"] in ("blue", "red")


def test_space_serves_the_export_without_hftl_installed(vit_run, tmp_path):
    """A published Space holds builder.py as hftl_space.py and runtime.py as hftl_runtime.py, and no hftl."""
    import subprocess
    import sys

    from hftl.spaces.publish import BUILDER_FILE, RUNTIME_FILE

    shutil.copy(BUILDER_FILE, tmp_path / "hftl_space.py")
    shutil.copy(RUNTIME_FILE, tmp_path / "hftl_runtime.py")
    code = (
        "import sys; sys.modules['hftl'] = None; import hftl_space; "
        f"pipe = hftl_space.load_pipeline({str(vit_run)!r}, None, runtime='onnx'); "
        f"print(pipe.model.runtime, pipe({default_examples()[0]!r})[0]['label'])"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:][0] == "int8" and done.stdout.split()[-1] in ("blue", "red")

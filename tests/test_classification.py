"""Real training runs on tiny models: every strategy learns, frozen stays frozen, outputs load, resume is exact."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hftl.runner import run
from tests.fixtures.data import classification_argv as _argv
from tests.fixtures.data import launch_two_ranks

REPO = Path(__file__).resolve().parents[1]


def _weights(folder) -> dict:
    return load_file(Path(folder) / "model.safetensors")


@pytest.mark.parametrize("model_fixture", ["tiny_vit_dir", "tiny_resnet_dir"])
def test_full_finetune_learns_and_pipeline_predicts_names(model_fixture, colour_folder, tmp_path, request):
    from transformers import pipeline

    model_dir = request.getfixturevalue(model_fixture)
    results = run("classification", _argv(colour_folder, model_dir, tmp_path / "out"))
    history = results["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert results["test"]["accuracy"] >= 0.9
    assert results["test"]["num_samples"] == 16
    classifier = pipeline("image-classification", model=str(tmp_path / "out"))
    preds = classifier([str(p) for p in sorted((colour_folder / "test" / "red").glob("*.png"))[:4]])
    assert all(p[0]["label"] == "red" for p in preds)
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["test"] == pytest.approx(results["test"])
    assert (tmp_path / "out" / "test_confusion_matrix.png").stat().st_size > 1000
    matrix = json.loads((tmp_path / "out" / "test_confusion_matrix.json").read_text())
    assert sum(map(sum, matrix["matrix"])) == 16


def test_timm_model_through_transformers_wrapper(tiny_timm_dir, colour_folder, tmp_path):
    """timm models train through TimmWrapper and save a folder that pipeline() and timm both understand."""
    import timm
    from transformers import pipeline

    results = run("classification", _argv(colour_folder, tiny_timm_dir, tmp_path / "out", "--num_epochs", "2"))
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and not config.get("model_args")
    labels = {p["label"] for p in pipeline("image-classification", model=str(tmp_path / "out"))(
        str(next((colour_folder / "test" / "red").glob("*.png"))))}  # fmt: skip
    assert labels == {"blue", "red"}
    net = timm.create_model("test_resnet", num_classes=2)
    state = {k.removeprefix("timm_model."): v for k, v in _weights(tmp_path / "out").items()}
    net.load_state_dict(state)  # the weights are plain timm weights under a prefix


def test_linear_probe_keeps_backbone_bit_identical(tiny_resnet_dir, colour_folder, tmp_path):
    argv = _argv(colour_folder, tiny_resnet_dir, tmp_path / "out", "--strategy", "linear-probe", "--num_epochs", "5")
    results = run("classification", argv + ["--learning_rate", "5.0e-2"])
    before, after = _weights(tiny_resnet_dir), _weights(tmp_path / "out")
    body = [k for k in before if not k.startswith("classifier")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    assert not torch.equal(before["classifier.1.weight"], after["classifier.1.weight"])
    assert results["trainable_parameters"] == 16 * 2 + 2
    assert results["test"]["accuracy"] >= 0.9


def test_gradual_unfreeze_thaws_from_the_top(tiny_vit_dir, colour_folder, tmp_path):
    argv = _argv(colour_folder, tiny_vit_dir, tmp_path / "out", "--strategy", "gradual-unfreeze", "--num_epochs", "1")
    first = run("classification", argv + ["--unfreeze_every", "2"])  # one epoch: only the head may move
    head = 32 * 2 + 2  # classifier weight and bias: all that trains in the first phase
    assert first["trainable_parameters"] == head and first["history"][0]["trainable_parameters"] == head
    before, after = _weights(tiny_vit_dir), _weights(tmp_path / "out")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("classifier"))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    out2 = tmp_path / "out2"
    argv = _argv(colour_folder, tiny_vit_dir, out2, "--strategy", "gradual-unfreeze", "--unfreeze_groups", "2")
    results = run("classification", argv + ["--metric_for_best", "loss"])  # eval loss keeps falling: last epoch wins
    after2 = _weights(out2)
    trained = [r["trainable_parameters"] for r in results["history"]]
    assert trained[0] == head and trained[0] < trained[1] < trained[2] == results["total_parameters"]
    # saved files keep the classic ViT key names
    top, bottom = (
        "vit.encoder.layer.1.attention.attention.query.weight",
        "vit.embeddings.patch_embeddings.projection.weight",
    )
    assert not torch.equal(before[top], after2[top])  # thawed by epoch 2
    assert results["test"]["accuracy"] >= 0.9
    assert bottom in before


@pytest.mark.device
def test_lora_adapter_reloads_to_the_same_predictions(tiny_vit_dir, colour_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = tmp_path / "out"
    results = run("classification", _argv(colour_folder, tiny_vit_dir, out, "--strategy", "lora", "--lora_r", "4"))
    assert results["trainable_parameters"] < results["total_parameters"] / 2
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_vit_dir)
    assert "classifier" in adapter_config["modules_to_save"]

    processor = AutoImageProcessor.from_pretrained(out)
    images = [str(p) for p in sorted((colour_folder / "test").rglob("*.png"))]
    from PIL import Image

    pixels = processor([Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
    base = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    with torch.no_grad():
        adapter_logits = PeftModel.from_pretrained(base, out / "adapter").eval()(pixel_values=pixels).logits
        merged_logits = AutoModelForImageClassification.from_pretrained(out).eval()(pixel_values=pixels).logits
    torch.testing.assert_close(adapter_logits, merged_logits, atol=1e-4, rtol=1e-4)
    accuracy = (merged_logits.argmax(-1) == torch.tensor([0 if "/blue/" in p else 1 for p in images])).float().mean()
    assert accuracy.item() == pytest.approx(results["test"]["accuracy"])


def test_layer_decay_gives_lower_rates_to_lower_layers(tiny_vit_dir):
    from transformers import AutoModelForImageClassification

    from hftl.config import StrategyArgs
    from hftl.strategies import apply_strategy
    from hftl.tasks.classification.task import ClassificationTask

    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    adapted = apply_strategy(model, ClassificationTask(), StrategyArgs(strategy="full", layer_decay=0.5), 1.0)
    lr_of = {name: g["lr"] for g in adapted.param_groups for name, _ in g["named_params"]}
    assert lr_of["classifier.weight"] == 1.0
    assert lr_of["vit.layers.1.attention.q_proj.weight"] == 0.5 * lr_of["vit.layernorm.weight"]
    assert lr_of["vit.layers.0.attention.q_proj.weight"] == 0.5 * lr_of["vit.layers.1.attention.q_proj.weight"]
    assert lr_of["vit.embeddings.patch_embeddings.projection.weight"] < lr_of["vit.layers.0.attention.q_proj.weight"]


def test_freeze_lowest_levels_keeps_the_stem_and_first_block_out_of_training(tiny_vit_dir):
    from transformers import AutoModelForImageClassification

    from hftl.config import DataArgs, HubArgs, ModelArgs, RunConfig, StrategyArgs, TrainArgs, validate
    from hftl.strategies import apply_strategy
    from hftl.tasks.classification.task import ClassificationTask

    model = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    adapted = apply_strategy(model, ClassificationTask(), StrategyArgs(strategy="full", freeze_lowest_levels=2), 1.0)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    in_groups = {name for g in adapted.param_groups for name, _ in g["named_params"]}
    assert not grads["vit.embeddings.patch_embeddings.projection.weight"]
    assert not grads["vit.layers.0.attention.q_proj.weight"]
    assert grads["vit.layers.1.attention.q_proj.weight"] and grads["classifier.weight"]
    assert in_groups == {name for name, trains in grads.items() if trains}
    assert adapted.trainable < adapted.total
    with pytest.raises(ValueError, match="--freeze_lowest_levels .* full or gradual-unfreeze"):
        validate(
            RunConfig(
                DataArgs(), ModelArgs(), StrategyArgs(strategy="lora", freeze_lowest_levels=1), TrainArgs(), HubArgs()
            )
        )


@pytest.mark.device
def test_resume_continues_to_the_same_weights(tiny_vit_dir, colour_folder, tmp_path):
    common = ["--checkpointing_steps", "3", "--checkpoints_total_limit", "20", "--num_epochs", "2"]
    full = tmp_path / "uninterrupted"
    expected = run("classification", _argv(colour_folder, tiny_vit_dir, full, *common))["history"]
    checkpoints = sorted((full / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    # 43 train rows / batch 8 = 6 steps an epoch: checkpoint-3 is mid-epoch, checkpoint-6 an epoch boundary
    for name in ("checkpoint-3", "checkpoint-6"):
        assert full / "checkpoints" / name in checkpoints
        resumed = tmp_path / f"resumed-{name}"
        history = run("classification", _argv(colour_folder, tiny_vit_dir, resumed, *common,
                      "--resume_from_checkpoint", str(full / "checkpoints" / name)))["history"]  # fmt: skip
        a, b = _weights(full), _weights(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a), f"resume from {name} diverged"
        # the epoch resumed mid-way records the mean over all its batches, not only those after the resume
        assert [r["train_loss"] for r in history] == [r["train_loss"] for r in expected]


def test_resume_with_changed_settings_is_refused_naming_each(tiny_vit_dir, colour_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hftl")
    out = tmp_path / "out"
    run("classification", _argv(colour_folder, tiny_vit_dir, out, "--num_epochs", "1", "--max_train_samples", "16"))
    resume = ["--num_epochs", "2", "--resume_from_checkpoint", "latest"]
    changed = _argv(colour_folder, tiny_vit_dir, out, *resume, "--batch_size", "4", "--max_train_samples", "12")
    with pytest.raises(
        ValueError, match="batch_size: 8 in the checkpoint, 4 now; train_samples: 16 in the checkpoint, 12"
    ):
        run("classification", changed)
    results = run("classification", changed + ["--ignore_resume_mismatch"])
    assert "despite changed settings" in caplog.text
    assert [r["epoch"] for r in results["history"]] == [1, 2]


def test_latest_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, caplog):
    from hftl.trainer import resolve_checkpoint

    with caplog.at_level(logging.INFO, logger="hftl"):
        assert resolve_checkpoint("latest", str(tmp_path)) is None
    said = caplog.text
    assert "no checkpoint in" in said and "training starts from scratch" in said


def test_latest_ignores_a_half_written_checkpoint(tmp_path):
    from hftl.trainer import STATE_FILE, resolve_checkpoint

    for step, complete in ((4, True), (8, False)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-checkpoint-12").mkdir()
    assert resolve_checkpoint("latest", str(tmp_path)).name == "checkpoint-4"


def test_refuses_to_overwrite_a_finished_run(tiny_vit_dir, colour_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run("classification", _argv(colour_folder, tiny_vit_dir, out))


def test_unknown_model_fails_before_training(local_hub, colour_folder, tmp_path):
    """A mistyped id is named by one metadata request to the (real, local) Hub, before any data or weights load."""
    with pytest.raises(ValueError, match="'nobody/no-such-model' could not be loaded: no such model on http"):
        run("classification", _argv(colour_folder, "nobody/no-such-model", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_hub_model_check_names_the_fix(local_hub, tiny_vit_dir, monkeypatch):
    from hftl.modeling import check_hub_model

    repo_id = local_hub.repo_id("vit")
    local_hub.api().create_repo(repo_id, private=True)
    local_hub.api().upload_folder(repo_id=repo_id, folder_path=str(tiny_vit_dir))
    check_hub_model(repo_id)  # exists, token valid: no error
    with pytest.raises(ValueError, match="has no revision 'nope'"):
        check_hub_model(repo_id, revision="nope")
    monkeypatch.setenv("HF_TOKEN", "not-the-token")
    with pytest.raises(ValueError, match="rejected the Hub token"):
        check_hub_model(repo_id)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="wants a Hub token"):
        check_hub_model(repo_id)
    with socket.socket() as closed:  # a port nobody listens on: no network
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with pytest.raises(ValueError, match="is not reachable.*hftl hub serve"):
        check_hub_model(repo_id, endpoint=endpoint)


@pytest.mark.slow
def test_two_ranks_gather_every_test_image_once(tiny_vit_dir, colour_folder, tmp_path):
    out = tmp_path / "ddp"
    proc = launch_two_ranks(REPO / "recipes" / "classify.py", *_argv(colour_folder, tiny_vit_dir, out))
    results = json.loads((out / "all_results.json").read_text())
    assert "2 process(es)" in results["hardware"]
    # the run's messages are shown once, by the main process, as before (hftl/log.py)
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("test: ") for line in lines) == 1
    assert sum(line.startswith("data: ") for line in lines) == 1
    assert results["test"]["num_samples"] == 16  # 16 test images, none duplicated by the sampler's padding
    assert results["eval"]["num_samples"] == results["num_samples"]["validation"]
    assert results["test"]["accuracy"] >= 0.9


@pytest.mark.slow
def test_quickstart_reaches_97_percent_on_digits_and_round_trips_the_local_hub(tmp_path):
    """The README's second command, end to end: local Hub, bundled ImageNet weights fine-tuned on real digits,
    pushed, pulled back by repo id, predicted."""
    import socket

    from transformers import pipeline

    from hftl.bundled import load_bundled_dataset

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "quickstart"
    env = {**os.environ, "HFTL_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_ENDPOINT")  # the command points the client at its own local Hub
    cmd = [sys.executable, "-m", "hftl.cli", "quickstart", "--port", str(port), "--data-dir", str(tmp_path / "hub")]
    proc = subprocess.run([*cmd, "--output_dir", str(out), "--report_to", "none"], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["test"]["accuracy"] >= 0.97, results["test"]
    assert results["test"]["num_samples"] == 360
    assert "pulled hftl/digits-efficientnet-lite0 back" in proc.stdout
    predicted = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and "\t" in line]
    assert len(predicted) == 5 and set(predicted) <= {str(i) for i in range(10)}, proc.stdout[-2000:]

    classifier = pipeline("image-classification", model=str(out))
    test = load_bundled_dataset("hftl/digits")["test"].select(range(20))
    predictions = classifier([image.convert("RGB") for image in test["image"]])
    names = test.features["label"].names
    correct = sum(p[0]["label"] == names[label] for p, label in zip(predictions, test["label"]))
    assert correct >= 18


def test_timm_checkpoint_gets_the_new_label_names(effnet_dir, tmp_path):
    """TimmWrapperConfig saves `label_names`, not id2label: a fresh head must not keep ImageNet's 1000 names."""
    from transformers import AutoConfig

    from hftl.config import ModelArgs
    from hftl.tasks.classification.task import ClassificationTask

    model, _ = ClassificationTask().load_model(ModelArgs(model=str(effnet_dir)), {0: "cat", 1: "dog", 2: "emu"})
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).id2label == {0: "cat", 1: "dog", 2: "emu"}


@pytest.mark.device
def test_channels_last_is_on_for_convnets_and_changes_only_the_memory_layout(
    tiny_resnet_dir, tiny_vit_dir, colour_folder, tmp_path
):
    from transformers import AutoModelForImageClassification

    from hftl.trainer import wants_channels_last

    resnet = AutoModelForImageClassification.from_pretrained(tiny_resnet_dir)
    vit = AutoModelForImageClassification.from_pretrained(tiny_vit_dir)
    assert wants_channels_last(resnet, None) and not wants_channels_last(vit, None)
    assert not wants_channels_last(resnet, False) and wants_channels_last(vit, True)

    on = run("classification", _argv(colour_folder, tiny_resnet_dir, tmp_path / "on", "--num_epochs", "2"))
    off_argv = _argv(colour_folder, tiny_resnet_dir, tmp_path / "off", "--num_epochs", "2", "--channels_last", "false")
    off = run("classification", off_argv)
    assert on["train"]["channels_last"] and not off["train"]["channels_last"]
    # the same run up to float rounding: kernels differ, the arithmetic does not
    weights_on, weights_off = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert weights_on.keys() == weights_off.keys()
    assert all(torch.allclose(weights_on[k], weights_off[k], atol=1e-4) for k in weights_on)
    assert on["test"]["loss"] == pytest.approx(off["test"]["loss"], abs=1e-4)


def test_lora_runs_are_decided_by_the_seed_not_by_what_ran_before(tiny_vit_dir, colour_folder, tmp_path):
    """LoRA's A matrices and new heads come from the global RNG: the same --seed twice in one process (as in a
    notebook or a grid) must give the same run, another seed another one."""
    lora = ["--num_epochs", "1", "--strategy", "lora"]
    first = _argv(colour_folder, tiny_vit_dir, tmp_path / "first", *lora)
    torch.manual_seed(1234)  # whatever ran earlier in the process
    run("classification", first)
    run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "again", *lora))
    run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "other", *lora, "--seed", "1"))
    a, b, c = (_weights(tmp_path / name) for name in ("first", "again", "other"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.device
def test_gradient_checkpointing_recomputes_to_the_same_training(tiny_vit_dir, colour_folder, tmp_path):
    """Recomputing activations in the backward pass changes memory, not the arithmetic: LoRA (frozen inputs, so
    non-reentrant checkpointing must still reach the adapters) ends where it ends without it."""
    lora = ["--num_epochs", "2", "--strategy", "lora"]
    plain = run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "plain", *lora))
    recomputed_argv = _argv(colour_folder, tiny_vit_dir, tmp_path / "gc", *lora, "--gradient_checkpointing", "true")
    recomputed = run("classification", recomputed_argv)
    before, plain_w, gc_w = _weights(tiny_vit_dir), _weights(tmp_path / "plain"), _weights(tmp_path / "gc")
    moved = [k for k in plain_w if not k.startswith("classifier") and not torch.equal(before[k], plain_w[k])]
    assert moved  # the adapters trained and were merged into the encoder
    assert all(torch.allclose(plain_w[k], gc_w[k], atol=1e-5) for k in plain_w)
    assert recomputed["test"]["loss"] == pytest.approx(plain["test"]["loss"], abs=1e-5)


def test_gradient_checkpointing_refuses_a_model_without_it():
    from hftl.strategies import enable_activation_checkpointing

    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        enable_activation_checkpointing(NoCheckpointing())


def test_tracker_gets_the_running_loss_every_logging_steps(tiny_vit_dir, colour_folder, tmp_path):
    """The loss is summed on the device and read only every --logging_steps steps (a read waits for a GPU)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = _argv(colour_folder, tiny_vit_dir, tmp_path / "out", "--num_epochs", "2", "--logging_steps", "4")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    results = run("classification", argv)
    events = [EventAccumulator(str(f.parent)).Reload() for f in (tmp_path / "out" / "runs").rglob("events.out.*")]
    losses = [e for acc in events if "train/loss" in acc.Tags()["scalars"] for e in acc.Scalars("train/loss")]
    assert [e.step for e in losses] == [4, 8, 12]  # 43 rows / batch 8 = 6 steps an epoch, 12 in all
    assert all(0 < e.value < 2 for e in losses)
    # the step-12 log is epoch 2's running mean over its 6 steps: what the history records for that epoch
    assert losses[-1].value == pytest.approx(results["history"][-1]["train_loss"], rel=1e-5)


@pytest.mark.device
def test_dataloader_workers_train_to_the_same_weights(tiny_vit_dir, colour_folder, tmp_path):
    """GPU machines default to persistent DataLoader workers: augmentation, order and caches must not depend on it."""
    common = ["--num_epochs", "3", "--checkpoint_every_epoch", "false"]
    w0 = run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "w0", *common, "--num_workers", "0"))
    w2 = run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "w2", *common, "--num_workers", "2"))
    # every epoch's loss, not only the saved weights: those may be the best epoch's, which can be the first
    assert [r["train_loss"] for r in w0["history"]] == [r["train_loss"] for r in w2["history"]]
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_macro_metrics_stay_within_range_and_match_torchmetrics():
    """A perfect 10-class run: torchmetrics' float32 macro mean said balanced_accuracy 1.0000001."""
    from types import SimpleNamespace

    from torchmetrics.functional.classification import multiclass_f1_score, multiclass_precision

    from hftl.tasks.classification.task import ClassificationEvaluator

    gather = SimpleNamespace(gather_for_metrics=lambda x: x)
    labels = torch.arange(10).repeat(3)
    perfect = ClassificationEvaluator({i: str(i) for i in range(10)})
    perfect.update(gather, {"labels": labels}, SimpleNamespace(logits=torch.eye(10)[labels]))
    metrics = perfect.compute()
    for name in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert metrics[name] == 1.0, (name, metrics[name])
    preds = torch.tensor([0, 1, 1, 3, 3, 3, 0, 2] * 3)  # class 4 never seen: skipped as torchmetrics does
    labels = torch.tensor([0, 1, 2, 3, 3, 0, 0, 2] * 3)
    mixed = ClassificationEvaluator({i: str(i) for i in range(5)})
    mixed.update(gather, {"labels": labels}, SimpleNamespace(logits=torch.eye(5)[preds]))
    metrics = mixed.compute()
    kwargs = {"num_classes": 5, "average": "macro"}
    assert metrics["f1_macro"] == pytest.approx(multiclass_f1_score(preds, labels, **kwargs).item(), abs=1e-6)
    assert metrics["precision_macro"] == pytest.approx(multiclass_precision(preds, labels, **kwargs).item(), abs=1e-6)

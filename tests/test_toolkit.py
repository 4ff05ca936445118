"""The accuracy toolkit: augmentation policies, random erasing, mixup/cutmix with soft targets, EMA, stochastic
depth, the learning-rate range test and the learning-curve plot, each in a real (tiny) training run."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hftl.config import parse_config
from hftl.lr_find import suggest
from hftl.runner import run
from hftl.toolkit import BatchMixer, drop_path_kwargs
from hftl.trainer import SeededItems, make_loader


def _argv(data, model, out, *extra):
    return [
        "--dataset", str(data), "--model", str(model), "--output_dir", str(out), "--num_epochs", "2",
        "--batch_size", "8", "--learning_rate", "3.0e-3", "--report_to", "none", "--seed", "0", *extra,
    ]  # fmt: skip


TOOLKIT = ["--auto_augment", "trivialaugment", "--random_erasing", "0.5", "--mixup_alpha", "0.4",
           "--cutmix_alpha", "1.0", "--label_smoothing", "0.1", "--ema_decay", "0.9"]  # fmt: skip


def test_mixer_gives_soft_targets_and_keeps_uint8():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for mixer in (BatchMixer(0.4, 0.0, 3), BatchMixer(0.0, 1.0, 3), BatchMixer(0.4, 1.0, 3)):
        out = mixer({"pixel_values": pixels, "labels": labels}, seed=5)
        again = mixer({"pixel_values": pixels, "labels": labels}, seed=5)
        assert torch.equal(out["pixel_values"], again["pixel_values"]) and torch.equal(out["labels"], again["labels"])
        assert out["pixel_values"].dtype == torch.uint8 and out["pixel_values"].shape == pixels.shape
        assert out["labels"].shape == (6, 3) and torch.allclose(out["labels"].sum(1), torch.ones(6))
        assert (out["labels"] < 1).any()  # mixed, not one-hot
    with pytest.raises(ValueError, match="mixup_alpha"):
        BatchMixer(0.0, 0.0, 3)


def test_soft_targets_compose_with_label_smoothing():
    logits = torch.randn(4, 3)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 0.8], [0.5, 0.5, 0.0]])
    smoothed = soft * 0.9 + 0.1 / 3
    expected = -(smoothed * logits.log_softmax(-1)).sum(-1).mean()
    assert F.cross_entropy(logits, soft, label_smoothing=0.1) == pytest.approx(expected.item(), rel=1e-5)


def test_policy_and_erasing_are_seeded_per_item_whatever_the_workers(tiny_vit_dir, colour_folder):
    from hftl.tasks.classification.task import ClassificationTask

    config = parse_config(_argv(colour_folder, tiny_vit_dir, "/tmp/unused", *TOOLKIT))
    task = ClassificationTask(config)
    from hftl.runner import prepare_data

    dsd, spec = prepare_data(task, config)
    names = spec.label_names
    _, processor = task.load_model(config.model, dict(enumerate(names)))
    plain = task.decoded_train_split(
        dsd["train"], processor, parse_config(_argv(colour_folder, tiny_vit_dir, "x")).data
    )
    split = task.decoded_train_split(dsd["train"], processor, config.data)
    collate = task.train_collate(config.data, len(names))
    batches = {}
    for workers in (0, 2):
        items = SeededItems(split, seed=0)
        items.set_epoch(1)
        batches[workers] = list(make_loader(items, collate, 8, False, 0, workers))
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert batches[0][0]["labels"].dtype == torch.float32 and batches[0][0]["labels"].shape[1] == 2
    seeded, unaugmented = SeededItems(split, seed=0), SeededItems(plain, seed=0)
    differs = [not torch.equal(seeded[i]["pixel_values"], unaugmented[i]["pixel_values"]) for i in range(8)]
    assert all(torch.equal(seeded[i]["pixel_values"], seeded[i]["pixel_values"]) for i in range(8))
    assert sum(differs) >= 4  # the policy and erasing change most items beyond the crop


def test_erasing_blanks_a_patch():
    from types import SimpleNamespace

    from torchvision.transforms import v2

    from hftl.toolkit import item_augmentations

    steps = item_augmentations(SimpleNamespace(auto_augment="none", random_erasing=1.0))
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    torch.manual_seed(0)
    erased = v2.Compose(steps)(image)
    assert (erased == 0).any() and (erased == 200).any()


@pytest.mark.slow
def test_toolkit_run_learns_records_ema_and_resumes_exactly(tiny_timm_dir, colour_folder, tmp_path):
    common = [*TOOLKIT, "--drop_path_rate", "0.1", "--checkpointing_steps", "3", "--checkpoints_total_limit", "9"]
    full = tmp_path / "full"
    results = run("classification", _argv(colour_folder, tiny_timm_dir, full, *common))
    history = results["history"]
    assert all("ema_eval_accuracy" in r and "eval_accuracy" in r for r in history)
    weights = results["train"]["weights"]
    best = next(r for r in history if r["epoch"] == results["train"]["best_epoch"])
    key = "ema_eval_accuracy" if weights == "ema" else "eval_accuracy"
    assert results["eval"]["accuracy"] == best[key]
    assert json.loads((full / "all_results.json").read_text())["train"]["weights"] == weights
    assert json.loads((full / "config.json").read_text())["model_args"]["drop_path_rate"] == 0.1
    assert (full / "learning_curves.png").stat().st_size > 5000
    # 48 train rows / batch 8: checkpoint-3 is mid-epoch; EMA, mixup and the policy all resume to the same weights
    resumed = tmp_path / "resumed"
    run("classification", _argv(colour_folder, tiny_timm_dir, resumed, *common,
                                "--resume_from_checkpoint", str(full / "checkpoints" / "checkpoint-3")))  # fmt: skip
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_ema_refuses_a_checkpoint_without_it(tiny_vit_dir, colour_folder, tmp_path):
    out = tmp_path / "out"
    run("classification", _argv(colour_folder, tiny_vit_dir, out, "--num_epochs", "1"))
    checkpoint = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    with pytest.raises(ValueError, match="without --ema_decay"):
        run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "again", "--ema_decay", "0.9",
                                    "--resume_from_checkpoint", str(checkpoint)))  # fmt: skip


def test_drop_path_only_where_the_model_has_it():
    from transformers import ConvNextConfig, TimmWrapperConfig, ViTConfig

    assert drop_path_kwargs(ConvNextConfig(), 0.2) == {"drop_path_rate": 0.2}
    timm_config = TimmWrapperConfig(architecture="resnet18", model_args={"global_pool": "avg"})
    assert drop_path_kwargs(timm_config, 0.2) == {"model_args": {"global_pool": "avg", "drop_path_rate": 0.2}}
    assert drop_path_kwargs(ViTConfig(), None) == {}
    with pytest.raises(ValueError, match="no stochastic depth"):
        drop_path_kwargs(ViTConfig(), 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_path_kwargs(ConvNextConfig(), 1.5)


def test_suggestion_is_the_steepest_descent_before_divergence():
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]
    # flat, steepest fall around 1e-3, minimum near 1e-2, then divergence
    losses = [2.0] * 8 + [1.9, 1.6, 1.0, 0.6, 0.5, 0.45, 0.44, 0.5, 0.9, 3.0, 9.0] + [50.0] * 6
    assert lrs[9] <= suggest(lrs, losses) <= lrs[11]
    assert suggest(lrs[:5], [1.0, 1.1, 1.2, 1.3, 1.4]) == pytest.approx(lrs[0] / 10)


@pytest.mark.slow
def test_learning_rate_auto_runs_the_range_test_then_trains(tiny_vit_dir, colour_folder, tmp_path):
    out = tmp_path / "out"
    results = run(
        "classification", _argv(colour_folder, tiny_vit_dir, out, "--learning_rate", "auto", "--lr_find_steps", "30")
    )
    found = json.loads((out / "lr_find.json").read_text())
    assert results["config"]["train"]["learning_rate"] == found["suggestion"] > 0
    assert (out / "lr_find.png").stat().st_size > 5000
    assert results["history"][-1]["train_loss"] < results["history"][0]["train_loss"]


def test_lr_find_command_restores_the_weights_and_prints_the_rate(tiny_vit_dir, colour_folder, tmp_path, capsys):
    from hftl.cli import main

    assert main(["lr-find", *_argv(colour_folder, tiny_vit_dir, tmp_path / "lr"), "--lr_find_steps", "12"]) == 0
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "lr" / "lr_find.json").read_text())["suggestion"]
    assert not (Path(tmp_path / "lr") / "model.safetensors").exists()


def test_yaml_learning_rate_auto(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: auto\n")
    from hftl.config import is_auto_lr

    assert is_auto_lr(parse_config(["--config", str(path)]).train.learning_rate)
    assert not is_auto_lr(parse_config(["--learning_rate", "0.1"]).train.learning_rate)


def test_card_says_which_weights_were_kept():
    from hftl.hub.card import build_model_card

    results = {"train": {"weights": "ema"}, "config": {"train": {"ema_decay": 0.999}}, "test": {"accuracy": 0.9}}
    card = str(build_model_card(results, "me/m", adapter_only=False, base_model=None, dataset=None))
    assert "the EMA of the weights (decay 0.999), which scored better" in card
    results["train"]["weights"] = "raw"
    card = str(build_model_card(results, "me/m", adapter_only=False, base_model=None, dataset=None))
    assert "raw weights, which scored better" in card


def test_adapter_card_names_hftls_loader_where_peft_alone_fails():
    from hftl.hub.card import build_model_card

    results = {"pipeline_tag": "object-detection", "test": {"map": 0.5}}

    def card(model_type):
        return str(build_model_card(results, "me/m", adapter_only=True, base_model="org/base", dataset=None,
                                    model_type=model_type))  # fmt: skip

    for model_type in ("deformable_detr", "dab-detr", "rt_detr_v2", "d_fine"):
        text = card(model_type)
        assert "model = load_adapter(base, repo).merge_and_unload()" in text and "from peft" not in text
        assert f"`PeftModel.from_pretrained` alone fails for this model family ({model_type}" in text
    text = card("detr")
    assert "model = PeftModel.from_pretrained(base, repo).merge_and_unload()" in text and "load_adapter" not in text

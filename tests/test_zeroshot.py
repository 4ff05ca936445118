"""Zero-shot classifiers from tiny random CLIP, SigLIP and SigLIP 2 dual encoders (hftl/zeroshot.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

NAMES = ["blue", "red", "green", "cat"]
TEMPLATE = "a photo of a {}."


def _images(n: int = 8, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _save_classifier(folder, out, templates=(TEMPLATE,)):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, TimmWrapperImageProcessor

    from hftl.zeroshot import build_classifier

    dual = AutoModel.from_pretrained(folder)
    classifier = build_classifier(
        dual, AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
        dict(enumerate(NAMES)), list(templates),
    )  # fmt: skip
    classifier.save_pretrained(out)
    TimmWrapperImageProcessor(pretrained_cfg=classifier.config.pretrained_cfg).save_pretrained(out)
    return dual, classifier


@pytest.mark.parametrize("fixture", ["tiny_clip_dir", "tiny_siglip_dir"])
def test_zero_shot_classifier_matches_the_zero_shot_pipeline(fixture, request, tmp_path):
    """Same prompts, same model: the saved image-classification model ranks the labels exactly as transformers'
    zero-shot pipeline does, image by image."""
    from transformers import pipeline

    folder = request.getfixturevalue(fixture)
    dual, classifier = _save_classifier(folder, tmp_path / "zs")
    images = _images()
    zero_shot = pipeline("zero-shot-image-classification", model=str(folder))
    classify = pipeline("image-classification", model=str(tmp_path / "zs"))
    for image in images:
        expected = zero_shot(image, candidate_labels=NAMES, hypothesis_template=TEMPLATE)
        got = classify(image, top_k=len(NAMES))
        assert [r["label"] for r in got] == [r["label"] for r in expected]

    # the converted tower computes the dual encoder's image embedding direction
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = dual.get_image_features(pixel_values=pixels)
        reference = getattr(reference, "pooler_output", reference)
        timm_model = classifier.timm_model
        features = timm_model.forward_head(timm_model.forward_features(pixels), pre_logits=True)
        if hasattr(dual, "visual_projection"):
            features = dual.visual_projection(features)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-4)


def test_siglip2_naflex_tower_converts_exactly_for_square_images(tiny_siglip2_dir, tmp_path):
    """SigLIP 2 (NaFlex): its processor patchifies an image into a Linear patch embedding with a position grid
    resized per image. The converted timm ViT takes the same square image as a conv over pixels and gives the same
    image embedding, and the saved classifier ranks labels exactly as the zero-shot pipeline does."""
    from transformers import AutoImageProcessor, TimmWrapperImageProcessor, pipeline

    dual, classifier = _save_classifier(tiny_siglip2_dir, tmp_path / "zs")
    assert classifier.config.pretrained_cfg["input_size"] == [3, 32, 32]  # 4x4 patches of 8: max_num_patches 16
    images = _images(3)
    naflex = AutoImageProcessor.from_pretrained(tiny_siglip2_dir)(images, return_tensors="pt")
    assert naflex["pixel_values"].shape == (3, 16, 8 * 8 * 3) and naflex["pixel_attention_mask"].all()
    timm_processor = TimmWrapperImageProcessor.from_pretrained(tmp_path / "zs")
    pixels = timm_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = dual.get_image_features(**naflex).pooler_output
        timm_model = classifier.timm_model
        features = timm_model.forward_head(timm_model.forward_features(pixels), pre_logits=True)
    torch.testing.assert_close(features, reference, atol=1e-5, rtol=1e-4)

    zero_shot = pipeline("zero-shot-image-classification", model=str(tiny_siglip2_dir))
    classify = pipeline("image-classification", model=str(tmp_path / "zs"))
    for image in _images():
        expected = zero_shot(image, candidate_labels=NAMES, hypothesis_template=TEMPLATE)
        got = classify(image, top_k=len(NAMES))
        assert [r["label"] for r in got] == [r["label"] for r in expected]


def test_vision_text_dual_encoder_with_a_timm_tower(tiny_timm_dual_dir, colour_folder, tmp_path):
    """A VisionTextDualEncoderModel over a timm vision tower (bench/imagenet_dual_encoder.py builds one from the
    bundled ImageNet model) needs no conversion: the classifier's features are the tower's, its projection is folded
    into the head, each image's logits are the dual encoder's own (up to that image's embedding norm, which a linear
    head cannot divide by), the saved folder loads as an image-classification pipeline, and `--strategy zero-shot`
    runs on the dual encoder."""
    from transformers import AutoModel, AutoTokenizer, TimmWrapperImageProcessor, pipeline

    from hftl.runner import run
    from hftl.zeroshot import build_classifier

    dual = AutoModel.from_pretrained(tiny_timm_dual_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_timm_dual_dir)
    classifier = build_classifier(dual, None, tokenizer, dict(enumerate(NAMES)), [TEMPLATE])
    classifier.save_pretrained(tmp_path / "zs")
    processor = TimmWrapperImageProcessor(pretrained_cfg=classifier.config.pretrained_cfg)
    processor.save_pretrained(tmp_path / "zs")
    images = _images()
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    prompts = tokenizer([TEMPLATE.format(n) for n in NAMES], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = dual(pixel_values=pixels, **prompts).logits_per_image
        logits = classifier(pixel_values=pixels).logits
        timm_model = classifier.timm_model
        features = timm_model.forward_head(timm_model.forward_features(pixels), pre_logits=True)
        embeds = dual.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(dual.visual_projection(features), embeds, atol=1e-5, rtol=1e-4)
    ratio = logits / expected
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=0)
    assert torch.equal(logits.argsort(1), expected.argsort(1))
    got = pipeline("image-classification", model=str(tmp_path / "zs"))(images[0], top_k=len(NAMES))
    assert sorted(r["label"] for r in got) == sorted(NAMES)

    results = run(
        "classification", _argv(colour_folder, tiny_timm_dual_dir, tmp_path / "run", "--strategy", "zero-shot")
    )
    assert results["trainable_parameters"] == 0 and "accuracy" in results["test"]


def _argv(data, model, out, *extra):
    return [
        "--dataset", str(data), "--model", str(model), "--output_dir", str(out), "--num_epochs", "2",
        "--batch_size", "8", "--learning_rate", "3.0e-3", "--report_to", "none", "--seed", "0",
        "--prompt_templates", TEMPLATE, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def zero_shot_run(tiny_clip_dir, colour_folder, tmp_path_factory):
    from hftl.runner import run

    out = tmp_path_factory.mktemp("zs") / "out"
    return out, run("classification", _argv(colour_folder, tiny_clip_dir, out, "--strategy", "zero-shot"))


def test_zero_shot_run_is_an_image_classifier_pushed_and_served(
    zero_shot_run, tiny_clip_dir, colour_folder, local_hub
):
    """No training; the saved folder is a plain image-classification model that agrees with the zero-shot
    pipeline, pushes to the (local) Hub with a card, and is served by the Space's predictor."""
    from huggingface_hub import ModelCard
    from transformers import pipeline

    from hftl.hub.push import push_run
    from hftl.spaces import load_pipeline
    from hftl.spaces.builder import Predictor

    out, results = zero_shot_run
    assert results["trainable_parameters"] == 0 and results["train"]["steps"] == 0
    assert results["history"][0]["epoch"] == 0 and "eval_accuracy" in results["history"][0]
    images = sorted((colour_folder / "test").glob("*/*.png"))
    zero_shot = pipeline("zero-shot-image-classification", model=str(tiny_clip_dir))
    classify = pipeline("image-classification", model=str(out))
    expected = [zero_shot(str(p), candidate_labels=["blue", "red"], hypothesis_template=TEMPLATE)[0] for p in images]
    got = [classify(str(p))[0] for p in images]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    accuracy = sum(g["label"] == p.parent.name for g, p in zip(got, images)) / len(images)
    assert results["test"]["accuracy"] == pytest.approx(accuracy)

    repo_id = local_hub.repo_id("zero-shot-clip")
    push_run(out, repo_id)
    assert ModelCard.load(repo_id).data.pipeline_tag == "image-classification"
    predictor = Predictor(load_pipeline(repo_id, "image-classification"), "image-classification")
    labels, _ = predictor.classify([Image.open(images[0])])
    assert max(labels[0], key=labels[0].get) == got[0]["label"]


def test_head_init_text_starts_from_the_zero_shot_head(zero_shot_run, tiny_clip_dir, colour_folder, tmp_path):
    """At learning rate 0 a linear probe from the text head is the zero-shot model: same first evaluation, same
    test metrics (so training from it starts at zero-shot accuracy)."""
    from hftl.runner import run

    _, zero = zero_shot_run
    argv = _argv(colour_folder, tiny_clip_dir, tmp_path / "lp", "--strategy", "linear-probe", "--head_init", "text")
    frozen = run("classification", argv + ["--learning_rate", "0.0", "--weight_decay", "0.0", "--num_epochs", "1"])
    assert frozen["history"][0]["eval_accuracy"] == zero["history"][0]["eval_accuracy"]
    assert frozen["test"]["accuracy"] == zero["test"]["accuracy"]
    assert frozen["test"]["f1_macro"] == zero["test"]["f1_macro"]


def test_wise_ft_ends_are_the_zero_shot_and_fine_tuned_models(zero_shot_run, tiny_clip_dir, colour_folder, tmp_path):
    from safetensors.torch import load_file

    from hftl.runner import run
    from hftl.wiseft import interpolate

    _, zero = zero_shot_run
    argv = _argv(colour_folder, tiny_clip_dir, tmp_path / "ft", "--strategy", "full", "--head_init", "text")
    argv += [
        "--wise_ft_alpha",
        "0,0.5,1",
        "--wise_ft_shift",
        "blur,noise",
        "--wise_ft_eval_datasets",
        str(colour_folder),
    ]
    results = run("classification", argv)
    rows = {row["alpha"]: row for row in results["wise_ft"]["alphas"]}
    # an extra test set (here the same folder, so its test split): every alpha is scored on it too
    assert all(row[f"{colour_folder}_accuracy"] == pytest.approx(row["test_accuracy"]) for row in rows.values())
    assert rows[0.0]["test_accuracy"] == zero["test"]["accuracy"]
    assert rows[1.0]["test_accuracy"] == results["wise_ft"]["fine_tuned_test_accuracy"]
    assert {"blur_accuracy", "noise_accuracy"} <= set(rows[0.5])
    best = max(rows.values(), key=lambda r: r["validation"])
    assert results["wise_ft"]["best_alpha"] == best["alpha"]
    assert results["test"]["accuracy"] == best["test_accuracy"]

    # the formula is exact at both ends, tensor for tensor
    zero_w = load_file(zero_shot_run[0] / "model.safetensors")
    tuned_w = {k: v + 0.1 * torch.randn_like(v) for k, v in zero_w.items()}
    assert all(torch.equal(interpolate(zero_w, tuned_w, 0.0)[k], zero_w[k]) for k in zero_w)
    assert all(torch.equal(interpolate(zero_w, tuned_w, 1.0)[k], tuned_w[k]) for k in zero_w)


def test_bad_zero_shot_options_fail_before_any_work(tiny_vit_dir, colour_folder, tmp_path):
    from hftl.config import parse_config
    from hftl.runner import run

    with pytest.raises(ValueError, match="one \\{\\}"):
        parse_config(["--prompt_templates", "a photo"])
    with pytest.raises(ValueError, match="wise_ft_alpha"):
        parse_config(["--wise_ft_alpha", "0,2"])
    with pytest.raises(ValueError, match="dual encoder"):
        run("classification", _argv(colour_folder, tiny_vit_dir, tmp_path / "o", "--strategy", "zero-shot"))


def test_compare_starts_the_learning_curve_at_zero_shot(tiny_clip_dir, colour_folder, tmp_path):
    """`zero-shot` is a strategy row with one cell per model at shots 0; trained strategies start at 1."""
    import csv

    from hftl.compare import compare, grid, parse_compare_config

    report_dir = tmp_path / "cmp"
    argv = [
        "--dataset", str(colour_folder), "--models", str(tiny_clip_dir), "--strategies", "zero-shot,linear-probe",
        "--shots", "0,2", "--seeds", "2", "--report_dir", str(report_dir), "--isolate", "false", "--shift", "none",
        "--scratch_baseline", "false", "--head_init", "text", "--prompt_templates", TEMPLATE, "--num_epochs", "1",
        "--batch_size", "8", "--report_to", "none", "--checkpoint_every_epoch", "false",
    ]  # fmt: skip
    cells = grid(parse_compare_config(argv)[0])
    assert [(c.strategy, c.shots) for c in cells] == [("zero-shot", 0), ("linear-probe", 2), ("linear-probe", 2)]
    compare(argv)
    with open(report_dir / "report" / "leaderboard.csv") as f:
        rows = {(r["strategy"], r["shots"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("zero-shot", "0"), ("linear-probe", "2")}
    assert float(rows[("zero-shot", "0")]["labels_per_class"]) == 0.0
    assert float(rows[("zero-shot", "0")]["trainable_parameters"]) == 0
    assert (report_dir / "report" / "learning_curves.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="zero-shot point"):
        parse_compare_config(["--strategies", "full", "--shots", "0,1"])


def _other_test_sets(root):
    """A folder whose classes are not the training ones, and one without class folders (so without labels)."""
    other = root / "other-classes"
    for name in ("red", "green"):
        (other / "test" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 40, 40)).save(other / "test" / name / "a.png")
        Image.new("RGB", (32, 32), (40, 200, 40)).save(other / "test" / name / "b.png")
    flat = root / "no-labels"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (40, 40, 200)).save(flat / f"{i}.png")
    return other, flat


def test_bad_wise_ft_eval_datasets_fail_before_the_model_is_built(tiny_clip_dir, colour_folder, tmp_path):
    """A missing, unlabelled or differently labelled extra test set is named in seconds, with the fix, before the
    model is loaded or anything trained (it used to surface after the whole fine-tune)."""
    from hftl.config import parse_config
    from hftl.runner import run

    other, flat = _other_test_sets(tmp_path)
    cases = [(tmp_path / "missing", "not a folder"), (flat, "no class sub-folders"), (other, "missing \\['blue'\\]")]
    for dataset, reason in cases:
        out = tmp_path / f"out-{dataset.name}"
        argv = _argv(colour_folder, tiny_clip_dir, out, "--strategy", "full", "--head_init", "text")
        argv += ["--wise_ft_alpha", "0,1", "--wise_ft_shift", "none", "--wise_ft_eval_datasets", str(dataset)]
        with pytest.raises(ValueError, match=f"--wise_ft_eval_datasets.*{dataset.name}.*{reason}"):
            run("classification", argv)
        assert not out.exists(), "nothing may be trained or written before the extra test sets are checked"
    # options are checked before any data: WiSE-FT starts from the zero-shot model; shifts and extra sets need it
    with pytest.raises(ValueError, match="--head_init text"):
        parse_config(["--wise_ft_alpha", "0,1"])
    with pytest.raises(ValueError, match="--wise_ft_shift: unknown corruption 'blurr'"):
        parse_config(["--wise_ft_alpha", "0,1", "--head_init", "text", "--wise_ft_shift", "blurr"])
    with pytest.raises(ValueError, match="needs --wise_ft_alpha"):
        parse_config(["--wise_ft_eval_datasets", str(colour_folder)])


def test_compare_reports_every_wise_ft_alpha_under_its_shift_evaluation(tiny_clip_dir, colour_folder, tmp_path):
    """compare's --shift and --eval_datasets reach each cell's WiSE-FT: every alpha is reported in-distribution, per
    corruption and per extra test set, in the report's tables; zero-shot cells (nothing to interpolate) run plain.
    A bad --eval_datasets stops the grid before its first cell."""
    from hftl.compare import compare, parse_compare_config

    report_dir = tmp_path / "cmp"
    argv = [
        "--dataset", str(colour_folder), "--models", str(tiny_clip_dir), "--strategies", "zero-shot,linear-probe",
        "--shots", "0,2", "--seeds", "1", "--report_dir", str(report_dir), "--isolate", "false", "--shift", "blur",
        "--shift_severities", "3", "--adapt", "", "--eval_datasets", str(colour_folder), "--scratch_baseline",
        "false", "--head_init", "text", "--prompt_templates", TEMPLATE, "--num_epochs", "1", "--batch_size", "8",
        "--report_to", "none", "--wise_ft_alpha", "0,1", "--learning_rate", "3.0e-2",
    ]  # fmt: skip
    summary = compare(argv)
    rows = {row["alpha"]: row for row in summary["wise_ft"]}
    assert set(rows) == {0.0, 1.0}
    extra = f"{colour_folder}_accuracy"
    for row in rows.values():
        assert row["strategy"] == "linear-probe" and row["shots"] == "2" and row["chosen"] in (0, 1)
        assert {"validation", "test_accuracy", "blur_accuracy", extra} <= set(row)
        assert "noise_accuracy" not in row  # the grid's --shift, not WiSE-FT's own default list
        assert row[extra] == pytest.approx(row["test_accuracy"])  # the same folder's test split
    zero = next(r for r in summary["leaderboard"] if r["strategy"] == "zero-shot")
    assert rows[0.0]["test_accuracy"] == pytest.approx(zero["accuracy_mean"])  # alpha 0 is the zero-shot model
    assert sum(row["chosen"] for row in rows.values()) == 1
    readme = (report_dir / "report" / "README.md").read_text()
    assert "## WiSE-FT" in readme and "| alpha | chosen | validation | test | blur |" in readme
    assert (report_dir / "report" / "wise_ft.csv").is_file()

    other, _ = _other_test_sets(tmp_path)
    bad = [
        a if a != str(colour_folder) or argv[i - 1] != "--eval_datasets" else str(other) for i, a in enumerate(argv)
    ]
    bad[bad.index("--report_dir") + 1] = str(tmp_path / "bad")
    with pytest.raises(ValueError, match="--eval_datasets: extra test set .*other-classes"):
        compare(bad)
    assert not (tmp_path / "bad" / "runs").exists()
    with pytest.raises(ValueError, match="--shift and --eval_datasets: drop --wise_ft_shift"):
        parse_compare_config([*argv, "--wise_ft_shift", "noise"])

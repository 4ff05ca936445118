"""`hftl rank`: LogME against a direct evaluation of its formula, and proxies that order backbones of clearly
different quality on real digits."""

import json

import numpy as np
import pytest

from hftl.rank import agreement, evidence_fixed_point, logme


def _direct_evidence(features, y, alpha, beta):
    """log p(y | F, α, β) / n straight from the definition: A = αI + βFᵀF, m = βA⁻¹Fᵀy."""
    n, d = features.shape
    a = alpha * np.eye(d) + beta * features.T @ features
    m = beta * np.linalg.solve(a, features.T @ y)
    residual = np.sum((features @ m - y) ** 2)
    log_det = np.linalg.slogdet(a)[1]
    value = (
        d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * log_det - beta / 2 * residual
        - alpha / 2 * m @ m - n / 2 * np.log(2 * np.pi)
    )  # fmt: skip
    return value / n, m, a


@pytest.mark.parametrize("shape", [(60, 8), (12, 30)])  # more samples than dimensions, and fewer
def test_logme_is_the_maximised_evidence(shape):
    rng = np.random.default_rng(0)
    n, d = shape
    features = rng.normal(size=(n, d))
    y = (features[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
    u, sigma, _ = np.linalg.svd(features, full_matrices=False)
    value, alpha, beta = evidence_fixed_point(sigma, u.T @ y, float(y @ y), n, d)
    direct, m, a = _direct_evidence(features, y, alpha, beta)
    assert value == pytest.approx(direct, rel=1e-9, abs=1e-9)
    # the fixed point MacKay's updates converge to: α = γ/‖m‖², β = (n − γ)/‖Fm − y‖², γ = d − α tr(A⁻¹)
    gamma = d - alpha * np.trace(np.linalg.inv(a))
    assert alpha == pytest.approx(gamma / (m @ m), rel=1e-5)
    assert beta == pytest.approx((n - gamma) / np.sum((features @ m - y) ** 2), rel=1e-5)
    # and it is a maximum: moving α or β either way lowers the evidence
    for a_scale, b_scale in ((1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2)):
        assert _direct_evidence(features, y, alpha * a_scale, beta * b_scale)[0] < direct


def test_logme_equals_the_evidence_maximised_by_a_generic_optimiser():
    """LogME of fixed 3-class features against an independent computation: the direct evidence formula (no SVD, no
    fixed point) maximised over (log α, log β) by scipy's optimiser, per one-hot class column, averaged."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(3), 15)
    features = np.eye(3)[labels] @ rng.normal(size=(3, 6)) + 0.7 * rng.normal(size=(45, 6))
    per_class = []
    for label in range(3):
        y = (labels == label).astype(float)
        result = minimize(
            lambda x, y=y: -_direct_evidence(features, y, np.exp(x[0]), np.exp(x[1]))[0],
            x0=np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000},
        )  # fmt: skip
        per_class.append(-result.fun)
    assert logme(features, labels) == pytest.approx(np.mean(per_class), rel=1e-7, abs=1e-9)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(200, 3))
    noise = rng.normal(size=(200, 3))
    assert logme(informative, labels) > logme(noise, labels)


def test_agreement_reports_tau_and_top1():
    rows = [
        {"model": "a", "knn_accuracy": 0.9, "logme": 1.0, "linear_probe_accuracy": 0.8},
        {"model": "b", "knn_accuracy": 0.5, "logme": 2.0, "linear_probe_accuracy": 0.7},
        {"model": "c", "knn_accuracy": 0.1, "logme": 0.5, "linear_probe_accuracy": 0.9},
    ]
    result = agreement(rows, {"a": 0.95, "b": 0.6, "c": 0.2})
    assert result["proxies"]["knn_accuracy"] == {"kendall_tau": pytest.approx(1.0), "top1_hit": True}
    assert result["proxies"]["linear_probe_accuracy"]["kendall_tau"] == pytest.approx(-1 / 3)
    assert result["proxies"]["logme"]["top1_hit"] is False


@pytest.fixture(scope="module")
def random_effnet_dir(effnet_dir, tmp_path_factory):
    """The bundled EfficientNet-Lite0's architecture with fresh (timm) initialisation."""
    from transformers import AutoModelForImageClassification

    from hftl.runner import random_init

    folder = tmp_path_factory.mktemp("effnet-random")
    random_init(AutoModelForImageClassification.from_pretrained(effnet_dir), 0).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_rank_orders_pretrained_above_random_above_tiny(effnet_dir, random_effnet_dir, tiny_timm_dir, tmp_path):
    """LogME puts the ImageNet EfficientNet-Lite0 above the same architecture at random init, above a tiny random
    ResNet, on real digits at 64 px. k-NN and the linear probe are reported, not asserted: on 8x8 digits upscaled,
    random convolutional features keep the pixels and score as well as ImageNet features or better (measured at
    32, 64 and 128 px; see the issue's note), which is what the compare recipe's Kendall τ is there to show."""
    from hftl.cli import main

    models = [str(tiny_timm_dir), str(random_effnet_dir), str(effnet_dir)]
    argv = ["rank", "--dataset", "hftl/digits", "--models", ",".join(models), "--rank_dir", str(tmp_path),
            "--image_size", "64", "--max_train_samples", "300", "--max_eval_samples", "120",
            "--hflip", "false"]  # fmt: skip
    assert main(argv) == 0
    rows = json.loads((tmp_path / "rank.json").read_text())
    by_logme = [r["model"] for r in sorted(rows, key=lambda r: -r["logme"])]
    assert by_logme == models[::-1], [(r["model"], r["logme"]) for r in rows]
    for row in rows:
        assert 0.1 < row["knn_accuracy"] <= 1 and 0.1 < row["linear_probe_accuracy"] <= 1
        assert row["train_samples"] == 300 and row["feature_seconds"] > 0
    assert {r["parameters"] for r in rows if r["model"] != str(tiny_timm_dir)} == {3_383_818}
    assert (tmp_path / "rank.md").read_text().count("\n") == 5


def test_compare_reports_each_proxys_agreement(tiny_vit_dir, tiny_resnet_dir, colour_folder, tmp_path):
    from hftl.compare import compare

    report_dir = tmp_path / "cmp"
    argv = [
        "--dataset", str(colour_folder), "--models", f"{tiny_vit_dir},{tiny_resnet_dir}",
        "--strategies", "linear-probe", "--shots", "4", "--seeds", "1", "--scratch_baseline", "false",
        "--shift", "none", "--report_dir", str(report_dir), "--isolate", "false", "--num_epochs", "1",
        "--batch_size", "8", "--report_to", "none", "--checkpoint_every_epoch", "false",
    ]  # fmt: skip
    summary = compare(argv)
    rank = summary["rank"]
    leaderboard = {r["model"]: r["accuracy_mean"] for r in summary["leaderboard"]}
    assert rank["shots"] == "4" and sorted(rank["models"]) == sorted(leaderboard)
    assert rank["fine_tuned_accuracy"] == [leaderboard[m] for m in rank["models"]]
    assert {r["train_samples"] for r in rank["rank"]} == {8}  # the same 4 labels per class the cells trained on
    for proxy in ("knn_accuracy", "logme", "linear_probe_accuracy"):
        assert set(rank["proxies"][proxy]) == {"kendall_tau", "top1_hit"}
    assert "Kendall τ" in (report_dir / "report" / "rank.md").read_text()
    # a rerun reuses the stored proxy scores
    mtime = (report_dir / "rank" / "rank.json").stat().st_mtime_ns
    compare(argv)
    assert (report_dir / "rank" / "rank.json").stat().st_mtime_ns == mtime
    # other data (fewer evaluation rows): scored again, not the stored scores
    compare([*argv, "--max_eval_samples", "6"])
    assert json.loads((report_dir / "rank" / "rank.json").read_text())["key"]["data"]["max_eval_samples"] == 6

"""`hftl rank`: score candidate backbones on your data before fine-tuning any of them.

Each candidate runs once, frozen, over the train and validation splits (the linear-probe feature extraction of
`hftl/features.py`: the head's input, with the evaluation transforms); three proxies then score those features in
seconds:

- k-NN accuracy on the validation split (cosine similarity, majority of the k nearest train features). Large
  studies find this plain score as good a predictor of fine-tuned accuracy as the learned ones, so it leads.
- LogME (You et al., ICML 2021): the log marginal evidence of a Bayesian linear model from features to each one-hot
  label column, maximised over its prior and noise precisions (α, β) by the paper's fixed-point iteration, per
  sample and averaged over classes.
- a quick linear probe: logistic regression on the standardised train features, validation accuracy.

Usage:
    hftl rank --dataset hftl/digits --models hftl/efficientnet-lite0,google/vit-base-patch16-224 --shots 10
    hftl rank --help        # rank options, then every run option (image size, columns, batch size, ...)

Writes <rank_dir>/rank.{json,csv,md}. The compare recipe (`--rank true`, several models) also reports each proxy's
Kendall τ and top-1 hit against the fine-tuned ranking it measured.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from hftl.log import get_logger

logger = get_logger(__name__)

PROXIES = ("knn_accuracy", "logme", "linear_probe_accuracy")
COLUMNS = ["model", *PROXIES, "feature_seconds", "parameters", "imagenet_accuracy", "feature_dim", "train_samples"]


@dataclass
class RankArgs:
    models: str = field(
        default="hftl/efficientnet-lite0", metadata={"help": "Comma-separated candidate models (ids, folders)."}
    )
    rank_dir: str = field(default="outputs/rank", metadata={"help": "Where rank.json / rank.csv / rank.md go."})
    knn_k: int = field(default=10, metadata={"help": "Neighbours for the k-NN proxy (capped by train size)."})


# ---------------------------------------------------------------------------------------------------------------
# LogME


def _evidence_terms(sigma: np.ndarray, z: np.ndarray, y_sq: float, n: int, d: int, alpha: float, beta: float):
    """Posterior mean and evidence of y ~ N(F m, 1/β), m ~ N(0, 1/α) in the SVD basis of F (F = U diag(σ) Vᵀ,
    z = Uᵀ y): returns (‖m‖², ‖F m − y‖², γ, evidence)."""
    s = sigma**2
    m = beta * sigma * z / (alpha + beta * s)  # m in the V basis
    m_sq = float(np.sum(m**2))
    residual = float(np.sum((sigma * m - z) ** 2) + max(y_sq - float(np.sum(z**2)), 0.0))
    gamma = float(np.sum(beta * s / (alpha + beta * s)))
    log_det = float(np.sum(np.log(alpha + beta * s)) + (d - len(s)) * math.log(alpha))
    evidence = (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - 0.5 * log_det
        - beta / 2 * residual
        - alpha / 2 * m_sq
        - n / 2 * math.log(2 * math.pi)
    )
    return m_sq, residual, gamma, evidence


def evidence_fixed_point(
    sigma: np.ndarray, z: np.ndarray, y_sq: float, n: int, d: int, tol: float = 1e-7, max_iter: int = 500
) -> tuple[float, float, float]:
    """MacKay's updates α ← γ/‖m‖², β ← (n − γ)/‖F m − y‖² until α/β settles; returns (evidence / n, α, β)."""
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        m_sq, residual, gamma, _ = _evidence_terms(sigma, z, y_sq, n, d, alpha, beta)
        new_alpha, new_beta = gamma / max(m_sq, 1e-300), (n - gamma) / max(residual, 1e-300)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return _evidence_terms(sigma, z, y_sq, n, d, alpha, beta)[3] / n, alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME of `features` (n × d) for integer `labels`: the mean over classes of the maximised per-sample log
    evidence of a linear model to that class's one-hot column. Higher means more transferable."""
    features = np.asarray(features, dtype=np.float64)
    n, d = features.shape
    u, sigma, _ = np.linalg.svd(features, full_matrices=False)
    scores = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        scores.append(evidence_fixed_point(sigma, u.T @ y, float(y @ y), n, d)[0])
    return float(np.mean(scores))


# ---------------------------------------------------------------------------------------------------------------
# k-NN and linear probe


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels, k: int) -> float:
    """Cosine k-NN, majority vote (ties to the nearest), evaluated in chunks so memory stays at chunk × n_train."""
    k = max(1, min(k, len(train)))
    train = torch.nn.functional.normalize(train.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test), 1024):
        chunk = torch.nn.functional.normalize(test[start : start + 1024].float(), dim=1)
        sims, index = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), classes).scatter_add_(1, train_labels[index], torch.ones_like(sims))
        votes += 1e-3 * torch.nn.functional.one_hot(train_labels[index[:, 0]], classes)  # tie-break: nearest
        correct += (votes.argmax(1) == test_labels[start : start + 1024]).sum().item()
    return correct / len(test)


def linear_probe_accuracy(train, train_labels, test, test_labels, seed: int = 0) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    probe = LogisticRegression(max_iter=500, random_state=seed).fit(scaler.transform(train), train_labels)
    return float(probe.score(scaler.transform(test), test_labels))


# ---------------------------------------------------------------------------------------------------------------
# one candidate


def imagenet_accuracy(model: str) -> float | None:
    """Top-1 ImageNet accuracy from the model card's model-index, when it states one."""
    from huggingface_hub import ModelCard

    from hftl.modeling import resolve_model_path

    try:
        path = Path(resolve_model_path(model))
        card = ModelCard.load(path / "README.md") if path.is_dir() else ModelCard.load(model)
    except Exception:  # no card, or unreachable: the column stays empty
        return None
    for result in card.data.eval_results or []:
        dataset = f"{result.dataset_type} {result.dataset_name}".lower()
        if "imagenet" in dataset and "acc" in str(result.metric_type).lower():
            value = float(result.metric_value)
            return value / 100 if value > 1 else value
    return None


def candidate_features(task, model_name: str, dsd, spec, config, accelerator):
    """(train features, train labels, validation features, validation labels, seconds, parameters)."""
    from hftl.fastpaths.probe_features import extract_head_inputs
    from hftl.trainer import make_loader

    model, processor = task.load_model(replace(config.model, model=model_name), spec.id2label)
    model = model.to(accelerator.device).eval()
    head = model.get_submodule(task.head_modules(model)[0])
    plain = task.prepare(dsd, processor, replace(config.data, augment=False))
    batch = config.train.eval_batch_size or 2 * config.train.batch_size
    started, out = time.perf_counter(), []
    for split in ("train", "validation"):
        loader = make_loader(plain[split], task.collate, batch, False, config.train.seed, config.train.num_workers)
        out += list(extract_head_inputs(model, head, accelerator.prepare(loader), accelerator))
    return (*out, time.perf_counter() - started, sum(p.numel() for p in model.parameters()))


def score_candidate(task, model_name: str, dsd, spec, config, accelerator, knn_k: int) -> dict:
    train, train_labels, val, val_labels, seconds, params = candidate_features(
        task, model_name, dsd, spec, config, accelerator
    )
    return {
        "model": model_name,
        "knn_accuracy": knn_accuracy(train, train_labels, val, val_labels, knn_k),
        "logme": logme(train.numpy(), train_labels.numpy()),
        "linear_probe_accuracy": linear_probe_accuracy(train.numpy(), train_labels.numpy(), val.numpy(), val_labels),
        "feature_seconds": round(seconds, 2),
        "parameters": params,
        "imagenet_accuracy": imagenet_accuracy(model_name),
        "feature_dim": int(train.shape[1]),
        "train_samples": len(train),
    }


def rank_models(models: list[str], config, knn_k: int = 10) -> list[dict]:
    """Every candidate scored on the same data; sorted by k-NN accuracy (then LogME)."""
    from accelerate import Accelerator

    from hftl.runner import prepare_data
    from hftl.tasks import get_task

    task = get_task("classification", config)
    dsd, spec = prepare_data(task, config)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rows = []
    for name in models:
        rows.append(score_candidate(task, name, dsd, spec, config, accelerator, knn_k))
        logger.info(f"rank: {name}: " + "  ".join(f"{p}={rows[-1][p]:.4f}" for p in PROXIES))
    return sorted(rows, key=lambda r: (-r["knn_accuracy"], -r["logme"]))


def markdown_table(rows: list[dict]) -> str:
    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    lines = [
        "| rank | model | k-NN acc | LogME | linear probe acc | features s | params | ImageNet acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(
            f"| {i} | {r['model']} | {r['knn_accuracy']:.3f} | {r['logme']:.3f} | {r['linear_probe_accuracy']:.3f} "
            f"| {r['feature_seconds']:.1f} | {r['parameters'] / 1e6:.2f} M | {fmt(r['imagenet_accuracy'], '.3f')} |"
        )
    return "\n".join(lines)


def write_rank(rows: list[dict], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rank.json").write_text(json.dumps(rows, indent=2))
    with open(folder / "rank.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    (folder / "rank.md").write_text(markdown_table(rows) + "\n")
    return folder / "rank.md"


# ---------------------------------------------------------------------------------------------------------------
# how far to trust the proxies: agreement with the fine-tuned ranking (compare recipe)


def agreement(rows: list[dict], fine_tuned: dict[str, float]) -> dict:
    """Per proxy: Kendall τ between proxy scores and fine-tuned accuracies over the models both have, and whether
    the proxy's top model is the fine-tuned best."""
    from scipy.stats import kendalltau

    models = [r["model"] for r in rows if r["model"] in fine_tuned]
    truth = [fine_tuned[m] for m in models]
    best = max(models, key=fine_tuned.get) if models else None
    out = {}
    for proxy in PROXIES:
        scores = [next(r[proxy] for r in rows if r["model"] == m) for m in models]
        tau = kendalltau(scores, truth).statistic if len(models) > 1 else float("nan")
        out[proxy] = {
            "kendall_tau": None if math.isnan(tau) else float(tau),
            "top1_hit": bool(models) and models[int(np.argmax(scores))] == best,
        }
    return {"models": models, "fine_tuned_accuracy": truth, "proxies": out}


def agreement_markdown(result: dict) -> str:
    lines = ["| proxy | Kendall τ vs fine-tuned | top-1 hit |", "|---|---|---|"]
    for proxy, value in result["proxies"].items():
        tau = "–" if value["kendall_tau"] is None else f"{value['kendall_tau']:.2f}"
        lines.append(f"| {proxy} | {tau} | {'yes' if value['top1_hit'] else 'no'} |")
    return "\n".join(lines)


def parse_rank_config(argv: list[str] | None = None):
    from transformers import HfArgumentParser

    from hftl.config import CONFIG_CLASSES, parse_config

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(RankArgs, allow_abbrev=False)
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nRun options (data, image size, batch size, ...):\n")  # noqa: T201 (--help text, after print_help)
        HfArgumentParser(CONFIG_CLASSES).print_help()
        raise SystemExit(0)
    args, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise ValueError("--models is empty; e.g. --models hftl/efficientnet-lite0,google/vit-base-patch16-224.")
    if args.knn_k < 1:
        raise ValueError("--knn_k must be at least 1.")
    config = parse_config(rest, {"strategy": "linear-probe", "report_to": "none"})
    return args, models, config


def main(argv: list[str] | None = None) -> list[dict]:
    args, models, config = parse_rank_config(argv)
    rows = rank_models(models, config, args.knn_k)
    table = write_rank(rows, args.rank_dir)
    print(markdown_table(rows))  # noqa: T201 (the command's result, on stdout for a pipe)
    logger.info(f"written: {table}")
    return rows


def compare_agreement(args, base, leaderboard: list[dict], knn_k: int = 10) -> dict:
    """The compare recipe's check of the shortcut: proxies on the grid's largest label budget, against each model's
    best fine-tuned test accuracy there (zero-shot and scratch rows excluded). Written to report/rank.{json,md};
    the proxy scores are kept in <report_dir>/rank/ and reused while the models, data and options are unchanged."""
    from copy import deepcopy

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    trained = [r for r in leaderboard if r["strategy"] not in ("scratch", "zero-shot")]
    if not trained:
        return {}
    top = max((r["shots"] for r in trained), key=lambda s: float("inf") if s == "all" else float(s))
    fine_tuned = {}
    for row in (r for r in trained if r["shots"] == top):
        fine_tuned[row["model"]] = max(fine_tuned.get(row["model"], 0.0), row["accuracy_mean"])
    cache = Path(args.report_dir) / "rank" / "rank.json"
    config = deepcopy(base)
    config.data.shots = None if top == "all" else int(top)
    # what the scores depend on: the candidates, the data and its transforms, the model options, the seed
    key = {"models": models, "knn_k": knn_k, "data": vars(config.data), "model": vars(config.model)}
    key = json.loads(json.dumps({**key, "seed": config.train.seed}, default=str))
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        rows = cached["rows"]
    else:
        rows = rank_models(models, config, knn_k)
        write_rank(rows, cache.parent)
        cache.write_text(json.dumps({"key": key, "rows": rows}, indent=2))
    result = {"shots": top, "rank": rows, **agreement(rows, fine_tuned)}
    report = Path(args.report_dir) / "report"
    (report / "rank.json").write_text(json.dumps(result, indent=2))
    (report / "rank.md").write_text(
        f"## Backbone ranking before training (`hftl rank`), shots {top}\n\n{markdown_table(rows)}\n\n"
        f"How far to trust it here: each proxy against the best fine-tuned test accuracy per model\n\n"
        f"{agreement_markdown(result)}\n"
    )
    logger.info(agreement_markdown(result))
    return result

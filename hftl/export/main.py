"""`hftl export MODEL --format onnx|openvino [--quantize int8]`: convert, check against PyTorch, then write.

    from hftl.export import export_model
    export_model("outputs/quickstart", "onnx", quantize="int8")      # → outputs/quickstart/onnx/

The folder is assembled under `<out>.partial` and renamed only once the fp32 parity check passed, so an export
folder that exists is one that was checked. Its export_report.json holds parity, int8 accuracy and latency.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

from hftl.export import check
from hftl.export.convert import (
    DEFAULT_OPSET,
    UnsupportedModel,
    check_architecture,
    quantize,
    supported_text,
    to_onnx,
    to_openvino,
)
from hftl.export.runtime import FORMATS, MODEL_FILES, OUTPUT_NAMES, REPORT_FILE, Session, export_folder
from hftl.log import get_logger

logger = get_logger(__name__)
QUANTIZE = ("int8",)
PARITY_IMAGES = 32
CALIBRATION_IMAGES = 64


class ExportCheckFailed(RuntimeError):
    """The exported model does not reproduce PyTorch within the stated thresholds (the report says by how much)."""


def check_options(fmt: str, quantize_mode: str | None, opset: int) -> None:
    """Cheap checks, before any model is loaded."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; supported: {', '.join(FORMATS)}.")
    if quantize_mode not in (None, *QUANTIZE):
        raise ValueError(f"Unknown --quantize {quantize_mode!r}; supported: {', '.join(QUANTIZE)}.")
    import importlib.util

    needed = {"onnx": ("onnxruntime", "onnxscript"), "openvino": ("openvino",)}[fmt] + (
        ("nncf",) if quantize_mode and fmt == "openvino" else ()
    )
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"Exporting to {fmt} needs {', '.join(missing)}: pip install 'hftl[export]'.")
    if fmt == "onnx" and not 13 <= opset <= 23:
        raise ValueError(f"--opset {opset} is outside what torch's ONNX exporter writes here (13-23).")


def resolve_source(model: str) -> tuple[str, str]:
    """(folder or repo to load, where its run results live): a LoRA run saved without merged weights is loaded from
    its adapter/ folder (merged on load)."""
    from hftl.bundled import resolve_model

    source = resolve_model(model)
    folder = Path(source)
    if folder.is_dir() and not (folder / "config.json").is_file() and (folder / "adapter" / "config.json").is_file():
        return str(folder / "adapter"), source
    return source, source


def default_out(model: str, fmt: str) -> Path:
    """<model folder>/<format>; for a Hub id or bundled name, ./<name>/<format>."""
    if Path(model).is_dir():
        return export_folder(model, fmt)
    return Path(model.rstrip("/").split("/")[-1]) / fmt


def find_images(run: str, task: str, images: list[str] | None) -> check.Images:
    """Given image files; else the run's own test split (and validation images to calibrate int8); else
    scikit-learn's two sample photos."""
    from PIL import Image

    if images:
        loaded = [Image.open(path).convert("RGB") for path in images]
        return check.Images(loaded, loaded, source=f"{len(loaded)} given images")
    data = _run_data(run, task)
    if data is not None:
        return data
    from hftl.spaces.builder import default_examples

    photos = [Image.open(path).convert("RGB") for path in default_examples()]
    logger.warning(
        "No run results with a dataset next to the model: parity is checked on 2 sample photos.",
        main_process_only=False,
    )
    return check.Images(photos, photos, source="scikit-learn sample photos")


def _run_data(run: str, task_tag: str) -> check.Images | None:
    from dataclasses import fields

    from hftl.config import CONFIG_CLASSES, RunConfig
    from hftl.outputs import RESULTS_FILE
    from hftl.predict import read_json
    from hftl.runner import prepare_data
    from hftl.tasks import get_task

    results = read_json(run, RESULTS_FILE) or {}
    stored = results.get("config") or {}
    if not results.get("task") or not stored.get("data"):
        return None
    # field by field rather than RunConfig.from_dict: a results file from another hftl version may hold other keys
    groups = [
        cls(**{f.name: stored[group][f.name] for f in fields(cls) if f.name in (stored.get(group) or {})})
        for group, cls in zip(("data", "model", "strategy", "train", "hub"), CONFIG_CLASSES)
    ]
    config = RunConfig(*groups)
    task = get_task(results["task"], config)
    dsd, spec = prepare_data(task, config)
    test, validation = dsd["test"], dsd["validation"]
    column = spec.image_column
    take = min(PARITY_IMAGES, len(test))
    return check.Images(
        parity=list(test.select(range(take))[column]),
        calibration=list(validation.select(range(min(CALIBRATION_IMAGES, len(validation))))[column]),
        test=test if task_tag == "image-classification" else None,
        image_column=column,
        label_column=spec.label_column,
        source=f"{config.data.dataset} test split",
    )


def export_model(
    model: str,
    fmt: str = "onnx",
    quantize_mode: str | None = None,
    opset: int = DEFAULT_OPSET,
    out: str | Path | None = None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    images: list[str] | None = None,
    bench_iters: tuple[int, int] = (30, 3),
    token: str | None = None,
    threads: int | None = None,
) -> Path:
    """Export, check, write; returns the export folder (and pushes it with its card section when asked)."""
    from hftl.hub.card import is_hub_id
    from hftl.predict import infer_task, load_pipeline, read_json

    check_options(fmt, quantize_mode, opset)
    threads = threads or torch.get_num_threads()
    repo_id = hub_model_id or (model if is_hub_id(model) and not model.startswith("hftl/") else None)
    if push_to_hub and not repo_id:
        raise ValueError(f"--push_to_hub needs --hub_model_id user/name ({model} is not a Hub repo).")
    source, run = resolve_source(model)
    try:
        task = infer_task(source, token)
    except ValueError as error:  # no head the pipelines know
        raise UnsupportedModel(f"{error} hftl export supports {supported_text()}.") from error
    check_architecture(read_json(source, "config.json", token) or {}, task)
    out = Path(out) if out else default_out(model, fmt)
    checks = find_images(run, task, images)

    pipe = load_pipeline(source, task, token)  # adapters are merged here (PEFT merge_and_unload)
    torch_model, processor = pipe.model.eval().float(), pipe.image_processor
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch_model.config.save_pretrained(partial)
    processor.save_pretrained(partial)

    batch = check.pixel_values(processor, checks.parity)
    example = torch.from_numpy(batch[:2])
    logger.info(f"exporting {source} ({task}) to {fmt}", main_process_only=False)
    if fmt == "onnx":
        to_onnx(torch_model, task, example, partial, opset)
    else:
        to_openvino(torch_model, task, example, partial)

    names = OUTPUT_NAMES[task]
    reference = check.torch_outputs(torch_model, names, batch)
    fp32 = Session(partial / MODEL_FILES[fmt][0], fmt, threads)
    parity = {"fp32": check.parity(reference, fp32(batch))}
    parity["fp32"]["passed"] = check.passes(fmt, parity["fp32"])
    sessions = {fmt: fp32}
    if quantize_mode:
        calibration = [check.pixel_values(processor, [image]) for image in checks.calibration]
        sessions[f"{fmt} int8"] = Session(quantize(fmt, partial, calibration), fmt, threads)
        parity["int8"] = check.parity(reference, sessions[f"{fmt} int8"](batch))

    def torch_predict(pixels):
        return check.torch_outputs(torch_model, names, pixels)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # every runtime gets the same cores

    runtimes = {"pytorch": torch_predict, **sessions}
    one, many = batch[:1], check.tile(batch, check.BATCH)
    report = {
        "format": fmt,
        "task": task,
        "model": model if is_hub_id(model) else Path(model).name,
        "architecture": (torch_model.config.architectures or [type(torch_model).__name__])[0],
        "opset": opset if fmt == "onnx" else None,
        "quantize": quantize_mode,
        "files": sorted(p.name for p in partial.iterdir()),
        "input_shape": list(one.shape),
        "checked_on": f"{len(batch)} images from {checks.source}",
        "thresholds": check.THRESHOLDS[fmt],
        "parity": parity,
        "accuracy": _accuracy(runtimes, processor, checks),
        "latency": {name: check.latency(fn, one, many, bench_iters) for name, fn in runtimes.items()},
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads",
    }
    torch.set_num_threads(previous_threads)
    (partial / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if not parity["fp32"]["passed"]:
        raise ExportCheckFailed(
            f"The {fmt} export does not match PyTorch within {check.THRESHOLDS[fmt]}: {parity['fp32']}. "
            f"Nothing was written to {out}; the failed attempt and its report are in {partial}."
        )
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    logger.info(f"export checked and written: {out}", main_process_only=False)
    if push_to_hub:
        from hftl.export.deploy import push_export

        push_export(out, repo_id, token=token)
    return out


def _accuracy(runtimes: dict, processor, checks: check.Images) -> dict | None:
    """Test-split top-1 accuracy per runtime (classification runs), and int8's drop against PyTorch."""
    if checks.test is None:
        return None
    scores = {name: check.accuracy(fn, processor, checks) for name, fn in runtimes.items()}
    result = {"test_images": len(checks.test), **scores}
    for name in [n for n in scores if n.endswith("int8")]:
        result["int8_drop_points"] = round(100 * (scores["pytorch"] - scores[name]), 2)
        result["int8_within_1_point"] = scores["pytorch"] - scores[name] <= check.INT8_MAX_ACCURACY_DROP
        if not result["int8_within_1_point"]:
            logger.warning(
                f"int8 loses {result['int8_drop_points']} points of test accuracy (target <= 1).",
                main_process_only=False,
            )
    return result

"""The model card's "Deploy" section (parity, accuracy and latency from export_report.json, and a load snippet),
and `--push_to_hub`: the export folder goes to the repo's `onnx/` or `openvino/` folder in one commit with the card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hftl.export.runtime import MODEL_FILES, REPORT_FILE

HEADING = "## Deploy"
_SNIPPET = {
    "onnx": """```python
from huggingface_hub import snapshot_download
from transformers import AutoImageProcessor, pipeline
from hftl.export.runtime import load_runtime_model  # or: onnxruntime.InferenceSession(folder + "/{file}")

folder = snapshot_download("{repo}", allow_patterns=["onnx/*"]) + "/onnx"
model = load_runtime_model(folder, "onnx")  # ONNX Runtime behind the transformers model interface
predict = pipeline("{task}", model=model, image_processor=AutoImageProcessor.from_pretrained(folder))
print(predict("image.jpg"))
```""",
    "openvino": """```python
from huggingface_hub import snapshot_download
from transformers import AutoImageProcessor, pipeline
from hftl.export.runtime import load_runtime_model  # or: openvino.Core().compile_model(folder + "/{file}")

folder = snapshot_download("{repo}", allow_patterns=["openvino/*"]) + "/openvino"
model = load_runtime_model(folder, "openvino")
predict = pipeline("{task}", model=model, image_processor=AutoImageProcessor.from_pretrained(folder))
print(predict("image.jpg"))
```""",
}


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.2e}" if isinstance(value, float) and 0 < abs(value) < 1e-3 else f"{value:.{digits}g}"


def deploy_section(reports: list[dict], repo_id: str) -> str:
    """Markdown for one or more export reports (an onnx and an openvino export share the section)."""
    lines = [HEADING, ""]
    for report in reports:
        fmt, task = report["format"], report["task"]
        latency, parity, accuracy = report["latency"], report["parity"], report.get("accuracy") or {}
        torch_ms = latency["pytorch"]["batch1_p50_ms"]
        lines += [
            f"### {fmt} ({report['architecture']}"
            + (f", opset {report['opset']}" if report.get("opset") else "")
            + f"), in `{fmt}/`",
            "",
            f"Checked against PyTorch on {report['checked_on']} (fp32 passes at max relative diff <= "
            f"{report['thresholds']['max_rel_diff']} and arg-max agreement >= {report['thresholds']['agreement']}); "
            f"latency on {report['hardware']}.",
            "",
            "| runtime | max abs diff | top-1 agreement | test accuracy | p50 ms (batch 1) | p95 ms (batch 1) "
            "| img/s (batch 32) | speed-up (batch 1) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, timing in latency.items():
            kind = "int8" if name.endswith("int8") else ("fp32" if name != "pytorch" else None)
            check = parity.get(kind) or {}
            diff = max((v for k, v in check.items() if k.endswith("_max_abs_diff")), default=None)
            lines.append(
                f"| {name} | {_fmt(diff)} | {_fmt(check.get('agreement'))} | {_fmt(accuracy.get(name))} "
                f"| {timing['batch1_p50_ms']:.2f} | {timing['batch1_p95_ms']:.2f} "
                f"| {timing['batch32_images_per_second']:.0f} | {torch_ms / timing['batch1_p50_ms']:.2f}x |"
            )
        file = MODEL_FILES[fmt][1] if report.get("quantize") else MODEL_FILES[fmt][0]
        lines += ["", _SNIPPET[fmt].format(repo=repo_id, task=task, file=file), ""]
        lines += [f"Or: `hftl predict --model {repo_id} --runtime {fmt} image.jpg`.", ""]
    return "\n".join(lines)


def with_deploy(card_text: str, section: str) -> str:
    """The card with its Deploy section replaced (or inserted before "## Training", else appended)."""
    pattern = re.compile(rf"^{HEADING}\n.*?(?=^## (?!#)|\Z)", re.M | re.S)
    if pattern.search(card_text):
        return pattern.sub(lambda _: section + "\n", card_text, count=1)
    if "\n## Training" in card_text:
        return card_text.replace("\n## Training", f"\n{section}\n## Training", 1)
    return card_text.rstrip("\n") + "\n\n" + section + "\n"


def export_reports(folder: str | Path) -> list[dict]:
    """Reports of the exports inside a model folder (<folder>/onnx, <folder>/openvino)."""
    found = []
    for fmt in MODEL_FILES:
        path = Path(folder) / fmt / REPORT_FILE
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def export_files(folder: str | Path) -> dict[str, bytes]:
    """{path in repo: bytes} of the exports inside a model folder, under onnx/ and openvino/."""
    files = {}
    for fmt in MODEL_FILES:
        sub = Path(folder) / fmt
        if (sub / REPORT_FILE).is_file():
            files |= {f"{fmt}/{p.name}": p.read_bytes() for p in sorted(sub.iterdir()) if p.is_file()}
    return files


def push_export(folder: str | Path, repo_id: str, token: str | None = None) -> str:
    """Uploads an export folder to `repo_id/<format>/` and updates the card's Deploy section, in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    folder = Path(folder)
    report = json.loads((folder / REPORT_FILE).read_text())
    fmt = report["format"]
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    try:
        card = str(ModelCard.load(repo_id, token=token))
    except EntryNotFoundError:
        card = f"# {repo_id.split('/')[-1]}\n"
    others = _other_reports(api, repo_id, fmt)
    files = {f"{fmt}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    files |= {name: _scrubbed(data) for name, data in files.items() if name.endswith(".json")}
    files["README.md"] = with_deploy(card, deploy_section(others + [report], repo_id)).encode()
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
    api.create_commit(repo_id, operations, commit_message=f"hftl export: {fmt} (parity-checked)")
    return f"{api.endpoint}/{repo_id}/tree/main/{fmt}"


def _scrubbed(data: bytes) -> bytes:
    from hftl.hub.push import scrub

    return (json.dumps(scrub(json.loads(data)), indent=2) + "\n").encode()


def _other_reports(api, repo_id: str, fmt: str) -> list[dict]:
    """Reports of the repo's other exports, so pushing openvino keeps the onnx rows in the Deploy section."""
    from huggingface_hub import hf_hub_download

    files = set(api.list_repo_files(repo_id))
    return [
        json.loads(Path(hf_hub_download(repo_id, f"{other}/{REPORT_FILE}", token=api.token)).read_text())
        for other in MODEL_FILES
        if other != fmt and f"{other}/{REPORT_FILE}" in files
    ]

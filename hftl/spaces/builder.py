"""The one Gradio demo for every hftl task: classification, detection and segmentation of images.

This module must stay importable on its own (no `hftl` imports at top level): `hftl space publish` copies it into
the Space as `hftl_space.py`, next to a thin `app.py`, because hftl itself is not on PyPI.

Usage (from a checkout with hftl installed):
    python spaces/image-classification/app.py --model user/my-model      # or a local output_dir
    MODEL_ID=user/my-model python spaces/object-detection/app.py --port 7861
In a published Space, `python app.py` reads MODEL_ID, or else the `models:` entry of the README next to it.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

TASKS = ("image-classification", "object-detection", "image-segmentation")
# the transformers auto class that loads a fine-tuned model of each task (hftl's model card names them too)
AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "object-detection": "AutoModelForObjectDetection",
    "image-segmentation": "AutoModelForSemanticSegmentation",
}
MAX_SIDE = 4096  # longer sides are downscaled before inference; the notes say so
MAX_BATCH_SIZE = 8
EXAMPLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#008080"]


# ---- which model, which task ------------------------------------------------------------------------------------


def resolve_model_id(model: str | None = None, app_dir: str | Path | None = None) -> str:
    """The model to serve: the argument, else $MODEL_ID, else the first `models:` entry of app_dir/README.md."""
    if model:
        return model
    if os.environ.get("MODEL_ID"):
        return os.environ["MODEL_ID"]
    readme = Path(app_dir or ".") / "README.md"
    if readme.is_file():
        from huggingface_hub import SpaceCard

        models = SpaceCard.load(readme).data.get("models") or []
        if models:
            return models[0]
    raise SystemExit(
        f"No model given: pass --model <hub id or folder>, set MODEL_ID, or list it under `models:` in {readme}."
    )


def _is_local(model: str) -> bool:
    return Path(model).is_dir()


def _read_json(model: str, filename: str, token=None) -> dict | None:
    """A JSON file of a local folder or Hub repo, or None when the repo has no such file."""
    if _is_local(model):
        path = Path(model) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(model, filename, token=token)).read_text())
    except EntryNotFoundError:
        return None


def _bundled_path(name: str) -> str:
    """hftl's offline bundled models (e.g. hftl/efficientnet-lite0) when hftl is installed; else the name as is."""
    try:
        from hftl.bundled import resolve_model
    except ImportError:
        return name
    return resolve_model(name)


def infer_task(model: str, token=None) -> str:
    """The pipeline task of a model: its card's pipeline_tag, else the head named in config.json."""
    card = _load_card(model, token)
    if card is not None and card.data.get("pipeline_tag") in TASKS:
        return card.data.pipeline_tag
    config = _read_json(model, "config.json", token)
    adapter = _read_json(model, "adapter_config.json", token) if config is None else None
    if adapter is not None:
        return infer_task(_bundled_path(adapter["base_model_name_or_path"]), token)
    for architecture in (config or {}).get("architectures") or []:
        if architecture.endswith("ForImageClassification"):
            return "image-classification"
        if architecture.endswith("ForObjectDetection"):
            return "object-detection"
        if "Segmentation" in architecture:
            return "image-segmentation"
    raise ValueError(
        f"Cannot tell the task of {model}: set pipeline_tag in its README or pass --task ({', '.join(TASKS)})."
    )


# ---- loading ------------------------------------------------------------------------------------------------------


def load_pipeline(model: str, task: str, token=None, runtime: str = "pytorch"):
    """A transformers pipeline on CPU/GPU; a PEFT adapter (adapter_config.json) is applied to its base and merged.
    runtime onnx/openvino serves the model's `hftl export` (its onnx/ or openvino/ folder) on CPU instead."""
    import torch
    from transformers import pipeline

    if runtime != "pytorch":
        try:
            from hftl.export.runtime import load_runtime_pipeline
        except ImportError:  # a published Space: the runtime module sits next to this file
            from hftl_runtime import load_runtime_pipeline
        return load_runtime_pipeline(_bundled_path(model), runtime, task, token)

    device = 0 if torch.cuda.is_available() else -1
    if _read_json(model, "adapter_config.json", token) is not None:
        model_obj, processor = _load_adapter(model, task, token)
        return pipeline(task, model=model_obj, image_processor=processor, device=device)
    return pipeline(task, model=_bundled_path(model), token=token, device=device)


def _load_adapter(model: str, task: str, token=None):
    import transformers
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageSegmentation

    auto_class = getattr(transformers, AUTO_CLASSES[task])
    base = _bundled_path(PeftConfig.from_pretrained(model, token=token).base_model_name_or_path)
    # PEFT saves no config.json; hftl writes the fine-tuned config next to the adapter so its labels survive
    labels = _read_json(model, "config.json", token)
    kwargs = {}
    if labels and labels.get("id2label"):
        id2label = {int(k): v for k, v in labels["id2label"].items()}
        kwargs = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}, "num_labels": len(id2label)}
        kwargs["ignore_mismatched_sizes"] = True  # the adapter's saved head replaces the base's
    architectures = str(AutoConfig.from_pretrained(base).architectures)
    if task == "image-segmentation" and "Universal" in architectures:
        from transformers import AutoModelForUniversalSegmentation as auto_class
    elif task == "image-segmentation" and "Semantic" not in architectures:
        auto_class = AutoModelForImageSegmentation
    base_model = auto_class.from_pretrained(base, token=token, **kwargs)
    try:
        merged = PeftModel.from_pretrained(base_model, model, token=token).merge_and_unload()
    except RuntimeError as error:  # size mismatch: the adapter's head has other classes than the base's
        raise ValueError(
            f"The adapter {model} does not fit {base} ({error}). Save the fine-tuned config.json (with id2label) "
            "next to adapter_config.json."
        ) from error
    has_processor = _read_json(model, "preprocessor_config.json", token) is not None
    processor = AutoImageProcessor.from_pretrained(model if has_processor else base, token=token)
    return merged.eval(), processor


def _load_card(model: str, token=None):
    from huggingface_hub import ModelCard

    try:
        if _is_local(model):
            readme = Path(model) / "README.md"
            return ModelCard.load(readme) if readme.is_file() else None
        return ModelCard.load(model, token=token)
    except Exception:  # a missing or unparsable card only costs the headline; the demo still runs
        return None


def model_header(model: str, task: str, token=None, name: str | None = None) -> str:
    """Markdown: a link back to the model and the card's headline metric (model-index), when it has one."""
    if _is_local(model):
        link = f"`{name or model}`"
    else:
        from huggingface_hub import constants

        link = f"[{model}]({constants.ENDPOINT}/{model})"
    lines = [f"# {task.replace('-', ' ').capitalize()} demo", f"Model: {link}"]
    card = _load_card(model, token)
    results = getattr(card.data, "eval_results", None) if card is not None else None
    if results:
        best = results[0]
        value = best.metric_value
        value = f"{value:.4g}" if isinstance(value, float) else value
        on = f" on {best.dataset_name or best.dataset_type}" + (
            f" ({best.dataset_split})" if best.dataset_split else ""
        )
        lines.append(f"Headline metric: **{best.metric_name or best.metric_type} = {value}**{on}")
    return "\n\n".join(lines)


# ---- input handling -----------------------------------------------------------------------------------------------


def image_input(**kwargs) -> gr.Image:
    """A gr.Image whose preprocessing turns unreadable uploads into a message instead of a decoder stack trace.

    It returns the message rather than raising: preprocessing runs on a whole batch, and one bad upload must not
    fail the other requests batched with it.
    The override is per instance because subclassing a Gradio component makes Gradio write a .pyi stub file."""
    component = gr.Image(type="pil", image_mode=None, **kwargs)
    decode = component.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        name = Path(payload.orig_name or payload.path or "upload").name
        try:
            image = decode(payload)
            image.load()
        except Image.DecompressionBombError as error:
            return InvalidImage(f"{name} is too large to decode safely ({error}). Downscale it and upload again.")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return InvalidImage(f"{name} is not an image this demo can read. Upload a PNG, JPEG or WebP file.")
        return image

    component.preprocess = preprocess
    return component


@dataclass
class InvalidImage:
    message: str


NO_IMAGE = "No image: upload one or click an example."


@dataclass
class PreparedImage:
    image: Image.Image
    notes: list[str] = field(default_factory=list)


def prepare_image(image: Image.Image, max_side: int = MAX_SIDE) -> PreparedImage:
    """RGB, EXIF-upright, long side <= max_side; each change is noted so the UI can say what happened."""
    notes = []
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        image = background
        notes.append("Transparent image: flattened onto white.")
    elif image.mode != "RGB":
        kind = "grayscale" if image.mode in ("L", "I", "I;16", "F", "1") else image.mode
        notes.append(f"Converted from {kind} to RGB.")
        image = image.convert("RGB")
    if max(image.size) > max_side:
        width, height = image.size
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notes.append(f"Downscaled from {width}x{height} to {image.size[0]}x{image.size[1]} (limit {max_side} px).")
    return PreparedImage(image, notes)


def prepare_batch(images: list) -> list[PreparedImage | str]:
    """Each request's prepared image, or the message saying why it has none. Never raises: a gr.Error in a batched
    function is shown to every request of the batch, so one user would read another's file name, and a bad file
    would get an error alone but a note when batched. Each request gets its own message, in its own notes."""
    prepared = []
    for image in images:
        if image is None:
            prepared.append(NO_IMAGE)
        elif isinstance(image, InvalidImage):
            prepared.append(image.message)
        else:
            prepared.append(prepare_image(image))
    return prepared


def _notes(prepared: PreparedImage | str, extra: str = "") -> str:
    if isinstance(prepared, str):
        return prepared
    return " ".join(prepared.notes + ([extra] if extra else []))


# ---- predictions --------------------------------------------------------------------------------------------------


def draw_boxes(image: Image.Image, detections: list[dict]) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    font = ImageFont.load_default(size=max(12, round(max(canvas.size) / 40)))
    labels = sorted({d["label"] for d in detections})
    for d in detections:
        colour = PALETTE[labels.index(d["label"]) % len(PALETTE)]
        box = d["box"]
        xy = (box["xmin"], box["ymin"], box["xmax"], box["ymax"])
        draw.rectangle(xy, outline=colour, width=width)
        text = f"{d['label']} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((xy[0], xy[1]), text, font=font)
        lift = bottom - top + 2 * width
        draw.rectangle((left, top - lift, right + 2 * width, bottom - lift + 2 * width), fill=colour)
        draw.text((xy[0] + width, xy[1] - lift + width), text, fill="white", font=font)
    return canvas


class Predictor:
    """The model, loaded once, behind batched functions with Gradio's calling convention (lists in, lists out).

    A request without a usable image gets empty outputs and the reason in its notes; the rest of its batch runs."""

    def __init__(self, pipe, task: str, top_k: int = 5):
        self.pipe, self.task = pipe, task
        self.top_k = min(top_k, len(pipe.model.config.id2label))
        # hftl writes "instance" or "semantic" for mask-classification models, which could serve either
        self.subtask = getattr(pipe.model.config, "hftl_subtask", None)

    def _infer(self, images: list, **kwargs) -> tuple[list, list]:
        prepared = prepare_batch(images)
        usable = [p.image for p in prepared if not isinstance(p, str)]
        outputs = iter(self.pipe(usable, batch_size=len(usable), **kwargs) if usable else [])
        return prepared, [None if isinstance(p, str) else next(outputs) for p in prepared]

    def classify(self, images: list) -> tuple[list, list]:
        prepared, outputs = self._infer(images, top_k=self.top_k)
        labels = [output and {o["label"]: float(o["score"]) for o in output} for output in outputs]
        return labels, [_notes(p) for p in prepared]

    def detect(self, images: list, thresholds: list) -> tuple[list, list, list]:
        prepared, outputs = self._infer(images, threshold=min(thresholds))
        drawn, found, notes = [], [], []
        for p, output, threshold in zip(prepared, outputs, thresholds):
            kept = [{**d, "score": float(d["score"])} for d in output or [] if d["score"] >= threshold]
            drawn.append(None if output is None else draw_boxes(p.image, kept))
            found.append(kept)
            notes.append(_notes(p, "" if kept or output is None else f"No objects scored {threshold:.2f} or more."))
        return drawn, found, notes

    def segment(self, images: list) -> tuple[list, list]:
        prepared, outputs = self._infer(images, **({"subtask": self.subtask} if self.subtask else {}))
        overlays = [
            output and (p.image, [(_mask_array(s["mask"]), s["label"]) for s in output])
            for p, output in zip(prepared, outputs)
        ]
        return overlays, [_notes(p) for p in prepared]

    def segment_instances(self, images: list, thresholds: list) -> tuple[list, list]:
        """Each instance in its own colour, named by its label and score; the slider sets the score floor."""
        prepared, outputs = self._infer(images, subtask="instance", threshold=min(thresholds))
        overlays, notes = [], []
        for p, output, threshold in zip(prepared, outputs, thresholds):
            kept = [o for o in output or [] if o["score"] >= threshold]
            shown = [(_mask_array(o["mask"]), f"{o['label']} {o['score']:.2f}") for o in kept]
            overlays.append(None if output is None else (p.image, shown))
            notes.append(_notes(p, "" if kept or output is None else f"No instances scored {threshold:.2f} or more."))
        return overlays, notes


def _mask_array(mask: Image.Image):
    import numpy as np

    return np.asarray(mask, dtype=np.float32) / 255.0


# ---- the app ------------------------------------------------------------------------------------------------------


def find_examples(app_dir: str | Path | None) -> list[str]:
    """Images in app_dir/examples/, else scikit-learn's two bundled photos when scikit-learn is installed."""
    folder = Path(app_dir or ".") / "examples"
    if folder.is_dir():
        return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)
    return default_examples()


def default_examples() -> list[str]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg), when scikit-learn is installed."""
    try:
        import sklearn.datasets
    except ImportError:
        return []
    images = Path(sklearn.datasets.__file__).parent / "images"
    return sorted(str(p) for p in images.glob("*.jpg"))


def build_demo(
    model: str, task: str | None = None, examples: list | None = None, token=None, pipe=None, runtime: str = "pytorch"
) -> gr.Blocks:
    """The demo for `model` (Hub id or local folder); the model is loaded once, here."""
    name, model = model, _bundled_path(model)  # a bundled name keeps its name on the page
    task = task or infer_task(model, token)
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    predictor = Predictor(pipe or load_pipeline(model, task, token, runtime), task)
    batch = {"batch": True, "max_batch_size": MAX_BATCH_SIZE, "api_name": "predict"}
    with gr.Blocks(title=f"{name} · {task}") as demo:
        gr.Markdown(model_header(model, task, token, name=name))
        with gr.Row():
            with gr.Column():
                image = image_input(label="Image", sources=["upload", "clipboard"], elem_id="input-image")
                threshold = None
                if task == "object-detection" or predictor.subtask == "instance":
                    threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Score threshold")
                submit = gr.Button("Predict", variant="primary", elem_id="predict")
            with gr.Column():
                notes = gr.Markdown(elem_id="notes")
                if task == "image-classification":
                    result = gr.Label(num_top_classes=predictor.top_k, label="Top labels", elem_id="labels")
                    submit.click(predictor.classify, [image], [result, notes], **batch)
                elif task == "object-detection":
                    drawn = gr.Image(label="Detections", elem_id="detections-image")
                    boxes = gr.JSON(label="Boxes", elem_id="boxes")
                    submit.click(predictor.detect, [image, threshold], [drawn, boxes, notes], **batch)
                elif predictor.subtask == "instance":
                    overlay = gr.AnnotatedImage(label="Instances", show_legend=True, elem_id="segmentation")
                    submit.click(predictor.segment_instances, [image, threshold], [overlay, notes], **batch)
                else:
                    overlay = gr.AnnotatedImage(label="Segmentation", show_legend=True, elem_id="segmentation")
                    submit.click(predictor.segment, [image], [overlay, notes], **batch)
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Examples")
    return demo


def run_space(
    task: str | None,
    model: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples=None,
    app_dir=None,
    token=None,
    share: bool = False,
    block: bool = True,
    runtime: str = "pytorch",
) -> gr.Blocks:
    """Build and launch the demo; with block=False it returns the running app (tests, notebooks)."""
    examples = examples if examples is not None else find_examples(app_dir)
    demo = build_demo(model, task, examples, token, runtime=runtime)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size="50mb", prevent_thread_lock=not block)
    return demo


def main(task: str, argv: list[str] | None = None, app_dir: str | Path | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Gradio {task} demo")
    parser.add_argument("--model", help="Hub id or local model folder (default: $MODEL_ID, then README `models:`)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument(
        "--runtime",
        default=os.environ.get("RUNTIME", "pytorch"),
        choices=("pytorch", "onnx", "openvino"),
        help="serve the model's hftl export (onnx/ or openvino/ in the repo); default $RUNTIME, else pytorch",
    )
    args = parser.parse_args(argv)
    run_space(task, resolve_model_id(args.model, app_dir), args.host, args.port, app_dir=app_dir, runtime=args.runtime)

"""Serve an exported model (ONNX Runtime or OpenVINO) through transformers' `pipeline()`.

Self-contained (no `hftl` imports): `hftl space publish` copies it into a Space next to the builder, as
`hftl_runtime.py`. An export folder holds the model file(s), config.json (labels), the image processor and
export_report.json:

    from transformers import AutoImageProcessor, pipeline
    model = load_runtime_model("outputs/quickstart/onnx")                  # or quantized=True, format inferred
    pipe = pipeline("image-classification", model=model, image_processor=AutoImageProcessor.from_pretrained(...))
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMATS = ("onnx", "openvino")
RUNTIMES = ("pytorch",) + FORMATS
REPORT_FILE = "export_report.json"
MODEL_FILES = {  # (full precision, int8)
    "onnx": ("model.onnx", "model_quantized.onnx"),
    "openvino": ("openvino_model.xml", "openvino_model_quantized.xml"),
}
OUTPUT_NAMES = {
    "image-classification": ("logits",),
    "object-detection": ("logits", "pred_boxes"),
    "image-segmentation": ("logits",),
}


def model_file(folder: str | Path, fmt: str, quantized: bool | None = None) -> Path:
    """The model file of an export folder; quantized=None picks int8 when the folder has it."""
    names = MODEL_FILES[fmt]
    if quantized is None:
        quantized = (Path(folder) / names[1]).is_file()
    path = Path(folder) / names[int(bool(quantized))]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: export the model first (hftl export MODEL --format {fmt}).")
    return path


def detect_format(folder: str | Path) -> str:
    for fmt, (name, _) in MODEL_FILES.items():
        if (Path(folder) / name).is_file():
            return fmt
    raise FileNotFoundError(f"{folder} holds no exported model ({', '.join(n for n, _ in MODEL_FILES.values())}).")


def default_threads() -> int:
    import torch

    return torch.get_num_threads()


class Session:
    """One compiled model on CPU: `session(pixel_values)` → {output name: numpy array}."""

    def __init__(self, path: str | Path, fmt: str, threads: int | None = None):
        threads = threads or default_threads()
        self.format = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            # idle threads that spin would steal the cores from whatever runs next (PyTorch in the benchmark)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self._session.get_inputs()]
            self.output_names = [o.name for o in self._session.get_outputs()]
        elif fmt == "openvino":
            import openvino as ov

            # f32 on purpose: on CPUs with bf16 units OpenVINO would otherwise run fp32 models in bf16, which is
            # not what the parity check measured
            config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
            self.input_names = [next(iter(i.get_names())) for i in self._compiled.inputs]
            self.output_names = [next(iter(o.get_names())) for o in self._compiled.outputs]
        else:
            raise ValueError(f"Unknown export format {fmt!r}; supported: {', '.join(FORMATS)}.")

    def __call__(self, pixel_values) -> dict:
        import numpy as np

        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if self.format == "onnx":
            outputs = self._session.run(None, {self.input_names[0]: pixel_values})
        else:
            result = self._compiled(pixel_values)
            outputs = [result[port] for port in self._compiled.outputs]
        return dict(zip(self.output_names, outputs))


def _output_class(task: str):
    from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput

    if task == "object-detection":
        from transformers.models.detr.modeling_detr import DetrObjectDetectionOutput

        return DetrObjectDetectionOutput
    return ImageClassifierOutput if task == "image-classification" else SemanticSegmenterOutput


def load_runtime_model(folder: str | Path, fmt: str | None = None, quantized: bool | None = None, threads=None):
    """A transformers model object whose forward runs the exported file, so `pipeline(task, model=...)` and the
    image processor's post-processing work unchanged (what optimum's ORTModel classes do)."""
    import torch
    from transformers import AutoConfig, PreTrainedModel

    folder = Path(folder)
    fmt = fmt or detect_format(folder)
    report = json.loads((folder / REPORT_FILE).read_text()) if (folder / REPORT_FILE).is_file() else {}
    task = report.get("task") or "image-classification"
    path = model_file(folder, fmt, quantized)
    session = Session(path, fmt, threads)
    output_class = _output_class(task)

    class RuntimeModel(PreTrainedModel):
        config_class = type(AutoConfig.from_pretrained(folder))
        main_input_name = "pixel_values"

        def __init__(self, config):
            super().__init__(config)
            # no weights here; the pipeline reads dtype and device from the module's tensors
            self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
            self.session, self.task = session, task

        def forward(self, pixel_values, **_):
            outputs = self.session(pixel_values.detach().float().cpu().numpy())
            return output_class(**{name: torch.from_numpy(outputs[name]) for name in OUTPUT_NAMES[task]})

    model = RuntimeModel(AutoConfig.from_pretrained(folder))
    model.runtime = fmt + (" int8" if path.name == MODEL_FILES[fmt][1] else "")
    return model.eval()


def export_folder(model_dir: str | Path, fmt: str) -> Path:
    """Where a model folder keeps its export: <model>/onnx or <model>/openvino (the same subfolder on the Hub)."""
    return Path(model_dir) / fmt


def fetch_export(model: str, fmt: str, token=None) -> Path:
    """The export folder of a local model folder, an export folder itself, or a Hub repo's `onnx/` / `openvino/`."""
    path = Path(model)
    if path.is_dir():
        if (path / MODEL_FILES[fmt][0]).is_file():
            return path
        if (path / fmt / MODEL_FILES[fmt][0]).is_file():
            return path / fmt
        raise FileNotFoundError(
            f"{model} has no {fmt} export: run `hftl export {model} --format {fmt}` (it writes {path / fmt})."
        )
    from huggingface_hub import snapshot_download

    local = Path(snapshot_download(model, allow_patterns=[f"{fmt}/*"], token=token or os.environ.get("HF_TOKEN")))
    if not (local / fmt / MODEL_FILES[fmt][0]).is_file():
        raise FileNotFoundError(
            f"The Hub repo {model} has no {fmt}/ export: run `hftl export {model} --format {fmt} --push_to_hub`."
        )
    return local / fmt


def load_runtime_pipeline(model: str, fmt: str, task: str | None = None, token=None):
    """pipeline(task) over the exported model of a local folder or Hub repo."""
    from transformers import AutoImageProcessor, pipeline

    folder = fetch_export(model, fmt, token)
    runtime_model = load_runtime_model(folder, fmt)
    task = task or runtime_model.task
    processor = AutoImageProcessor.from_pretrained(folder)
    return pipeline(task, model=runtime_model, image_processor=processor, device=-1)

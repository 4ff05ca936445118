"""PyTorch model → ONNX (torch.onnx, dynamo exporter) or OpenVINO IR (openvino.convert_model), and int8 (ONNX
Runtime static quantization, NNCF for OpenVINO).

Why torch.onnx and not optimum: optimum-onnx 0.1 pins transformers<4.58 and optimum-intel 2.2 transformers<5.6,
while hftl needs transformers>=5, so optimum has no exporter that runs here; torch's own exporter is what optimum
wraps, and its dynamo path exports every hftl architecture (TimmWrapper, DETR, UperNet) with exact parity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hftl.export.runtime import MODEL_FILES, OUTPUT_NAMES

DEFAULT_OPSET = 18
SUPPORTED = {  # architecture name suffix → what the export folder serves
    "image-classification": "…ForImageClassification (ViT, ResNet, ConvNeXt, TimmWrapper, EfficientNet, …)",
    "object-detection": "DETR-family …ForObjectDetection (DETR, Conditional DETR, Deformable DETR, RT-DETR)",
    "image-segmentation": "…ForSemanticSegmentation (SegFormer, UperNet, DPT, MobileViT, BEiT)",
}


class UnsupportedModel(ValueError):
    """The architecture has outputs this exporter does not serve; the message names what is supported."""


def supported_text() -> str:
    return "; ".join(f"{task}: {what}" for task, what in SUPPORTED.items())


def check_architecture(config: dict, task: str) -> None:
    """Before any loading: the config's architecture must have the head the runtime wrapper serves."""
    architectures = config.get("architectures") or ["?"]
    suffix = {
        "image-classification": "ForImageClassification",
        "object-detection": "ForObjectDetection",
        "image-segmentation": "ForSemanticSegmentation",
    }.get(task)
    if suffix is None or not any(a.endswith(suffix) for a in architectures):
        raise UnsupportedModel(
            f"Cannot export {architectures[0]} for {task}: hftl export supports {supported_text()}."
        )


class Outputs(torch.nn.Module):
    """The model with a tensors-only signature: pixel_values in, the task's outputs (logits, boxes) out."""

    def __init__(self, model, task: str):
        super().__init__()
        self.model, self.names = model, OUTPUT_NAMES[task]

    def forward(self, pixel_values):
        outputs = self.model(pixel_values=pixel_values)
        missing = [name for name in self.names if getattr(outputs, name, None) is None]
        if missing:
            raise UnsupportedModel(
                f"{type(self.model).__name__} returns no {missing}: hftl export supports {supported_text()}."
            )
        return tuple(getattr(outputs, name) for name in self.names)


def _dynamic_dims(task: str) -> dict:
    # detection processors keep the aspect ratio (variable height/width); the others resize to one size
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    if task == "object-detection":
        dims |= {2: torch.export.Dim("height", min=32, max=4096), 3: torch.export.Dim("width", min=32, max=4096)}
    return dims


def to_onnx(model, task: str, example: torch.Tensor, folder: Path, opset: int = DEFAULT_OPSET) -> Path:
    path = folder / MODEL_FILES["onnx"][0]
    wrapped = Outputs(model, task).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=list(OUTPUT_NAMES[task]),
            dynamic_shapes=(_dynamic_dims(task),),
            verbose=False,
        )
    program.save(str(path))
    return path


def to_openvino(model, task: str, example: torch.Tensor, folder: Path) -> Path:
    import openvino as ov

    path = folder / MODEL_FILES["openvino"][0]
    shape = [-1, *example.shape[1:]] if task != "object-detection" else [-1, example.shape[1], -1, -1]
    with torch.no_grad():
        converted = ov.convert_model(
            Outputs(model, task).eval(), example_input=example, input=[ov.PartialShape(shape)]
        )
    converted.inputs[0].get_tensor().set_names({"pixel_values"})
    for port, name in zip(converted.outputs, OUTPUT_NAMES[task]):
        port.get_tensor().set_names({name})
    ov.save_model(converted, str(path), compress_to_fp16=False)  # its default halves the weights: not parity
    return path


def quantize(fmt: str, folder: Path, calibration: list) -> Path:
    """int8 post-training static quantization calibrated on real images (a list of pixel_values arrays)."""
    return _quantize_onnx(folder, calibration) if fmt == "onnx" else _quantize_openvino(folder, calibration)


def _quantize_onnx(folder: Path, calibration: list) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = folder / MODEL_FILES["onnx"][0], folder / MODEL_FILES["onnx"][1]
    prepared = folder / "model_prepared.onnx"

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixel_values": batch}

    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        # the 99.999th percentile of activations rather than their extremes, and the layers that read the pixels or
        # write an output kept in float: on three short EfficientNet-Lite0 digits runs (bench/README.md, "Export")
        # the worst int8 drop went from 3.1 points (min-max, all layers) to 0.8
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=CalibrationMethod.Percentile,
            nodes_to_exclude=_input_and_output_layers(prepared),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return target


def _input_and_output_layers(path: Path) -> list[str]:
    """Names of the first Conv/MatMul/Gemm fed by the pixels and of those whose result is a model output."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    layers = [node for node in graph.node if node.op_type in ("Conv", "MatMul", "Gemm")]
    outputs = {output.name for output in graph.output}
    return [node.name for node in layers[:1] + [n for n in layers[1:] if outputs.intersection(n.output)]]


def _quantize_openvino(folder: Path, calibration: list) -> Path:
    import nncf
    import openvino as ov

    target = folder / MODEL_FILES["openvino"][1]
    model = ov.Core().read_model(str(folder / MODEL_FILES["openvino"][0]))
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    ov.save_model(quantized, str(target))
    return target

"""Export a trained model to ONNX or OpenVINO with a parity check: `hftl export` (see hftl/export/main.py)."""

from hftl.export.runtime import FORMATS, RUNTIMES


def export_model(*args, **kwargs):
    from hftl.export.main import export_model as run

    return run(*args, **kwargs)


def add_arguments(parser) -> None:
    """The options of `hftl export` (kept here so cli.py stays a list of subcommands)."""
    parser.add_argument("model", help="an hftl output_dir, a model folder, a Hub repo id, or a bundled name")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx (ONNX Runtime) or openvino")
    parser.add_argument("--quantize", default=None, choices=("int8",), help="also write an int8 model")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (torch's dynamo exporter)")
    parser.add_argument("--out", default=None, help="export folder (default: MODEL/FORMAT, or ./NAME/FORMAT)")
    parser.add_argument("--push_to_hub", "--push-to-hub", action="store_true", help="upload to REPO/FORMAT/")
    parser.add_argument("--hub_model_id", "--hub-model-id", default=None, help="repo to push to (default: MODEL)")
    parser.add_argument(
        "--images", nargs="+", default=None, help="images for the parity check (default: the run's test split)"
    )


__all__ = ["FORMATS", "RUNTIMES", "add_arguments", "export_model"]

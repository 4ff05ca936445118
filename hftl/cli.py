"""The `hftl` command: train, predict, push, local Hub, demo Spaces.

    hftl quickstart                       # offline: local Hub + bundled data/weights → train → push → pull → predict
    hftl train classification --config recipes/configs/classification/quickstart.yaml [--option value ...]
    hftl lr-find [TASK] --config recipes/configs/classification/quickstart.yaml   # LR range test, suggested rate
    hftl predict --model user/my-model cat.jpg dog.jpg [--top-k 5]
    hftl push outputs/run user/my-model [--private] [--revision BRANCH]
    hftl export outputs/run --format onnx|openvino [--quantize int8] [--push_to_hub]
    hftl hub serve [--port 8765] [--data-dir DIR] &
    hftl hub seed [--endpoint http://127.0.0.1:8765]
    hftl space run --model user/my-model [--task image-classification] [--port 7860]
    hftl space publish --model user/my-model --space user/my-demo
    hftl rank --dataset hftl/digits --models a,b,c [--shots K]     # score backbones before fine-tuning (hftl/rank.py)

Every subcommand that talks to a Hub takes `--endpoint URL`: huggingface_hub reads HF_ENDPOINT when it is imported,
so this module sets it (and HF_HUB_DISABLE_XET=1, which the local endpoint needs for LFS uploads) before importing
anything that imports huggingface_hub. Kept thin: each subcommand calls one library function.
"""

from __future__ import annotations

import argparse
import os
import sys

from hftl.export import RUNTIMES
from hftl.export import add_arguments as add_export_arguments
from hftl.log import console

TRAIN_TASKS = ("classification", "detection", "segmentation")
LOCAL_ENDPOINT = "http://127.0.0.1:8765"


def _add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint",
        default=None,
        help=f"Hub URL, e.g. the local one {LOCAL_ENDPOINT} (default: $HF_ENDPOINT, else huggingface.co)",
    )


def _set_endpoint(endpoint: str | None) -> None:
    """Must run before huggingface_hub is imported (it reads these once, at import)."""
    if endpoint:
        if "huggingface_hub" in sys.modules and os.environ.get("HF_ENDPOINT") != endpoint.rstrip("/"):
            raise RuntimeError("--endpoint must be set before huggingface_hub is imported; set HF_ENDPOINT instead.")
        os.environ["HF_ENDPOINT"] = endpoint.rstrip("/")
        os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hftl", description="Hugging Face transfer learning for computer vision: train, predict, push, demo."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("rank", help="score candidate backbones on a dataset (options: hftl rank --help)")
    train = commands.add_parser("train", help="fine-tune a model (options: hftl train TASK --help)")
    train.add_argument("task", choices=TRAIN_TASKS)
    _add_endpoint(train)

    commands.add_parser("lr-find", help="learning-rate range test (takes the train options; --learning_rate auto)")

    predict = commands.add_parser("predict", help="predict labels for images with a local folder or Hub model")
    predict.add_argument("--model", required=True, help="Hub id (user/name), bundled name, or local model folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--top-k", type=int, default=5, help="classification: labels to print per image")
    predict.add_argument("--task", default=None, help="pipeline task (default: from the model)")
    predict.add_argument(
        "--runtime", default="pytorch", choices=RUNTIMES, help="serve the exported model (hftl export)"
    )
    _add_endpoint(predict)

    export = commands.add_parser("export", help="export to ONNX or OpenVINO, checked against PyTorch")
    add_export_arguments(export)
    _add_endpoint(export)

    push = commands.add_parser("push", help="push a finished run (output_dir) to the Hub in one commit")
    push.add_argument("output_dir")
    push.add_argument("repo_id", help="user/name")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    push.add_argument("--license", default="apache-2.0", help="license in the model card")
    _add_endpoint(push)

    hub = commands.add_parser("hub", help="a local Hub endpoint: serve, seed")
    hub_commands = hub.add_subparsers(dest="hub_command", required=True, metavar="HUB_COMMAND")
    hub_commands.add_parser(
        "serve", help="serve a local Hub endpoint (options: hftl hub serve --help)", add_help=False
    )
    seed = hub_commands.add_parser("seed", help="upload the bundled model and datasets to the Hub endpoint")
    seed.add_argument("--models-only", action="store_true", help="skip the bundled datasets")
    seed.add_argument("--dataset", action="append", default=None, help="seed only this bundled dataset (repeatable)")
    _add_endpoint(seed)

    space = commands.add_parser("space", help="Gradio demo: run locally or publish as a Space")
    space_commands = space.add_subparsers(dest="space_command", required=True, metavar="SPACE_COMMAND")
    run = space_commands.add_parser("run", help="serve the demo for a model locally")
    run.add_argument("--model", required=True, help="Hub id or local model folder")
    run.add_argument("--task", default=None, help="image-classification, object-detection or image-segmentation")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=7860)
    run.add_argument("--runtime", default="pytorch", choices=RUNTIMES, help="serve the exported model (hftl export)")
    _add_endpoint(run)
    publish = space_commands.add_parser("publish", help="publish a demo Space for a Hub model")
    publish.add_argument("--model", required=True, help="Hub model id (push it first)")
    publish.add_argument("--space", required=True, help="Space id, user/name")
    publish.add_argument("--task", default=None)
    publish.add_argument("--private", action="store_true")
    _add_endpoint(publish)
    return parser


def _pop_endpoint(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--endpoint URL` / `--endpoint=URL` anywhere in pass-through argv (train, hub serve)."""
    rest, endpoint, it = [], None, iter(argv)
    for arg in it:
        if arg == "--endpoint":
            endpoint = next(it, None)
        elif arg.startswith("--endpoint="):
            endpoint = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return endpoint, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    console()
    # train and hub serve hand their options to their own parsers (which have their own --help)
    if argv[:1] == ["train"] and len(argv) > 1 and argv[1] in TRAIN_TASKS:
        endpoint, rest = _pop_endpoint(argv[2:])
        _set_endpoint(endpoint)
        from hftl.exits import run_or_exit
        from hftl.runner import run

        run_or_exit(run, argv[1], rest)
        return 0
    if argv[:1] == ["rank"]:
        endpoint, rest = _pop_endpoint(argv[1:])
        _set_endpoint(endpoint)
        from hftl.rank import main as rank_main

        rank_main(rest)
        return 0
    if argv[:1] == ["lr-find"]:
        endpoint, rest = _pop_endpoint(argv[1:])
        _set_endpoint(endpoint)
        from hftl.runner import lr_find

        task = rest.pop(0) if rest[:1] and rest[0] in TRAIN_TASKS else "classification"
        print(lr_find(task, rest)["learning_rate"])  # noqa: T201 (the result: stdout alone is the rate)
        return 0
    if argv[:1] == ["quickstart"]:
        return _quickstart(argv[1:])
    if argv[:2] == ["hub", "serve"]:
        from hftl.hub.serving import main as serve_main

        serve_main(argv[2:])
        return 0

    args = build_parser().parse_args(argv)
    _set_endpoint(getattr(args, "endpoint", None))
    try:
        return _dispatch(args)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"hftl {args.command}: error: {error}", file=sys.stderr)  # noqa: T201 (argparse-style error line)
        return 1


def _quickstart(argv: list[str]) -> int:
    """`hftl quickstart [--port P] [--data-dir DIR] [training options]`."""
    parser = argparse.ArgumentParser(prog="hftl quickstart", description=_quickstart.__doc__)
    parser.add_argument("--port", type=int, default=8765, help="port of the local Hub on 127.0.0.1")
    parser.add_argument("--data-dir", default=None, help="local Hub storage (default ~/.cache/hftl/hub)")
    args, train_argv = parser.parse_known_args(argv)
    _set_endpoint(f"http://127.0.0.1:{args.port}")
    from hftl.quickstart import default_data_dir, quickstart

    quickstart(args.port, args.data_dir or default_data_dir(), train_argv)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "predict":
        from hftl.predict import format_predictions, predict

        found = predict(args.model, args.images, top_k=args.top_k, task=args.task, runtime=args.runtime)
        print(format_predictions(args.images, found))  # noqa: T201 (the result)
    elif args.command == "export":
        from hftl.export import export_model

        out = export_model(
            args.model,
            args.format,
            args.quantize,
            args.opset,
            args.out,
            args.push_to_hub,
            args.hub_model_id,
            args.images,
        )
        print(out)  # noqa: T201 (the result: the export folder)
    elif args.command == "push":
        from hftl.hub.push import push_run

        print(  # noqa: T201 (the result: the commit URL)
            push_run(args.output_dir, args.repo_id, private=args.private, revision=args.revision, license=args.license)
        )
    elif args.command == "hub":  # serve is handled before parsing
        from hftl.hub.seed import seed_hub

        seed_hub(datasets=[] if args.models_only else args.dataset)
    elif args.command == "space" and args.space_command == "run":
        from hftl.spaces import run_space

        run_space(args.task, args.model, args.host, args.port, runtime=args.runtime)
    elif args.command == "space":
        from hftl.spaces import publish_space

        print(publish_space(args.model, args.space, task=args.task, private=args.private))  # noqa: T201 (the URL)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Publish a model's Gradio demo as a Space in one commit: app.py, the shared builder, requirements, README, examples.

Usage:
    hftl space publish --model user/my-model --space user/my-model-demo
    python -c "from hftl.spaces import publish_space; print(publish_space('user/my-model', 'user/my-model-demo'))"
Works against any Hub endpoint huggingface_hub is pointed at (HF_ENDPOINT), including `hftl hub serve`.
"""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

BUILDER_FILE = Path(__file__).with_name("builder.py")
BUILDER_MODULE = "hftl_space"  # the builder's file name inside a Space
RUNTIME_FILE = Path(__file__).parents[1] / "export" / "runtime.py"  # serves exports; `hftl_runtime.py` in a Space
REPO_SPACES_DIR = Path(__file__).resolve().parents[2] / "spaces"  # the thin apps in a checkout
SPACE_LOOKS = {
    "image-classification": ("🏷️", "indigo", "blue"),
    "object-detection": ("📦", "yellow", "red"),
    "image-segmentation": ("🧩", "green", "purple"),
}
APP_TEMPLATE = '''"""{title} demo: `python app.py` serves $MODEL_ID, else the model under `models:` in README.md.

In the hftl repo: python spaces/{task}/app.py --model <hub id or local output_dir>
(`hftl space publish` copies this file and the shared builder, as {module}.py, into a Space.)
"""

from pathlib import Path

try:
    from {module} import main  # a published Space: the builder sits next to this file
except ModuleNotFoundError as error:
    if error.name != "{module}":
        raise
    from hftl.spaces.builder import main

if __name__ == "__main__":
    main("{task}", app_dir=Path(__file__).parent)
'''


def render_app(task: str) -> str:
    """The thin app.py of a task; spaces/<task>/app.py in the repo is exactly this text (a test keeps them equal)."""
    return APP_TEMPLATE.format(task=task, title=task.replace("-", " ").capitalize(), module=BUILDER_MODULE)


def _pin(package: str) -> str:
    try:
        return f"{package}=={version(package).split('+')[0]}"  # drop local tags such as +cpu
    except PackageNotFoundError as error:
        raise RuntimeError(f"{package} must be installed to pin it in the Space's requirements.txt") from error


def requirements(model_files: set[str], config: dict | None) -> str:
    """Pins of the installed versions of what the app imports; peft/timm only when the model needs them."""
    packages = ["gradio", "transformers", "torch", "pillow", "huggingface_hub", "numpy"]
    if "adapter_config.json" in model_files:
        packages.append("peft")
    config = config or {}
    if config.get("model_type") == "timm_wrapper" or config.get("use_timm_backbone") or "timm" in str(config):
        packages.append("timm")
    # exports (hftl export) the Space can serve with RUNTIME=onnx / openvino
    packages += [
        p
        for p, d in (("onnxruntime", "onnx/"), ("openvino", "openvino/"))
        if any(f.startswith(d) for f in model_files)
    ]
    return "\n".join(_pin(p) for p in packages) + "\n"


def space_card(model_id: str, space_id: str, task: str, model_card, endpoint: str) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    emoji, colour_from, colour_to = SPACE_LOOKS[task]
    licence = (model_card.data.get("license") if model_card is not None else None) or "apache-2.0"
    short = f"{task.replace('-', ' ').capitalize()} with {model_id.split('/')[-1]}"
    short = short if len(short) <= 60 else short[:57] + "..."
    data = SpaceCardData(
        title=space_id.split("/")[-1][:60],
        sdk="gradio",
        sdk_version=version("gradio"),
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        app_file="app.py",
        models=[model_id],
        license=licence,
        emoji=emoji,
        colorFrom=colour_from,
        colorTo=colour_to,
        short_description=short,
        pinned=False,
    )
    body = (
        f"# {task.replace('-', ' ').capitalize()} demo for {model_id}\n\n"
        f"Serves [{model_id}]({endpoint}/{model_id}) with `transformers.pipeline` behind a batched Gradio endpoint."
        "\n\nRun it anywhere:\n\n```bash\npip install -r requirements.txt\n"
        "python app.py  # MODEL_ID=<other model> to swap\n```\n\n"
        f"Published with hftl from Python {platform.python_version()}; requirements.txt pins its versions.\n"
    )
    return str(SpaceCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + body))


def publish_space(
    model_id: str,
    space_id: str,
    task: str | None = None,
    token: str | None = None,
    private: bool = False,
    examples: list | None = None,
) -> str:
    """Create or update the Space `space_id` serving the Hub model `model_id`; returns the Space's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from hftl.spaces import builder

    if Path(model_id).exists():
        raise ValueError(
            f"{model_id} is a local path; a Space loads its model from the Hub: push it first (hftl push)."
        )
    api = HfApi(token=token)
    try:
        model_files = set(api.list_repo_files(model_id))
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"Model repo {model_id} not found on {api.endpoint}; push the model before its Space."
        ) from error
    task = task or builder.infer_task(model_id, token)
    if task not in SPACE_LOOKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(SPACE_LOOKS)}.")
    examples = [Path(e) for e in (examples if examples is not None else builder.default_examples())]
    for example in examples:
        if not example.is_file():
            raise FileNotFoundError(f"Example image {example} does not exist.")

    config = builder._read_json(model_id, "config.json", token) if "config.json" in model_files else None
    files = {
        "app.py": render_app(task).encode(),
        f"{BUILDER_MODULE}.py": BUILDER_FILE.read_bytes(),
        "hftl_runtime.py": RUNTIME_FILE.read_bytes(),
        "requirements.txt": requirements(model_files, config).encode(),
        "README.md": space_card(model_id, space_id, task, builder._load_card(model_id, token), api.endpoint).encode(),
    }
    for example in examples:
        files[f"examples/{example.name}"] = example.read_bytes()
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data) for path, data in files.items()]
    api.create_commit(space_id, operations, commit_message=f"Demo for {model_id}", repo_type="space")
    return f"{api.endpoint}/spaces/{space_id}"

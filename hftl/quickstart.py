"""`hftl quickstart`: the whole loop offline, on the embedded defaults.

Starts the local Hub endpoint in this process, seeds it with the bundled model and datasets, fine-tunes the
bundled ImageNet EfficientNet-Lite0 on the bundled digits (recipes/configs/classification/quickstart.yaml), pushes
the result to the local Hub, pulls it back by repo id and predicts a few held-out digits. The caller (hftl.cli) has
pointed HF_ENDPOINT at the local port before huggingface_hub was imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hftl.log import get_logger

logger = get_logger(__name__)

QUICKSTART_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "classification" / "quickstart.yaml"
REPO_ID = "hftl/digits-efficientnet-lite0"
QUICKSTART_DATASET = "hftl/digits"


def default_data_dir() -> Path:
    return Path(os.environ.get("HFTL_CACHE", Path.home() / ".cache" / "hftl")) / "hub"


def quickstart(port: int, data_dir: str | Path, train_argv: list[str]) -> dict:
    from hftl.bundled import EFFICIENTNET_LITE0
    from hftl.hub.seed import seed_hub
    from hftl.hub.serving import start_in_thread
    from hftl.predict import format_predictions, predict
    from hftl.runner import run

    hub = start_in_thread(data_dir, port=port)
    logger.info(f"local Hub: {hub.url} (data in {data_dir})")
    # only what this run reads: seeding every bundled set would first convert and upload Fashion-MNIST's 70k
    # images (`hftl hub seed` does that)
    seed_hub(models=[EFFICIENTNET_LITE0], datasets=[QUICKSTART_DATASET])
    argv = ["--config", str(QUICKSTART_CONFIG), "--push_to_hub", "--hub_model_id", REPO_ID, *train_argv]
    results = run("classification", argv)

    from hftl.bundled import load_bundled_dataset

    test = load_bundled_dataset(QUICKSTART_DATASET)["test"].select(range(5))
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, (image, label) in enumerate(zip(test["image"], test["label"])):
            paths.append(str(Path(folder) / f"digit-{i}-true-{label}.png"))
            image.resize((64, 64)).save(paths[-1])
        logger.info(f"pulled {REPO_ID} back from {hub.url} and predicted:")
        logger.info(format_predictions([Path(p).name for p in paths], predict(REPO_ID, paths, top_k=1)))
    logger.info(
        f"test accuracy {results['test']['accuracy']:.4f}. Keep serving with:\n"
        f"  hftl hub serve --data-dir {data_dir} --port {port} &\n"
        f"  hftl predict --endpoint http://127.0.0.1:{port} --model {REPO_ID} IMAGE"
    )
    hub.stop()
    return results

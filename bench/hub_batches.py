"""RSS of opening a Hub dataset of small images: datasets' default record batches (100 rows for images, what
`hftl.data.load_dataset_dict` got before) next to hftl's, sized from the dataset card to ~32 MB a batch.

    python bench/hub_batches.py               # Fashion-MNIST's 60k training images
    python bench/hub_batches.py --rows 20000

The images (Debian's dataset-fashion-mnist, as PNG bytes, with their labels) are pushed with `Dataset.push_to_hub`
to a local hub (`hftl.hub`, classic LFS) on 127.0.0.1. Each load is a fresh process with its own datasets cache:
"cold" downloads and writes the cache, "warm" (the next launch) only opens it. RSS is read from /proc/self/status
right after the load, with the same process's RSS before it subtracted ("file": mapped file pages, "anon": private
memory). Work files live under $HFTL_BENCH_WORK/hub_batches (default /tmp/hftl-bench) and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK  # noqa: E402

ROOT = WORK / "hub_batches"
REPO = "bench/fashion-mnist-small"
TOKEN = "bench-token"  # only this local server accepts it


def rss_kib() -> dict[str, int]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[key].split()[0]) for key in ("VmRSS", "RssAnon", "RssFile")}


def measure(batching: str) -> None:
    """One load in this process (its environment names the hub and the cache); prints its RSS as JSON."""
    import datasets  # noqa: F401 (imported before the first reading: its import is not the load's)

    from hftl.config import DataArgs
    from hftl.data import load_dataset_dict
    from hftl.tasks.classification.task import ClassificationTask

    before = rss_kib()
    start = time.perf_counter()
    if batching == "default":
        train = datasets.load_dataset(REPO)["train"]
    else:
        train = load_dataset_dict(DataArgs(dataset=REPO), ClassificationTask())["train"]
    seconds = time.perf_counter() - start
    after = rss_kib()
    batches = [len(batch) for batch in train.data.to_batches()]
    mb = {key.lower(): (after[key] - before[key]) / 1024 for key in after}
    shape = {"rows": len(train), "batches": len(batches), "rows_per_batch": batches[0]}
    print(json.dumps({"seconds": seconds, **shape, **mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60_000, help="training images pushed (at most 60,000)")
    parser.add_argument("--measure", choices=["default", "hftl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    shutil.rmtree(ROOT, ignore_errors=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # huggingface_hub reads these when it is imported
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    os.environ.update(env, HF_HOME=str(ROOT / "push"))
    from hftl.hub.serving import start_in_thread

    hub = start_in_thread(ROOT / "hub", port=port, token=TOKEN, lfs_threshold=0)
    try:
        push(args.rows)
        results = {}
        for batching in ("default", "hftl"):
            home = ROOT / batching
            for launch in ("cold", "warm"):
                out = subprocess.run(
                    [sys.executable, __file__, "--measure", batching],
                    env={**env, "HF_HOME": str(home)},
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[batching, launch] = json.loads(out.stdout.strip().splitlines()[-1])
                print(batching, launch, results[batching, launch], flush=True)
        for launch in ("cold", "warm"):
            old, new = results["default", launch], results["hftl", launch]
            print(
                f"{launch}: RSS of the load {new['vmrss'] / old['vmrss']:.2f}x datasets' default "
                f"({new['vmrss']:.0f} MB vs {old['vmrss']:.0f} MB; file pages {new['rssfile']:.0f} vs "
                f"{old['rssfile']:.0f} MB), {new['batches']} record batches of {new['rows_per_batch']} rows vs "
                f"{old['batches']} of {old['rows_per_batch']}, {new['seconds']:.1f} s vs {old['seconds']:.1f} s"
            )
    finally:
        hub.stop()
        shutil.rmtree(ROOT, ignore_errors=True)


def push(rows: int) -> None:
    from datasets import ClassLabel, Dataset, Features, Image
    from scale import CLASSES, fashion_pngs

    pngs, labels = fashion_pngs()
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    images = [{"bytes": png, "path": None} for png in pngs[:rows]]
    Dataset.from_dict({"image": images, "label": labels[:rows].tolist()}, features=features).push_to_hub(REPO)


if __name__ == "__main__":
    main()

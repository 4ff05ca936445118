"""Seconds to the first training step and peak RSS by dataset size: hftl next to the plain datasets + DataLoader path.

    python bench/scale.py                                   # parquet 1k/10k/100k/1.28M rows, folders 1k/10k/50k
    python bench/scale.py --rows 1000 10000 --folder_rows 1000   # a quick look
    python bench/scale.py --rows --folder_rows --repeats 15      # the folder listing alone, next to a bare walk
    python bench/scale.py --rows --folder_rows --scan_rows 1281000 --scan_shapes imagenet --keep  # ImageNet-1k's tree

Parquet rows are Fashion-MNIST's 60k training images (Debian's dataset-fashion-mnist) as PNG bytes, repeated with a
row id up to the row count, in the Hub's layout (data/train-*.parquet, validation and test 1000 rows each):
~0.35 GB at 1.28M rows. Folders are the same PNGs as files, one sub-folder per class. Each measurement is one
process from `python` to the first optimizer step's backward pass (a ViT with hidden size 64 at 32 px, batch 32),
"cold" on the first launch (empty datasets cache / no folder listing) and "warm" on the second. Peak RSS is the
process's at that point; "anon" and "file" split the RSS at that point into private memory and mapped file pages
(datasets' memory-mapped Arrow files: clean page cache, shared between processes). "floor" is the same process
with no data: imports and the model only. With --scan_rows, the folder listing alone (hftl's scan, and the whole
cold listing with its Arrow file) is timed next to a bare os.scandir walk of the same tree, interleaved.
Generated data and caches live under $HFTL_BENCH_WORK/scale (default /tmp/hftl-bench) and are removed at the end
(--keep to keep them, and to reuse data kept by an earlier run).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, write_vit_folder  # noqa: E402

from hftl.system import peak_rss_mb  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
ROOT = WORK / "scale"


def fashion_pngs() -> tuple[list[bytes], np.ndarray]:
    from PIL import Image

    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs, labels


def write_parquet(folder: Path, rows: int, pngs, labels) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import ClassLabel, Features, Image, Value

    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES), "row": Value("int64")})
    IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # noqa: N806 (datasets' Image storage)
    metadata = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    (folder / "data").mkdir(parents=True)
    shard_rows = 200_000
    for split, count in (("train", rows), ("validation", 1000), ("test", 1000)):
        shards = max(1, -(-count // shard_rows))
        for shard in range(shards):
            ids = np.arange(shard * shard_rows, min(count, (shard + 1) * shard_rows))
            source = (ids + (0 if split == "train" else 7919)) % len(pngs)
            table = pa.table(
                {
                    "image": pa.array([{"bytes": pngs[i], "path": None} for i in source], type=IMAGE_TYPE),
                    "label": pa.array(labels[source].astype(np.int64)),
                    "row": pa.array(ids),
                }
            ).replace_schema_metadata(metadata)
            pq.write_table(table, folder / "data" / f"{split}-{shard:05d}-of-{shards:05d}.parquet")


def write_folder(folder: Path, rows: int, pngs, labels) -> None:
    for split, count in (("train", rows), ("validation", 500), ("test", 500)):
        for name in CLASSES:
            (folder / split / name).mkdir(parents=True)
        for i in range(count):
            source = (i + (0 if split == "train" else 7919)) % len(pngs)
            (folder / split / CLASSES[labels[source]] / f"{i}.png").write_bytes(pngs[source])


# the folder-listing case's other trees: empty files (a listing never opens one), (files per folder, folder, file name)
SCAN_SHAPES = {
    "imagenet": (1281, lambda c: f"n{1440764 + 9973 * c:08d}", lambda c, i: f"n{1440764 + 9973 * c:08d}_{i}.JPEG"),
    "small": (100, lambda c: f"class{c:04d}", lambda c, i: f"img_{c}_{i}.jpg"),  # many small folders
}


def write_empty_tree(folder: Path, rows: int, shape: str) -> None:
    per_folder, folder_name, file_name = SCAN_SHAPES[shape]
    for c in range(-(-rows // per_folder)):
        (folder / "train" / folder_name(c)).mkdir(parents=True)
        for i in range(c * per_folder, min(rows, (c + 1) * per_folder)):
            (folder / "train" / folder_name(c) / file_name(c, i)).touch()


def scandir_seconds(folder: Path) -> float:
    """The reference: a bare recursive os.scandir walk (what reading the file list costs and no more)."""
    start, stack, count = time.perf_counter(), [str(folder)], 0
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                else:
                    count += 1
    return time.perf_counter() - start


def scandir_paths_seconds(folder: Path) -> float:
    """A second reference: the same walk keeping every file's path, as any listing must (not the goal's reference)."""
    start, stack, paths = time.perf_counter(), [str(folder)], []
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir():
                    stack.append(entry.path)
                else:
                    paths.append(entry.path)
    return time.perf_counter() - start


def child(args) -> None:
    """One measured process: runs until the first backward pass, writes {seconds, peak_rss_mb}, exits."""
    import torch

    def first_step(*_, **__):
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        kib = {key: int(status[key].split()[0]) for key in ("RssAnon", "RssFile")}
        out = {"seconds": time.time() - args.t0, "peak_rss_mb": peak_rss_mb(),
               "anon_mb": kib["RssAnon"] / 1024, "file_mb": kib["RssFile"] / 1024}  # fmt: skip
        Path(args.result).write_text(json.dumps(out))
        os._exit(0)

    if args.child == "floor":  # what every path pays before any data: imports and the model
        import transformers  # noqa: F401

        import hftl.runner  # noqa: F401
        from hftl.tasks.classification.task import ClassificationTask

        config = hftl.runner.parse_config(["--model", args.model], None, hftl.runner.task_args("classification"))
        ClassificationTask(config).load_model(config.model, dict(enumerate(CLASSES)))
        first_step()
    if args.child == "hftl":
        import accelerate

        accelerate.Accelerator.backward = lambda self, loss, **kw: first_step()
        from hftl.runner import run

        run("classification", ["--dataset", args.data, "--model", args.model, "--output_dir", args.out,
                               "--image_size", "32", "--batch_size", "32", "--max_steps", "1", "--report_to", "none",
                               "--overwrite_output_dir", "true"])  # fmt: skip
    else:  # the transformers example's data path: load_dataset + with_transform + DataLoader
        import datasets
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        loaded = (
            datasets.load_dataset("imagefolder", data_dir=args.data)
            if (Path(args.data) / "train").is_dir()
            else datasets.load_dataset(args.data)
        )
        processor = AutoImageProcessor.from_pretrained(args.model)
        model = AutoModelForImageClassification.from_pretrained(args.model, num_labels=len(CLASSES))

        def transform(batch):
            images = [im.convert("RGB") for im in batch["image"]]
            return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch["label"]}

        train = loaded["train"].with_transform(transform)

        def collate(items):
            return {k: torch.stack([torch.as_tensor(item[k]) for item in items]) for k in items[0]}

        loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate)
        batch = next(iter(loader))
        model(**batch).loss.backward()
        first_step()


def measure(kind: str, data: Path, model: Path, env: dict) -> dict:
    result = ROOT / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data), "--model", str(model),
           "--out", str(ROOT / "out"), "--result", str(result), "--t0", repr(time.time())]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not result.exists():
        return {"error": proc.stderr[-800:]}
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[1000, 10_000, 100_000, 1_280_000])
    parser.add_argument("--folder_rows", type=int, nargs="*", default=[1000, 10_000, 50_000])
    parser.add_argument("--scan_rows", type=int, nargs="*", default=[100_000])
    parser.add_argument("--scan_shapes", nargs="*", default=["classes", *SCAN_SHAPES],
                        help="the folder-listing trees: classes (10 folders of numbered PNGs, as the folder rows), "
                             "imagenet (ImageNet's names, 1281 a folder: ImageNet-1k's tree at --scan_rows 1281000, "
                             "~65 s to write), small (100 files a folder)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the folder-scan timing")
    parser.add_argument("--keep", action="store_true", help="keep (and reuse) the generated data")
    parser.add_argument("--child"), parser.add_argument("--data"), parser.add_argument("--model")
    parser.add_argument("--out"), parser.add_argument("--result"), parser.add_argument("--t0", type=float)
    args = parser.parse_args()
    if args.child:
        return child(args)
    ROOT.mkdir(parents=True, exist_ok=True)
    model = write_vit_folder(ROOT / "vit-tiny-32", "vit-tiny", 32, len(CLASSES))
    pngs, labels = fashion_pngs()
    rows_out = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    floor = measure("floor", ROOT, model, env)
    print("floor", floor, flush=True)
    cases = [("parquet", n) for n in args.rows] + [("folder", n) for n in args.folder_rows]
    cases += [(f"scan-{shape}", n) for n in args.scan_rows for shape in args.scan_shapes]
    try:
        for layout, n in cases:
            shape = layout.removeprefix("scan-") if layout.removeprefix("scan-") in SCAN_SHAPES else None
            data = ROOT / f"{layout if shape else 'parquet' if layout == 'parquet' else 'folder'}-{n}"
            start = time.perf_counter()
            if not (args.keep and data.exists()):
                shutil.rmtree(data, ignore_errors=True)
                if shape:
                    write_empty_tree(data, n, shape)
                else:
                    (write_parquet if layout == "parquet" else write_folder)(data, n, pngs, labels)
                os.sync()  # the new files' write-back would otherwise run during the timings (1.3x -> 1.7x the walk)
            written = time.perf_counter() - start
            row = {"layout": layout, "rows": n, "write_s": round(written, 1)}
            if layout.startswith("scan"):
                row.update(scan_ratio(data, args.repeats))
                print(row, flush=True)
                rows_out.append(row)
                continue
            if layout == "folder":
                row["scandir_s"] = round(scandir_seconds(data), 2)
            for kind in ("hftl", "plain"):
                cache = ROOT / f"cache-{kind}"
                shutil.rmtree(cache, ignore_errors=True)  # cold: nothing converted or listed yet
                env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parents[1])}
                for launch in ("cold", "warm"):
                    got = measure(kind, data, model, env)
                    row[f"{kind}_{launch}"] = got
                    print(layout, n, kind, launch, got, flush=True)
                shutil.rmtree(cache, ignore_errors=True)
            rows_out.append(row)
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
            save_rows(floor, rows_out)  # after each case: a long run keeps what it measured
    finally:
        if not args.keep:
            shutil.rmtree(ROOT, ignore_errors=True)
    save_rows(floor, rows_out)
    print_table(floor, rows_out)


def save_rows(floor: dict, rows: list[dict]) -> None:
    (ROOT.parent / "scale.json").write_text(json.dumps({"floor": floor, "rows": rows}, indent=1))


def scan_ratio(folder: Path, repeats: int) -> dict:
    """Medians of interleaved timings: a bare os.scandir walk, one keeping the paths, hftl's scan, and hftl's whole
    cold listing (scan, Arrow columns, the listing file written and opened; removing the last repeat's listing first
    is not timed)."""
    import statistics

    from hftl import local_data

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    cache = ROOT / "listing-cache"

    times = {"walk_s": [], "paths_walk_s": [], "scan_s": [], "listing_s": []}
    for _ in range(repeats):
        times["walk_s"].append(scandir_seconds(folder))
        times["paths_walk_s"].append(scandir_paths_seconds(folder))
        times["scan_s"].append(timed(lambda: local_data._scan(folder)))
        shutil.rmtree(cache, ignore_errors=True)  # cold: no listing yet
        times["listing_s"].append(timed(lambda: local_data.load_imagefolder(str(folder), cache_dir=str(cache))))
    out = {k: statistics.median(v) for k, v in times.items()}
    ratios = {k.replace("_s", "_x"): out[k] / out["walk_s"] for k in ("paths_walk_s", "scan_s", "listing_s")}
    return out | ratios


def print_table(floor: dict, rows: list[dict]) -> None:
    def cell(got):
        if "seconds" not in got:
            return "failed"
        anon, file = got["anon_mb"] / 1024, got["file_mb"] / 1024
        return f"{got['seconds']:.1f} s / {got['peak_rss_mb'] / 1024:.2f} GB ({anon:.2f} anon + {file:.2f} file)"

    print(f"floor (imports + model, no data): {cell(floor)}")
    for r in rows:
        if r["layout"].startswith("scan"):
            print(f"folder listing ({r['layout'][5:]}) at {r['rows']:,} files: whole cold listing "
                  f"{r['listing_x']:.2f}x a bare os.scandir walk ({r['listing_s']:.3f} vs {r['walk_s']:.3f} s), "
                  f"hftl's scan alone {r['scan_x']:.2f}x "
                  f"({r['scan_s']:.3f} s); for reference, a walk keeping the paths {r['paths_walk_x']:.2f}x "
                  f"({r['paths_walk_s']:.3f} s)")  # fmt: skip
    print("| data | rows | hftl cold | hftl warm | plain cold | plain warm | os.scandir walk |")
    print("|---|---|---|---|---|---|---|")
    for r in (r for r in rows if not r["layout"].startswith("scan")):
        walk = f"{r['scandir_s']:.2f} s" if "scandir_s" in r else ""
        print(f"| {r['layout']} | {r['rows']:,} | {cell(r['hftl_cold'])} | {cell(r['hftl_warm'])} | "
              f"{cell(r['plain_cold'])} | {cell(r['plain_warm'])} | {walk} |")  # fmt: skip


if __name__ == "__main__":
    main()

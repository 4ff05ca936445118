"""p50/p95 latency per image of the demo Space, end to end (HTTP + queue + preprocessing + model) and in-process.

Usage:
    python bench/space_latency.py                                  # bundled EfficientNet-Lite0 (offline)
    python bench/space_latency.py --model user/my-model --requests 50 --concurrency 4
"""

import argparse
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms   (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hftl/efficientnet-lite0")
    parser.add_argument("--task", default="image-classification")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4, help="parallel clients for the batched run")
    args = parser.parse_args()

    import torch
    from gradio_client import Client, handle_file

    from hftl.spaces.builder import Predictor, build_demo, default_examples, load_pipeline

    image_path = default_examples()[0]  # scikit-learn's china.jpg, 640x427
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    print(f"model {args.model}  task {args.task}  image {image.size}  torch threads {torch.get_num_threads()}")

    pipe = load_pipeline(args.model, args.task)
    predictor = Predictor(pipe, args.task)
    call = predictor.classify if args.task == "image-classification" else predictor.segment
    call([image])  # warm-up
    for batch in (1, 8):
        times = []
        for _ in range(max(3, args.requests // batch)):
            start = time.perf_counter()
            call([image] * batch)
            times.append((time.perf_counter() - start) / batch)
        print(f"in-process, batch {batch}:            {percentiles(times)}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(args.model, args.task, examples=[], pipe=pipe)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    upload = handle_file(image_path)
    client.predict(upload, api_name="/predict")

    local = threading.local()  # one client per thread: a gradio Client's event stream is not shared safely

    def one_request(_=None) -> float:
        if not hasattr(local, "client"):
            local.client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        start = time.perf_counter()
        local.client.predict(upload, api_name="/predict")
        return time.perf_counter() - start

    print(f"HTTP, one client:                  {percentiles([one_request() for _ in range(args.requests)])}")
    start = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        latencies = list(pool.map(one_request, range(args.requests)))
    throughput = args.requests / (time.perf_counter() - start)
    print(f"HTTP, {args.concurrency} clients (batched):      {percentiles(latencies)}   {throughput:.1f} images/s")
    demo.close()


if __name__ == "__main__":
    main()

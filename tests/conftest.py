"""Test session set-up: offline, CPU, and a live local Hub endpoint on 127.0.0.1.

`HF_ENDPOINT` is read by huggingface_hub when it is imported, so it is set here, before any test module imports
hftl, transformers or datasets. The server itself starts lazily (fixture `local_hub` in tests/fixtures/hub.py).
"""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HUB_PORT = _free_port()
_HOME = tempfile.mkdtemp(prefix="hftl-tests-home-")
os.environ["HFTL_TEST_HUB_PORT"] = str(_HUB_PORT)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_HUB_PORT}"
os.environ["HF_HOME"] = os.path.join(_HOME, "hf")
os.environ["HFTL_CACHE"] = os.path.join(_HOME, "hftl")
os.environ.pop("HF_TOKEN", None)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# the local endpoint has no Xet storage; classic LFS is what it speaks (shared/notes/hub-api.md)
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("HFTL_TEST_DEVICE") != "cuda":  # bench/gpu_check.py runs the `device` tests on the GPU
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.data", "tests.fixtures.hub", "tests.fixtures.families"]

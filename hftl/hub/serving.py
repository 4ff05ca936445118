"""Running the local Hub endpoint (`hftl.hub.server`): `hftl hub serve` in the foreground, or a daemon thread for
the quickstart and the tests (`start_in_thread`)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from hftl.hub.server import DEFAULT_MAX_BODY_BYTES, create_app
from hftl.log import get_logger

logger = get_logger(__name__)


def _uvicorn_server(app: FastAPI, host: str, port: int, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", access_log=False)
    return uvicorn.Server(config)


def serve(data_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, **app_kwargs):
    """Run the endpoint in the foreground until interrupted (`hftl hub serve`)."""
    _uvicorn_server(create_app(data_dir, token=token, **app_kwargs), host, port, "info").run()


@dataclass
class HubHandle:
    """A running endpoint: `url`, `port`, `data_dir`, `token`; `stop()` shuts it down."""

    url: str
    port: int
    data_dir: Path
    token: str | None
    _server: object
    _thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)


def main(argv: list[str] | None = None) -> None:
    """`hftl hub serve` arguments; the token comes from $HFTL_HUB_TOKEN (never from argv, which `ps` shows)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="hftl hub serve", description="Serve a local Hugging Face Hub endpoint.")
    parser.add_argument("--data-dir", default=os.path.expanduser("~/.cache/hftl/hub"), help="where repos are stored")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--user", default="hftl", help="user name answered by whoami; owner of repos without namespace"
    )
    parser.add_argument(
        "--lfs-threshold",
        type=int,
        default=None,
        help="answer uploadMode 'lfs' for files larger than this many bytes (clients then need HF_HUB_DISABLE_XET=1); "
        "default: every file is uploaded as 'regular', which works with default client settings",
    )
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger requests get 413")
    parser.add_argument("--anonymous-read", action="store_true", help="with a token: let anyone read public repos")
    args = parser.parse_args(argv)
    token = os.environ.get("HFTL_HUB_TOKEN") or None
    logger.info(
        f"hftl local hub on http://{args.host}:{args.port} (data: {args.data_dir}, token: {'yes' if token else 'no'})"
    )
    logger.info(f"Clients: export HF_ENDPOINT=http://{args.host}:{args.port} before importing huggingface_hub.")
    serve(
        args.data_dir,
        host=args.host,
        port=args.port,
        token=token,
        user=args.user,
        lfs_threshold=args.lfs_threshold,
        max_body_bytes=args.max_body_bytes,
        anonymous_read=args.anonymous_read,
    )


def start_in_thread(
    data_dir: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None, **app_kwargs
) -> HubHandle:
    """Start the endpoint in a daemon thread and return once it accepts connections (port 0 = any free port)."""
    server = _uvicorn_server(create_app(data_dir, token=token, **app_kwargs), host, port, "warning")
    thread = threading.Thread(target=server.run, name="hftl-local-hub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"hftl local hub did not start on {host}:{port} (port in use?)")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    with socket.create_connection((host, port), timeout=5):
        pass
    return HubHandle(f"http://{host}:{port}", port, Path(data_dir), token, server, thread)


if __name__ == "__main__":
    main()

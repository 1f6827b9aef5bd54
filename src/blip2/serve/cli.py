"""``blip2 serve``: the HTTP server on uvicorn, the model loaded once.

SIGTERM / Ctrl-C stop accepting connections, let the requests in flight finish (up to
``--request-timeout`` seconds), then the batcher finishes its queue and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import fields
from pathlib import Path

from .config import ServeConfig

log = logging.getLogger(__name__)

_D = ServeConfig()


def register(subparsers) -> None:
    from ..cli import model_options

    p = subparsers.add_parser(
        "serve",
        parents=[model_options()],
        help="serve the model over HTTP (OpenAI-compatible API)",
        description="OpenAI-compatible HTTP server: /v1/chat/completions, /v1/models, /v1/caption, "
        "/v1/embeddings (retrieval checkpoints), /v1/attention, /v1/search (with --index), /health, "
        "/metrics; and a web page at / to try the model in a browser.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $BLIP2_API_KEY, else open)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients name (default: the --model value, a folder's name for a path)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=_D.max_batch,
        help=f"rows per forward pass; 1 turns batching off (default {_D.max_batch})",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=_D.batch_wait_ms,
        help=f"how long a batch waits to fill (default {_D.batch_wait_ms:g})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=_D.max_queue,
        help=f"requests waiting before 503 (default {_D.max_queue})",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=_D.request_timeout,
        help=f"seconds per request before 504 (default {_D.request_timeout:g})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=_D.max_body_bytes,
        help=f"request body limit (default {_D.max_body_bytes})",
    )
    p.add_argument(
        "--max-image-bytes",
        type=int,
        default=_D.max_image_bytes,
        help=f"one decoded image's bytes (default {_D.max_image_bytes})",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=_D.max_image_pixels,
        help=f"one image's width x height (default {_D.max_image_pixels})",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=_D.max_prompt_tokens,
        help=f"prompt tokens, history included (default {_D.max_prompt_tokens})",
    )
    p.add_argument(
        "--max-output-tokens",
        type=int,
        default=_D.max_output_tokens,
        help=f"largest max_tokens (default {_D.max_output_tokens})",
    )
    p.add_argument(
        "--max-choices", type=int, default=_D.max_choices, help=f"largest n (default {_D.max_choices})"
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (off: only base64 data: URIs)",
    )
    p.add_argument(
        "--remote-image-timeout",
        type=float,
        default=_D.remote_image_timeout,
        help=f"seconds to download a remote image (default {_D.remote_image_timeout:g})",
    )
    p.add_argument(
        "--index",
        default=None,
        metavar="IDX",
        help="an index folder (blip2 index) to search on the web page and at /v1/search",
    )
    p.add_argument("--open", action="store_true", help="open the web page in a browser once the server is up")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    name = args.served_model_name
    if name is None:
        path = Path(args.model)
        name = path.resolve().name if path.is_dir() else str(args.model)
    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    values.update(model_name=name, api_key=args.api_key or os.environ.get("BLIP2_API_KEY") or None)
    return ServeConfig(**values)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        from ..errors import InputError

        raise InputError("blip2 serve needs the serve extra: pip install 'blip2[serve]'") from None
    from ..cli import _load
    from .app import create_app

    cfg = config_from_args(args)
    pipe = _load(args)
    app = create_app(pipe, cfg)
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler it found:
    # a no-op one makes a graceful stop exit 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    if args.open:
        _open_when_up(args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(cfg.request_timeout) + 1,
        access_log=args.log_level == "debug",
    )
    return 0


def _open_when_up(host: str, port: int, wait_s: float = 60.0) -> None:
    """Open the page in the user's browser once the port takes connections (in a background thread)."""
    import socket
    import threading
    import time
    import webbrowser

    address = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://{'[' + address + ']' if ':' in address else address}:{port}/"

    def wait_and_open() -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((address, port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            return
        log.warning("the page: %s", url)
        webbrowser.open(url)

    threading.Thread(target=wait_and_open, name="blip2-open", daemon=True).start()

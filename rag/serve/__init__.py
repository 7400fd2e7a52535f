"""`rag serve`: answers over HTTP, micro-batched on one model worker, with live index reloads and a page.

    rag serve [--config configs/rag/demo.yaml] [--host 127.0.0.1] [--port 8000] [--max-batch 8] ...

One worker thread owns the pipeline (worker.py): it takes a request from the queue, gathers more with the same
options (at most `max_batch`, waiting at most `max_wait_ms`), answers them with one `answer_batch` call, and runs
reloads between batches, so a request never sees half a swap. The queue is bounded: beyond `max_queue` waiting
requests the server answers 503 with Retry-After at once. The routes (app.py) sit behind a guard (guard.py) that
lets only the server's own page drive it. Needs the `serve` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import argparse
import logging

from rag.serve.worker import LIMITS, ServeSettings  # noqa: F401 - importable from rag.serve

log = logging.getLogger(__name__)


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is imported only when an app is made (`rag serve --help` needs none)
        from rag.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'rag.serve' has no attribute {name!r}")


def _check_port(host: str, port: int) -> None:
    import socket

    from rag.errors import BadInput

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host.strip("[]"), port))
    except OSError as e:
        raise BadInput(f"cannot listen on {host}:{port} ({e.strerror}); is another server there? choose another "
                       "--port or --host") from None


def main(argv: list[str] | None = None) -> int:
    d = ServeSettings()
    ap = argparse.ArgumentParser(prog="rag serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="RAG config YAML or a trained folder (default: the embedded demo)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                        "0.0.0.0 exposes the server to the network)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="most questions answered in one batch")
    ap.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                    help="how long the first request of a batch waits for others (milliseconds)")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="waiting requests beyond which the server answers 503 with Retry-After")
    ap.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds a request may wait for its answer "
                                                                      "before a 504")
    ap.add_argument("--watch", type=float, default=d.watch_s, help="seconds between looks at the index folder's "
                                                                  "generation, reloading when it changes (0: only "
                                                                  "POST /reload)")
    ap.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                    help="a Host name (and Origin) the server answers besides loopback names and --host; repeat it "
                         "for each name a proxy or browser uses to reach the server")
    ap.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                    help="seconds a new connection may take to send its request headers")
    args = ap.parse_args(argv)
    from rag.errors import BadInput, quiet_logging, run_cli

    quiet_logging()

    def serve() -> int:
        try:
            import uvicorn
        except ImportError:
            raise BadInput("rag serve needs FastAPI and uvicorn: pip install 'rag-lewis[serve]'") from None
        if not 1 <= args.port <= 65535:
            raise BadInput(f"--port must be between 1 and 65535, got {args.port}")
        settings = ServeSettings(args.max_batch, args.max_wait_ms, args.max_queue, args.timeout, args.watch,
                                 args.host, tuple(args.allow_host), args.header_timeout)
        _check_port(args.host, args.port)  # before minutes of loading: a port in use is one line, not a traceback
        from rag.first_use import load_pipeline
        from rag.serve.app import create_app
        from rag.serve.guard import header_timeout_protocol

        pipe = load_pipeline(args.config, tuple(args.set))
        log.info("serving %s on http://%s:%d", pipe.info()["index"], args.host, args.port)
        uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level="warning",
                    http=header_timeout_protocol(settings.header_timeout_s))
        return 0

    return run_cli(serve)

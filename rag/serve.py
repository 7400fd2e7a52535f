"""`rag serve`: answers over HTTP, micro-batched on one model worker, with live index reloads and a page.

    rag serve [--config configs/rag/demo.yaml] [--host 127.0.0.1] [--port 8000] [--max-batch 8] ...

One worker thread owns the pipeline: it takes a request from the queue, gathers more with the same options (at most
`max_batch`, waiting at most `max_wait_ms`), answers them with one `answer_batch` call, and runs reloads between
batches, so a request never sees half a swap. The queue is bounded: beyond `max_queue` waiting requests the server
answers 503 with Retry-After at once. Needs the `serve` extra (FastAPI, uvicorn).
"""

import argparse
import asyncio
import collections
import contextlib
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib import resources

log = logging.getLogger(__name__)

LIMITS = {"question_chars": 2000, "n_docs": 50, "num_beams": 8, "max_new_tokens": 128, "body_bytes": 16_384}


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    timeout_s: float = 60.0
    watch_s: float = 0.0  # poll the index folder's generation every so often (0: only on POST /reload)
    host: str = "127.0.0.1"  # the address bound; with the names below, the Hosts (and Origins) allowed
    allow_hosts: tuple[str, ...] = ()
    header_timeout_s: float = 10.0  # a new connection must send its request's headers within this

    def __post_init__(self):
        from rag.errors import BadInput

        for name in ("max_batch", "max_queue"):
            if not getattr(self, name) >= 1:
                raise BadInput(f"--{name.replace('_', '-')} must be >= 1")
        finite = {"max_wait_ms": self.max_wait_ms, "timeout": self.timeout_s, "watch": self.watch_s,
                  "header_timeout": self.header_timeout_s}
        for name, value in finite.items():
            if not math.isfinite(value) or value < 0 or (value == 0 and name in ("timeout", "header_timeout")):
                raise BadInput(f"--{name.replace('_', '-')} must be a finite number of seconds "
                               f"({'> 0' if name in ('timeout', 'header_timeout') else '>= 0'}), got {value}")


@dataclass
class Job:
    kind: str  # "answer", "retrieve" or "reload"
    key: tuple  # requests with one key can share a batch
    question: str = ""
    future: Future = field(default_factory=Future)


class Metrics:
    """Counters and histograms in Prometheus' text format (no client library needed for a handful of series)."""

    LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
    BATCH = (1, 2, 4, 8, 16, 32)

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # (endpoint, status) -> count
        self.latency = collections.Counter()  # bucket -> count
        self.latency_sum = 0.0
        self.batches = collections.Counter()
        self.batch_sum = 0
        self.queue_depth = 0

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1
            if endpoint == "/answer" and status == 200:
                self.latency[next((b for b in self.LATENCY if seconds <= b), "+Inf")] += 1
                self.latency_sum += seconds

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches[next((b for b in self.BATCH if size <= b), "+Inf")] += 1
            self.batch_sum += size

    def text(self) -> str:
        with self.lock:
            out = ["# TYPE rag_requests_total counter"]
            out += [f'rag_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in
                    sorted(self.requests.items())]
            out += _histogram("rag_answer_seconds", self.LATENCY, self.latency, self.latency_sum)
            out += _histogram("rag_batch_size", self.BATCH, self.batches, self.batch_sum)
            out += ["# TYPE rag_queue_depth gauge", f"rag_queue_depth {self.queue_depth}"]
        return "\n".join(out) + "\n"


def _histogram(name: str, bounds, counts, total) -> list[str]:
    lines, running = [f"# TYPE {name} histogram"], 0
    for b in (*bounds, "+Inf"):
        running += counts[b]
        lines.append(f'{name}_bucket{{le="{b}"}} {running}')
    return [*lines, f"{name}_sum {total}", f"{name}_count {running}"]


class Busy(Exception):
    """The queue is full."""


class Worker:
    """The one thread that calls the pipeline: micro-batches answers, serialises reloads."""

    def __init__(self, pipe, settings: ServeSettings, metrics: Metrics):
        self.pipe, self.settings, self.metrics = pipe, settings, metrics
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.held: collections.deque[Job] = collections.deque()  # taken while batching, but of another key
        self.waiting = 0
        self.reload: Job | None = None  # the one reload waiting to start: later ones share it
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="rag-model-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job, bounded: bool = True) -> Future:
        with self.lock:
            if job.kind == "reload":  # coalesced: at most one reload waits, whoever asks
                if self.reload is not None:
                    return self.reload.future
                self.reload = job
            elif bounded and self.waiting >= self.settings.max_queue:
                raise Busy
            self.waiting += 1
            self.metrics.queue_depth = self.waiting
        self.jobs.put(job)
        return job.future

    def _next(self, timeout: float | None) -> Job | None:
        if self.held:
            return self.held.popleft()
        try:
            return self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except Exception:  # noqa: BLE001 - a bug in batching must not leave the server answering nothing
                log.exception("the model worker hit an error; it goes on with the next request")

    def _step(self) -> None:
        batch = self._gather()
        with self.lock:
            self.waiting -= len(batch)
            self.metrics.queue_depth = self.waiting
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]  # timed-out ones are dropped
        if not batch:
            return
        try:
            results = self._do(batch)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
            for j in batch:
                j.future.set_exception(e)
            return
        for j, r in zip(batch, results, strict=True):
            j.future.set_result(r)

    def _gather(self) -> list[Job]:
        """The next job, and for an answer the others of its key that arrive within `max_wait_ms`."""
        first = self._next(None)
        if first.kind == "reload":
            with self.lock:
                self.reload = None  # a reload asked for from now on runs after this one
        batch = [first]
        if first.kind == "answer":
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            others = []
            while len(batch) < self.settings.max_batch:
                job = self._next(max(0.0, deadline - time.monotonic()))
                if job is None:
                    break
                (batch if job.kind == "answer" and job.key == first.key else others).append(job)
            self.held.extendleft(reversed(others))
        return batch

    def _do(self, batch: list[Job]) -> list:
        first = batch[0]
        if first.kind == "reload":
            return [self.pipe.reload_index()]
        if first.kind == "retrieve":
            return [self.pipe.retrieve(first.question, first.key[1])[0]]
        mode, n_docs, beams, new_tokens = first.key
        decoding = {k: v for k, v in (("num_beams", beams), ("max_new_tokens", new_tokens)) if v is not None}
        self.metrics.batch(len(batch))
        return self.pipe.answer_batch([j.question for j in batch], mode=mode, decoding=decoding or None,
                                      n_docs=n_docs, batch_size=len(batch))


def create_app(pipe, settings: ServeSettings = ServeSettings()):
    """The FastAPI app over a loaded pipeline (tests build it around tiny models)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    from rag.errors import RagError
    from rag.http_guard import Guard, allowed_hosts

    metrics = Metrics()
    worker = Worker(pipe, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(_watch(pipe, worker, settings.watch_s)) \
            if settings.watch_s > 0 else None
        yield
        if task:
            task.cancel()

    app = FastAPI(title="rag serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics
    app.add_middleware(Guard, hosts=allowed_hosts(settings.host, settings.allow_hosts),
                       body_bytes=LIMITS["body_bytes"])

    class Question(BaseModel):
        model_config = ConfigDict(extra="forbid")  # no field can name a file, a config or a model
        question: str = Field(min_length=1, max_length=LIMITS["question_chars"])

        @field_validator("question")
        @classmethod
        def not_blank(cls, value: str) -> str:  # one blank question would fail its whole batch
            if not value.strip():
                raise ValueError("the question is blank; ask something")
            return value

    class Ask(Question):
        mode: str | None = Field(None, pattern="^(sequence|token)$")
        n_docs: int | None = Field(None, ge=1, le=LIMITS["n_docs"])
        num_beams: int | None = Field(None, ge=1, le=LIMITS["num_beams"])
        max_new_tokens: int | None = Field(None, ge=1, le=LIMITS["max_new_tokens"])

    class Find(Question):
        k: int | None = Field(None, ge=1, le=LIMITS["n_docs"])

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.middleware("http")
    async def count(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        path = request.url.path  # labelled by route, never by a raw path: a client cannot mint new series
        metrics.request(path if path in routes else "(other)", response.status_code, time.perf_counter() - t)
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    async def run(job: Job, timeout: float | None = None):
        try:
            future = worker.submit(job, bounded=job.kind != "reload")
        except Busy:
            return error(503, f"busy: {settings.max_queue} requests are waiting; retry shortly", **{"Retry-After": "1"})
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError:
            future.cancel()  # dropped by the worker if it has not started it
            return error(504, f"no answer within {settings.timeout_s:g} s; the server is overloaded")
        except RagError as e:
            return error(400 if isinstance(e, ValueError) else 500, str(e))

    @app.post("/answer")
    async def answer(body: Ask):
        got = await run(Job("answer", (body.mode, body.n_docs, body.num_beams, body.max_new_tokens), body.question),
                        settings.timeout_s)
        return got if isinstance(got, JSONResponse) else got.to_json()

    @app.post("/retrieve")
    async def retrieve(body: Find):
        got = await run(Job("retrieve", ("retrieve", body.k), body.question), settings.timeout_s)
        return got if isinstance(got, JSONResponse) else {"question": body.question,
                                                           "passages": [asdict(h) for h in got]}

    @app.post("/reload")
    async def reload():
        got = await run(Job("reload", ("reload",)))
        return got if isinstance(got, JSONResponse) else {"generation": got}

    @app.get("/healthz")
    async def healthz():
        if not worker.alive:
            return error(503, "the model worker has stopped; restart the server")
        return {"status": "ok", "generation": pipe.generation}

    @app.get("/info")
    async def info():
        return {**pipe.info(), "serve": asdict(settings), "limits": LIMITS}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.text())

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files("rag").joinpath("page.html").read_text(encoding="utf-8"))

    routes = {r.path for r in app.routes}
    return app


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


async def _watch(pipe, worker: Worker, every: float) -> None:
    """Reload when the index folder's manifest names a new generation (an update or compact finished)."""
    from rag.index_folder import IndexFolder

    folder = IndexFolder(pipe.index_folder)
    failed = None  # a generation that failed to load is not retried until another one appears
    while True:
        await asyncio.sleep(every)
        try:
            generation = folder.read_manifest().get("generation", 0)
        except Exception as e:  # noqa: BLE001 - a folder being rewritten: look again next time
            log.warning("watching %s: %s", folder.path, e)
            continue
        if generation != pipe.generation and generation != failed:
            try:
                await asyncio.wrap_future(worker.submit(Job("reload", ("reload",)), bounded=False))
            except Exception as e:  # noqa: BLE001 - the old generation keeps serving; try the next one
                log.warning("watching %s: generation %d could not be loaded (%s); still serving generation %d",
                            folder.path, generation, e, pipe.generation)
                failed = generation
                continue
            log.info("reloaded %s at generation %d", folder.path, generation)


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
        from rag.http_guard import header_timeout_protocol

        pipe = load_pipeline(args.config, tuple(args.set))
        log.info("serving %s on http://%s:%d", pipe.info()["index"], args.host, args.port)
        uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level="warning",
                    http=header_timeout_protocol(settings.header_timeout_s))
        return 0

    return run_cli(serve)

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
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="rag-model-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job, bounded: bool = True) -> Future:
        with self.lock:
            if bounded and self.waiting >= self.settings.max_queue:
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

    def _run(self) -> None:
        while True:
            first = self._next(None)
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
            with self.lock:
                self.waiting -= len(batch)
                self.metrics.queue_depth = self.waiting
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]  # timed-out ones are dropped
            if not batch:
                continue
            try:
                results = self._do(batch)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
                for j in batch:
                    j.future.set_exception(e)
                continue
            for j, r in zip(batch, results, strict=True):
                j.future.set_result(r)

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


def answer_json(ans) -> dict:
    """What `rag ask --json` prints."""
    return {**asdict(ans), "supported": ans.supported}


def create_app(pipe, settings: ServeSettings = ServeSettings()):
    """The FastAPI app over a loaded pipeline (tests build it around tiny models)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field

    from rag.errors import RagError

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

    class Ask(BaseModel):
        model_config = ConfigDict(extra="forbid")  # no field can name a file, a config or a model
        question: str = Field(min_length=1, max_length=LIMITS["question_chars"])
        mode: str | None = Field(None, pattern="^(sequence|token)$")
        n_docs: int | None = Field(None, ge=1, le=LIMITS["n_docs"])
        num_beams: int | None = Field(None, ge=1, le=LIMITS["num_beams"])
        max_new_tokens: int | None = Field(None, ge=1, le=LIMITS["max_new_tokens"])

    class Find(BaseModel):
        model_config = ConfigDict(extra="forbid")
        question: str = Field(min_length=1, max_length=LIMITS["question_chars"])
        k: int | None = Field(None, ge=1, le=LIMITS["n_docs"])

    def error(status: int, message: str, **headers) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        t = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > LIMITS["body_bytes"]):
            response = error(413, f"request body over {LIMITS['body_bytes']} bytes")
        else:
            response = await call_next(request)
        metrics.request(request.url.path, response.status_code, time.perf_counter() - t)
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
        return got if isinstance(got, JSONResponse) else answer_json(got)

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
        return {"status": "ok", "generation": pipe.model.retriever.index.generation}

    @app.get("/info")
    async def info():
        return {**pipe.info(), "serve": asdict(settings), "limits": LIMITS}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.text())

    @app.get("/")
    async def page():
        return HTMLResponse(resources.files("rag").joinpath("page.html").read_text(encoding="utf-8"))

    return app


async def _watch(pipe, worker: Worker, every: float) -> None:
    """Reload when the index folder's manifest names a new generation (an update or compact finished)."""
    from rag.index_folder import IndexFolder

    folder = IndexFolder(pipe.model.retriever.index.folder)
    while True:
        await asyncio.sleep(every)
        try:
            generation = folder.read_manifest().get("generation", 0)
        except Exception as e:  # noqa: BLE001 - a folder being rewritten: look again next time
            log.warning("watching %s: %s", folder.path, e)
            continue
        if generation != pipe.model.retriever.index.generation:
            await asyncio.wrap_future(worker.submit(Job("reload", ("reload",)), bounded=False))
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
    args = ap.parse_args(argv)
    from rag.cli import quiet_logging
    from rag.errors import BadInput, run_cli

    quiet_logging()

    def serve() -> int:
        try:
            import uvicorn
        except ImportError:
            raise BadInput("rag serve needs FastAPI and uvicorn: pip install 'rag-lewis[serve]'") from None
        for name in ("max_batch", "max_queue", "port"):
            if getattr(args, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be >= 1")
        if args.max_wait_ms < 0 or args.timeout <= 0 or args.watch < 0:
            raise BadInput("--max-wait-ms and --watch must be >= 0, --timeout > 0")
        from rag.first_use import load_pipeline

        pipe = load_pipeline(args.config, tuple(args.set))
        settings = ServeSettings(args.max_batch, args.max_wait_ms, args.max_queue, args.timeout, args.watch)
        log.info("serving %s on http://%s:%d", pipe.info()["index"], args.host, args.port)
        uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level="warning")
        return 0

    return run_cli(serve)

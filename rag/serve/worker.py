"""The model worker of `rag serve`: one thread owns the pipeline, micro-batches answers and serialises reloads;
the settings and the metrics it keeps. Nothing here imports FastAPI."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

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
            results = self._answer_batch(batch)
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

    def _answer_batch(self, batch: list[Job]) -> list:
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


async def watch(pipe, worker: Worker, every: float) -> None:
    """Reload when the index folder's manifest names a new generation (an update or compact finished)."""
    from rag.retrieval.index_folder import IndexFolder

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



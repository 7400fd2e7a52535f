"""The HTTP side of `rag serve`: request models, routes and the app around one model worker (FastAPI).

Routes read the worker, the pipeline and the settings from `app.state`; the guard (Host, Origin, JSON, body size)
runs before any of them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict
from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rag.errors import RagError
from rag.serve.guard import Guard, allowed_hosts
from rag.serve.worker import LIMITS, Busy, Job, Metrics, ServeSettings, Worker, watch


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


routes = APIRouter()


def error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def run(request: Request, job: Job, timeout: float | None = None):
    """Queue `job` on the worker and wait for its result, or the JSON error a client gets instead."""
    worker, settings = request.app.state.worker, request.app.state.settings
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


@routes.post("/answer")
async def answer(body: Ask, request: Request):
    got = await run(request, Job("answer", (body.mode, body.n_docs, body.num_beams, body.max_new_tokens),
                                 body.question), request.app.state.settings.timeout_s)
    return got if isinstance(got, JSONResponse) else got.to_json()


@routes.post("/retrieve")
async def retrieve(body: Find, request: Request):
    got = await run(request, Job("retrieve", ("retrieve", body.k), body.question), request.app.state.settings.timeout_s)
    return got if isinstance(got, JSONResponse) else {"question": body.question, "passages": [asdict(h) for h in got]}


@routes.post("/reload")
async def reload(request: Request):
    got = await run(request, Job("reload", ("reload",)))
    return got if isinstance(got, JSONResponse) else {"generation": got}


@routes.get("/healthz")
async def healthz(request: Request):
    if not request.app.state.worker.alive:
        return error(503, "the model worker has stopped; restart the server")
    return {"status": "ok", "generation": request.app.state.pipe.generation}


@routes.get("/info")
async def info(request: Request):
    return {**request.app.state.pipe.info(), "serve": asdict(request.app.state.settings), "limits": LIMITS}


@routes.get("/metrics")
async def metrics_text(request: Request):
    return PlainTextResponse(request.app.state.metrics.text())


@routes.get("/")
async def page():
    return HTMLResponse(resources.files("rag").joinpath("page.html").read_text(encoding="utf-8"))


async def bad_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return error(422, f"{where}: {first.get('msg', 'invalid')}")


def create_app(pipe, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app over a loaded pipeline (tests build it around tiny models)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    worker = Worker(pipe, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(watch(pipe, worker, settings.watch_s)) \
            if settings.watch_s > 0 else None
        yield
        if task:
            task.cancel()

    app = FastAPI(title="rag serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.pipe, app.state.worker, app.state.metrics, app.state.settings = pipe, worker, metrics, settings
    app.add_middleware(Guard, hosts=allowed_hosts(settings.host, settings.allow_hosts),
                       body_bytes=LIMITS["body_bytes"])
    app.include_router(routes)
    app.add_exception_handler(RequestValidationError, bad_request)
    known = {r.path for r in routes.routes}

    @app.middleware("http")
    async def count(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        path = request.url.path  # labelled by route, never by a raw path: a client cannot mint new series
        metrics.request(path if path in known else "(other)", response.status_code, time.perf_counter() - t)
        return response

    return app

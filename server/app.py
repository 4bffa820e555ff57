"""The Starlette application: routes, middleware, lifespan.

``create_app(completer, cfg)`` takes a ready ``Completer`` or a zero-argument factory that loads
one; with a factory the model loads on a background thread after the socket is listening and
``/health`` answers 503 until it is ready. All state lives on ``app.state.lc`` (``ServerState``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from localcoder import __version__
from localcoder.completion import CompletionResult, Completer
from localcoder.config import Config
from localcoder.errors import LocalcoderError
from localcoder.server import schemas
from localcoder.server.auth import AuthMiddleware, client_identity, resolve_api_key
from localcoder.server.errors import (
    BodyTooLarge,
    NotReady,
    error_body,
    error_response,
    handle_http_exception,
    handle_localcoder_error,
    handle_unexpected,
)
from localcoder.server.metrics import Metrics
from localcoder.server.scheduler import Event, Job, Scheduler

log = logging.getLogger("localcoder.server")

CompleterSource = Completer | Callable[[], Completer]


@dataclass
class ServerState:
    cfg: Config
    metrics: Metrics = field(default_factory=Metrics)
    completer: Completer | None = None
    scheduler: Scheduler | None = None
    load_error: BaseException | None = None
    on_ready: Callable[["ServerState"], None] = lambda state: None
    on_fatal: Callable[[BaseException], None] = lambda exc: None

    def require_ready(self) -> Scheduler:
        if self.scheduler is None:
            if self.load_error is not None:
                raise self.load_error
            raise NotReady("the model is still loading; retry shortly")
        return self.scheduler

    @property
    def model_name(self) -> str:
        return self.completer.engine.model_name if self.completer else self.cfg.model.model


# ---- lifespan ------------------------------------------------------------------------------------


def _start(state: ServerState, completer: Completer) -> None:
    _ = completer.format  # detect the FIM format once, before requests race for it
    state.completer = completer
    state.scheduler = Scheduler(completer, state.cfg.server.max_queue,
                                on_cancel=state.metrics.observe_cancel, on_result=state.metrics.observe_result)
    state.on_ready(state)


def _load_in_background(state: ServerState, factory: Callable[[], Completer]) -> threading.Thread:
    def load() -> None:
        try:
            _start(state, factory())
        except BaseException as exc:  # reported by /health and the CLI
            state.load_error = exc
            log.error("could not load the model: %s", exc)
            state.on_fatal(exc)

    thread = threading.Thread(target=load, name="localcoder-load", daemon=True)
    thread.start()
    return thread


def _lifespan(source: CompleterSource):
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state: ServerState = app.state.lc
        owned = not isinstance(source, Completer)
        if owned:
            _load_in_background(state, source)
        else:
            _start(state, source)
        try:
            yield
        finally:
            if state.scheduler is not None:
                state.scheduler.close()
            if owned and state.completer is not None:
                state.completer.engine.close()

    return lifespan


# ---- middleware ----------------------------------------------------------------------------------


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status; latency to the end of the response."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - t0)


# ---- request plumbing ----------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body ({declared} bytes) exceeds the limit of {limit} bytes", param="body")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes", param="body")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    return schemas.parse_json_body(b"".join(chunks))


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


async def handle_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody is listening; recorded in metrics only


class DisconnectWatch:
    """Waits for ``http.disconnect`` on a request whose body has been read."""

    def __init__(self, receive: Receive):
        self.task = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    def stop(self) -> None:
        self.task.cancel()


async def next_event(job: Job, watch: DisconnectWatch, scheduler: Scheduler) -> Event:
    get = asyncio.ensure_future(job.events.get())
    done, _ = await asyncio.wait({get, watch.task}, return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    scheduler.cancel(job, "disconnect")
    raise ClientGone()


async def wait_result(job: Job, watch: DisconnectWatch, scheduler: Scheduler) -> CompletionResult:
    while True:
        event = await next_event(job, watch, scheduler)
        if event.kind == "error":
            assert event.error is not None
            raise event.error
        if event.kind == "done":
            assert event.result is not None
            return event.result


def lane_of(request: Request, kind: str, value: object | None) -> str | None:
    return None if value is None else f"{client_identity(request.scope)}|{kind}|{value}"


class EventStream(StreamingResponse):
    """SSE response that runs ``on_close`` however it ends (finished, disconnected, cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(obj: Any) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def respond(request: Request, state: ServerState, req, lane: str | None, stream: bool,
                  render_final: Callable[[CompletionResult], dict],
                  render_delta: Callable[[str], dict] | None = None,
                  render_end: Callable[[CompletionResult], dict] | None = None,
                  done_marker: bool = False) -> Response:
    """Queue the request, then answer with one JSON body or an SSE stream of deltas."""
    req.validate()
    scheduler = state.require_ready()
    job = scheduler.submit(req, lane)
    watch = DisconnectWatch(request.receive)
    try:
        if not stream:
            result = await wait_result(job, watch, scheduler)
            if result.stop_type == "cancelled":  # superseded: nothing worth inserting
                result.text = ""
            return JSONResponse(render_final(result))
        first = await next_event(job, watch, scheduler)
        if first.kind == "error":
            assert first.error is not None
            raise first.error
    finally:
        watch.stop()
        if not stream:
            scheduler.cancel(job, "disconnect")  # no-op when finished
    assert render_delta is not None and render_end is not None
    return EventStream(_sse_events(job, first, render_delta, render_end, done_marker),
                       on_close=lambda: scheduler.cancel(job, "disconnect"))


async def _sse_events(job: Job, event: Event, render_delta, render_end, done_marker: bool) -> AsyncIterator[str]:
    while True:
        if event.kind == "delta":
            yield sse(render_delta(event.text))
        elif event.kind == "done":
            assert event.result is not None
            yield sse(render_end(event.result))
            break
        else:
            yield sse(error_body(event.error))
            return
        event = await job.events.get()
    if done_marker:
        yield "data: [DONE]\n\n"


# ---- routes --------------------------------------------------------------------------------------


def _state(request: Request) -> ServerState:
    return request.app.state.lc


async def infill(request: Request) -> Response:
    state = _state(request)
    call = schemas.parse_infill(await read_json(request, state.cfg.server.max_body_bytes), state.cfg.completion)
    model = state.model_name

    def final(result: CompletionResult) -> dict:
        return schemas.select_fields(schemas.infill_response(result, model, call.slot), call.response_fields)

    def delta(text: str) -> dict:
        return {"index": 0, "content": text, "stop": False, "id_slot": call.slot or 0}

    def end(result: CompletionResult) -> dict:
        return {**schemas.infill_response(result, model, call.slot), "content": ""}

    return await respond(request, state, call.request, lane_of(request, "slot", call.slot), call.stream,
                         final, delta, end)


async def completions(request: Request) -> Response:
    state = _state(request)
    body = await read_json(request, state.cfg.server.max_body_bytes)
    state.require_ready()  # the raw-FIM parser needs the model's format
    if schemas.is_tabby(body):
        return await _tabby(request, state, body)
    assert state.completer is not None
    call = schemas.parse_openai(body, state.cfg.completion, state.completer.format)
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), state.model_name

    def choice(text: str, finish: str | None) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def head() -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": model}

    def final(result: CompletionResult) -> dict:
        return {**head(), "choices": [choice(result.text, schemas.openai_finish_reason(result.stop_type))],
                "usage": schemas.openai_usage(result)}

    def delta(text: str) -> dict:
        return {**head(), "choices": [choice(text, None)]}

    def end(result: CompletionResult) -> dict:
        return {**head(), "choices": [choice("", schemas.openai_finish_reason(result.stop_type))],
                "usage": schemas.openai_usage(result)}

    lane = lane_of(request, "user", call.user)
    return await respond(request, state, call.request, lane, call.stream, final, delta, end, done_marker=True)


async def _tabby(request: Request, state: ServerState, body: dict) -> Response:
    call = schemas.parse_tabby(body, state.cfg.completion)
    cid = f"cmpl-{uuid.uuid4()}"

    def final(result: CompletionResult) -> dict:
        return {"id": cid, "choices": [{"index": 0, "text": result.text}]}

    return await respond(request, state, call.request, lane_of(request, "path", call.path), False, final)


async def health(request: Request) -> Response:
    state = _state(request)
    state.require_ready()
    return JSONResponse({"status": "ok"})


async def tabby_health(request: Request) -> Response:
    state = _state(request)
    state.require_ready()
    engine = state.completer.engine  # type: ignore[union-attr]
    return JSONResponse({
        "model": engine.model_name, "device": engine.device, "arch": platform.machine(),
        "cpu_info": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "cuda_devices": [],
        "version": {"build_date": "", "build_timestamp": "", "git_sha": "", "git_describe": f"localcoder-{__version__}"},
    })


async def models(request: Request) -> Response:
    state = _state(request)
    meta: dict[str, Any] = {"ready": state.scheduler is not None}
    if state.completer is not None:
        engine = state.completer.engine
        meta.update(engine=engine.name, device=engine.device, n_ctx=engine.n_ctx,
                    fim_format=state.completer.format.name)
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": int(state.metrics.started),
         "owned_by": "localcoder", "meta": meta}]})


async def metrics(request: Request) -> Response:
    state = _state(request)
    sched = state.scheduler
    gauges = {
        "queue_depth": lambda: sched.depth if sched else 0,
        "engine_busy": lambda: int(sched.busy) if sched else 0,
        "ready": lambda: int(sched is not None),
    }
    return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")


ROUTES = [
    Route("/infill", infill, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/v1/health", tabby_health, methods=["GET", "POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


def create_app(completer: CompleterSource, cfg: Config, *,
               on_ready: Callable[[ServerState], None] | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> Starlette:
    state = ServerState(cfg)
    if on_ready is not None:
        state.on_ready = on_ready
    if on_fatal is not None:
        state.on_fatal = on_fatal
    middleware = []
    origins = [o.strip() for o in cfg.server.cors_origins.split(",") if o.strip()]
    if origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(MetricsMiddleware, metrics=state.metrics))
    api_key = resolve_api_key(cfg.server)
    if api_key:
        middleware.append(Middleware(AuthMiddleware, api_key=api_key))
    app = Starlette(routes=ROUTES, middleware=middleware, lifespan=_lifespan(completer),
                    exception_handlers={LocalcoderError: handle_localcoder_error,
                                        HTTPException: handle_http_exception,
                                        ClientGone: handle_client_gone,
                                        Exception: handle_unexpected})
    app.state.lc = state
    return app

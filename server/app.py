"""The Starlette application: routes, middleware, lifespan.

``create_app(completer, cfg)`` takes a ready ``Completer`` or a zero-argument factory that loads
one; with a factory the model loads on the engine client's worker thread after the socket is
listening and ``/health`` answers 503 until it is ready. Every route talks to the one engine client
(``localcoder.client.InProcessClient``). All state lives on ``app.state.lc`` (``ServerState``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
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
from localcoder.client import CompleterSource, Delta, Generation, InProcessClient
from localcoder.completion import CompletionResult, Completer
from localcoder.engines.base import Timings
from localcoder.config import Config
from localcoder.errors import LocalcoderError
from localcoder.server import schemas
from localcoder.server.auth import AuthMiddleware, client_identity, resolve_api_key
from localcoder.server.errors import (
    BodyTooLarge,
    error_body,
    handle_http_exception,
    handle_localcoder_error,
    handle_unexpected,
)
from localcoder.server.guard import GuardMiddleware
from localcoder.server.metrics import Metrics

log = logging.getLogger("localcoder.server")


@dataclass
class ServerState:
    cfg: Config
    metrics: Metrics = field(default_factory=Metrics)
    client: InProcessClient | None = None
    on_ready: Callable[["ServerState"], None] = lambda state: None
    on_fatal: Callable[[BaseException], None] = lambda exc: None

    def require_ready(self) -> InProcessClient:
        assert self.client is not None
        self.client.require_ready()
        return self.client

    @property
    def completer(self) -> Completer | None:
        return self.client.completer if self.client is not None and self.client.ready else None

    @property
    def load_error(self) -> BaseException | None:
        return self.client.load_error if self.client is not None else None

    @property
    def model_name(self) -> str:
        return self.completer.engine.model_name if self.completer else self.cfg.model.model


# ---- lifespan ------------------------------------------------------------------------------------


def _lifespan(source: CompleterSource):
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state: ServerState = app.state.lc

        def ready(client: InProcessClient) -> None:
            state.client = client  # a fast load is ready on the worker thread before the constructor returns
            state.on_ready(state)

        state.client = InProcessClient(source, max_queue=state.cfg.server.max_queue,
                                       on_cancel=state.metrics.observe_cancel,
                                       on_result=state.metrics.observe_result,
                                       on_ready=ready, on_error=state.on_fatal)
        try:
            yield
        finally:
            await state.client.close()

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


async def next_delta(gen: Generation, watch: DisconnectWatch) -> Delta:
    nxt = asyncio.ensure_future(gen.__anext__())
    done, _ = await asyncio.wait({nxt, watch.task}, return_when=asyncio.FIRST_COMPLETED)
    if nxt in done:
        return nxt.result()
    nxt.cancel()
    gen.cancel("disconnect")
    raise ClientGone()


CLIENT_HEADER = "x-localcoder-client"


def lane_of(request: Request, kind: str, value: object | None) -> str | None:
    """The supersession key: a newer request on the same lane cancels the older one.

    A lane is (who, which client, kind, value): who is the API key's digest or the peer host; the
    client is the ``X-Localcoder-Client`` header when sent (our LSP and editor plugins send one per
    process), else the TCP connection. Two editors on one machine that both use llama.vim's
    ``id_slot: 0`` thus never cancel each other; a client that closes its connection to make a new
    request is cancelled by the disconnect instead.
    """
    if value is None:
        return None
    client = request.headers.get(CLIENT_HEADER)
    if not client:
        peer = request.scope.get("client")
        client = f"conn:{peer[1]}" if peer else "conn:?"
    return f"{client_identity(request.scope)}|{client[:64]}|{kind}|{value}"


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
            self.on_close()  # cancels a generation still running


def sse(obj: Any) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def respond(request: Request, state: ServerState, req, lane: str | None, stream: bool,
                  render_final: Callable[[CompletionResult], dict],
                  render_delta: Callable[[str], dict] | None = None,
                  render_end: Callable[[CompletionResult], dict] | None = None,
                  done_marker: bool = False) -> Response:
    """Queue the request, then answer with one JSON body or an SSE stream of deltas. The client
    validates it first (400), then checks that the model is loaded (503)."""
    client = state.client
    assert client is not None
    if req.max_tokens == 0 and not stream:  # llama.vim's warm-up: prefill at the lowest priority
        client.prefill(req, lane)
        return JSONResponse(render_final(CompletionResult("", "limit", req.mode, Timings(), False, 0)))
    gen = client.generate(req, lane, deltas=stream)  # a JSON answer needs only the result
    watch = DisconnectWatch(request.receive)
    try:
        first = await next_delta(gen, watch)
        if not stream:
            result = first.result
            while result is None:
                result = (await next_delta(gen, watch)).result
            if result.stop_type == "cancelled":  # superseded: nothing worth inserting
                result.text = ""
            return JSONResponse(render_final(result))
    except BaseException:
        gen.cancel("disconnect")
        raise
    finally:
        watch.stop()
    assert render_delta is not None and render_end is not None
    return EventStream(_sse_events(gen, first, render_delta, render_end, done_marker),
                       on_close=lambda: gen.cancel("disconnect"))


async def _sse_events(gen: Generation, delta: Delta, render_delta, render_end, done_marker: bool
                      ) -> AsyncIterator[str]:
    while True:
        if delta.result is not None:
            yield sse(render_end(delta.result))
            break
        yield sse(render_delta(delta.text))
        try:
            delta = await gen.__anext__()
        except Exception as exc:  # typed errors end the stream with an error event
            yield sse(error_body(exc))
            return
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

    lane = lane_of(request, "lane", call.lane) if call.lane else lane_of(request, "slot", call.slot)
    return await respond(request, state, call.request, lane, call.stream,
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
                "usage": schemas.openai_usage(result), **schemas.checked_field(result)}

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
    """503 while loading (or failed); else ``status: ok`` with the model, the queue and, where the
    engine has them, its cache slots (memory per slot) and its remote server's health."""
    client = _state(request).require_ready()
    return JSONResponse(await client.health())


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
    meta: dict[str, Any] = {"ready": state.completer is not None}
    if state.completer is not None:
        engine = state.completer.engine
        meta.update(engine=engine.name, device=engine.device, n_ctx=engine.n_ctx,
                    fim_format=state.completer.format.name)
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": int(state.metrics.started),
         "owned_by": "localcoder", "meta": meta}]})


async def metrics(request: Request) -> Response:
    state = _state(request)
    client = state.client
    ready = client is not None and client.ready
    gauges: dict[str, Callable[[], float]] = {
        "queue_depth": lambda: client.depth if client else 0,
        "engine_busy": lambda: int(client.busy) if client else 0,
        "ready": lambda: int(ready),
    }
    if client is not None:
        stats = client.stats
        gauges.update(background_prefills_total=lambda: stats.prefills,
                      background_prefills_cancelled_total=lambda: stats.prefills_cancelled)
        for name, value in client.counters().items():  # the engine's own numbers (a remote's, the fake's)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                gauges[name] = lambda value=value: value
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
    middleware.append(Middleware(GuardMiddleware, cfg=cfg.server))  # Host (rebinding) + JSON-only POSTs
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

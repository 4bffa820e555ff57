"""The one engine client every surface talks to, in the shape vLLM's engine client has.

    async for delta in client.generate(request, key):   # text deltas; the last one carries .result
        ...
    await complete(client, request, key)                # only the result (no per-token deltas)
    await client.abort(key)                             # stop the live request on that key
    await client.health()                               # a dict: status, model, queue, cache
    client.prefill(request, key)                        # warm the KV cache at the lowest priority

Two implementations:

- ``InProcessClient``: the engine lives in this process. One worker thread owns it (engines run one
  generation at a time); requests wait in a bounded FIFO (``QueueFull`` past ``max_queue``); a
  newer request on the same key supersedes the older one (it stops before its next token, or never
  starts); closing the async iterator cancels the request. Background prefills run only when no
  real request waits, newest first; any real request, and any newer prefill, cancels a running one. A
  request answered from the jump window (``Completer.jump_window``, right after a cursor jump) queues the
  prefill of its full window.
- ``HttpClient``: a running ``localcoder serve``. Requests stream over ``POST /infill``; superseding
  or aborting closes the stream, and the server cancels the generation when its client goes away,
  so the server's engine really stops.

``open_client(cfg)`` is the composition root for the clients: ``lsp.server_url`` set -> HTTP,
else in-process over ``Completer.from_config(cfg)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from localcoder.completion import CompletionResult, Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import CancelToken, Timings
from localcoder.errors import (BackendUnavailable, InvalidRequest, LocalcoderError, ModelNotFound, NotReady,
                               QueueFull, Unauthorized)

log = logging.getLogger("localcoder.client")

MAX_BACKGROUND = 4  # pending background prefills kept (the newest per key)


@dataclass
class Delta:
    """Text that inserts after the previous deltas; the last delta of a request carries ``result``."""

    text: str
    result: CompletionResult | None = None


@dataclass
class ClientStats:
    submitted: int = 0
    superseded: int = 0  # replaced by a newer request on the same key
    aborted: int = 0  # abort(key) or the caller went away
    started: int = 0  # generations the engine actually began
    skipped: int = 0  # cancelled before the engine reached them
    prefills: int = 0  # background prefills run
    prefills_cancelled: int = 0


class Generation:
    """One request's deltas: ``async for delta in generation``; ``cancel()`` from any task or thread
    stops it (the last delta then carries a cancelled result); ``aclose()`` when the caller leaves."""

    def __init__(self, deltas: AsyncIterator[Delta], cancel: Callable[[str], None]):
        self._deltas, self._cancel = deltas, cancel

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> Delta:
        return await self._deltas.__anext__()

    def cancel(self, reason: str = "aborted") -> None:
        self._cancel(reason)

    async def aclose(self) -> None:
        self._cancel("disconnect")  # a no-op when it already finished
        try:
            await self._deltas.aclose()  # type: ignore[attr-defined]
        except RuntimeError:  # being iterated by another task: it ends by itself after the cancel
            pass


class EngineClient(Protocol):
    description: str
    stats: ClientStats

    def generate(self, request: InfillRequest, key: str | None = None, *, deltas: bool = True) -> Generation: ...

    async def abort(self, key: str) -> None: ...

    def prefill(self, request: InfillRequest, key: str | None = None) -> None: ...

    def forget(self, path: str | None, repo: str | None = None, key: str | None = None) -> None:
        """The editor closed this document: drop what is kept for it (its specialist's sticky route)."""

    async def health(self) -> dict[str, Any]: ...

    async def wait_ready(self, timeout_s: float | None = None) -> None: ...

    def counters(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


async def complete(client: EngineClient, request: InfillRequest, key: str | None = None) -> CompletionResult:
    """Run one request to the end and return its result. No deltas are sent on the way: a caller that
    wants only the result does not pay a thread hand-off and an event-loop wake-up per token."""
    gen = client.generate(request, key, deltas=False)
    try:
        async for delta in gen:
            if delta.result is not None:
                return delta.result
    finally:
        await gen.aclose()
    raise BackendUnavailable("the engine ended the request without a result")


def cancelled_result(req: InfillRequest) -> CompletionResult:
    return CompletionResult("", "cancelled", req.mode, Timings(cancelled=True), False, 0)


# ---- in-process ----------------------------------------------------------------------------------


@dataclass
class _Event:
    kind: str  # delta | done | error
    text: str = ""
    result: CompletionResult | None = None
    error: BaseException | None = None


@dataclass
class Job:
    request: InfillRequest
    key: str | None
    loop: asyncio.AbstractEventLoop | None
    background: bool = False
    deltas: bool = True  # False: only the final event is posted (the caller wants just the result)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: CancelToken = field(default_factory=CancelToken)
    id: int = 0
    cancel_reason: str | None = None  # superseded | aborted | disconnect | preempted | shutdown
    finished: bool = False

    def post(self, event: _Event) -> None:
        if self.loop is None or (event.kind == "delta" and not self.deltas):
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (shutting down)
            pass


CompleterSource = Completer | Callable[[], Completer]


class InProcessClient:
    """The engine in this process behind one worker thread (see the module docstring)."""

    def __init__(self, source: CompleterSource, *, max_queue: int = 16,
                 on_cancel: Callable[[str], None] = lambda reason: None,
                 on_result: Callable[[CompletionResult], None] = lambda result: None,
                 on_ready: Callable[["InProcessClient"], None] = lambda client: None,
                 on_error: Callable[[BaseException], None] = lambda exc: None):
        self.completer: Completer | None = source if isinstance(source, Completer) else None
        self._factory = None if isinstance(source, Completer) else source  # set: the engine is ours to close
        self.load_error: BaseException | None = None
        self.max_queue = max_queue
        self.stats = ClientStats()
        self._on_cancel, self._on_result = on_cancel, on_result
        self._on_ready, self._on_error = on_ready, on_error
        self._waiting: deque[Job] = deque()
        self._background: deque[Job] = deque()
        self._keys: dict[str, Job] = {}
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._ids = itertools.count(1)
        self._stopping = False
        self._service_s = 0.5  # moving average of a request's time (for Retry-After)
        if self.completer is not None:  # ready at once (FIM format checked here, not at the first request)
            _ = self.completer.format
            self._ready.set()
        self._thread = threading.Thread(target=self._work, name="localcoder-engine", daemon=True)
        self._thread.start()

    # ---- state ----------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        if self.completer is None:
            return "in-process (loading)"
        engine = self.completer.engine
        return f"{engine.name}:{engine.model_name}"

    @property
    def ready(self) -> bool:
        return self.completer is not None and self._ready.is_set()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None and not self._running.background

    @property
    def background(self) -> int:
        """Background prefills running or queued (``/health``; a bench waits for 0 before timing another server)."""
        return len(self._background) + bool(self._running is not None and self._running.background)

    def require_ready(self) -> Completer:
        if not self.ready:
            if self.load_error is not None:
                raise self.load_error
            raise NotReady("the model is still loading; retry shortly")
        assert self.completer is not None
        return self.completer

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        ok = self._ready.is_set() or await asyncio.to_thread(self._ready.wait, timeout_s)
        if self.load_error is not None:
            raise self.load_error
        if not ok:
            raise NotReady("the model is still loading; retry shortly")

    # ---- requests -------------------------------------------------------------------------------
    def generate(self, request: InfillRequest, key: str | None = None, *, deltas: bool = True) -> Generation:
        """Queue ``request`` now (``QueueFull`` / ``NotReady`` / ``InvalidRequest`` raise here); with
        ``deltas=False`` the generation yields only the final delta (the one carrying the result)."""
        job = self._submit(request, key, asyncio.get_running_loop(), background=False)
        job.deltas = deltas
        return Generation(_job_deltas(job), lambda reason: self.cancel(job, reason))

    def prefill(self, request: InfillRequest, key: str | None = None) -> None:
        """Warm the cache for ``request``'s prompt when nothing else waits; never delays a real request."""
        warm = InfillRequest(**{**request.__dict__, "max_tokens": 0})
        self._submit(warm, key, None, background=True)

    def forget(self, path: str | None, repo: str | None = None, key: str | None = None) -> None:
        completer = self.completer
        if completer is not None and completer.router is not None:
            from localcoder.specialists import routing_key

            for doc in {routing_key(path, repo, key), key}:  # by its path, or by the client's key when it had none
                if doc:
                    completer.router.forget(doc)

    async def abort(self, key: str) -> None:
        with self._cond:
            job = self._keys.get(key)
            if job is not None:
                self._cancel_locked(job, "aborted")

    def cancel(self, job: Job, reason: str) -> None:
        with self._cond:
            self._cancel_locked(job, reason)

    async def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.ready else ("error" if self.load_error else "loading"),
                               "queue_depth": self.depth, "engine_busy": self.busy, "background": self.background}
        if self.load_error is not None:
            out["error"] = str(self.load_error)
        if self.completer is not None:
            engine = self.completer.engine
            out.update(model=engine.model_name, engine=engine.name, device=engine.device, n_ctx=engine.n_ctx)
            try:
                out["fim_order"] = self.completer.order  # the prompt layout requests get
            except LocalcoderError:  # a model without FIM tokens: requests say so, health does not fail
                out["fim_order"] = None
            if getattr(engine, "weights", None):  # the GGUF file llama.cpp serves (a requantized copy: gguf_type)
                out["weights"] = engine.weights
            if hasattr(engine, "drafter"):  # llama.cpp's greedy speculative decoding (--speculation)
                out["speculation"] = getattr(engine.drafter, "kind", "off") if engine.drafter is not None else "off"
            adapter = getattr(engine, "adapter", None)
            if adapter:  # a LoRA layout adapter: its file and what it teaches
                out["adapter"] = {k: v for k, v in adapter.items() if k != "recipe"}
            if self.completer.router is not None:  # a specialist bundle: its adapters and their requests
                out["specialists"] = self.completer.router.summary()
            for name in ("cache_info", "health"):  # optional engine capabilities (slots, a remote server)
                fn = getattr(engine, name, None)
                if callable(fn):
                    out["cache" if name == "cache_info" else "remote"] = await asyncio.to_thread(fn)
        return out

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.completer is not None:
            engine = self.completer.engine
            out.update(engine=engine.name, model=engine.model_name)
            counters = getattr(engine, "counters", None)  # optional: the fake's decode steps, a remote's
            if counters is not None:
                out.update(counters())
        return out

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, *self._background, *([self._running] if self._running else [])]:
                self._cancel_locked(job, "shutdown")
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._factory is not None and self.completer is not None:
            self.completer.engine.close()

    # ---- queue (any thread, under the lock) -----------------------------------------------------
    def _submit(self, request: InfillRequest, key: str | None, loop, *, background: bool) -> Job:
        request.validate()  # bad input is answered now, not after its turn in the queue
        self.require_ready()
        job = Job(request, key, loop, background=background, id=next(self._ids))
        with self._cond:
            if self._stopping:
                raise BackendUnavailable("the engine is shutting down")
            if background:
                self._queue_background_locked(job)
            else:
                self._queue_locked(job)
            self._cond.notify()
        return job

    def _queue_locked(self, job: Job) -> None:
        if job.key is not None and job.key in self._keys:
            self._cancel_locked(self._keys[job.key], "superseded")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later",
                            retry_after_s=max(1, math.ceil(self._service_s * (len(self._waiting) + 1))))
        if self._running is not None and self._running.background:
            self._cancel_locked(self._running, "preempted")
        self.stats.submitted += 1
        self._waiting.append(job)
        if job.key is not None:
            self._keys[job.key] = job

    def _queue_background_locked(self, job: Job) -> None:
        if self._running is not None and self._running.background:
            # the newest place first: a warm-up still running for an older one stops (what it prefilled stays
            # in its slot, and a later warm-up of the same prompt goes on from there)
            self._cancel_locked(self._running, "preempted")
        for old in [j for j in self._background if j.key == job.key]:
            self._background.remove(old)
        self._background.append(job)
        while len(self._background) > MAX_BACKGROUND:
            self._background.popleft()

    def _cancel_locked(self, job: Job, reason: str) -> None:
        if job.finished or job.cancel.cancelled:
            return
        job.cancel.cancel()
        job.cancel_reason = reason
        if job.background:
            self.stats.prefills_cancelled += 1
            if job in self._background:
                self._background.remove(job)
            return
        if reason == "superseded":
            self.stats.superseded += 1
        elif reason in ("aborted", "disconnect"):
            self.stats.aborted += 1
        self._on_cancel(reason)
        if job in self._waiting:  # never started: answer now, free its place in the queue
            self._waiting.remove(job)
            self.stats.skipped += 1
            self._finish_locked(job, _Event("done", result=cancelled_result(job.request)))

    def _finish_locked(self, job: Job, event: _Event) -> None:
        job.finished = True
        if job.key is not None and self._keys.get(job.key) is job:
            del self._keys[job.key]
        job.post(event)

    # ---- worker thread --------------------------------------------------------------------------
    def _load(self) -> bool:
        if self.completer is None:
            assert self._factory is not None
            try:
                completer = self._factory()
                _ = completer.format  # NotFimCapable now rather than at the first keystroke
                completer.prepare()  # and the first keystroke does not build token healing's table (~1.2 s)
                self.completer = completer
            except BaseException as exc:
                self.load_error = exc
                log.error("could not load the model: %s", exc)
                self._ready.set()
                self._on_error(exc)
                return False
        self._ready.set()
        self._on_ready(self)
        return True

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._background and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._running = self._waiting.popleft() if self._waiting else self._background.pop()
            return self._running

    def _work(self) -> None:
        if not self._load():
            return
        while (job := self._next()) is not None:
            t0 = time.perf_counter()
            event = self._run(job)
            with self._cond:
                self._running = None
                if not job.background:
                    self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - t0)
                if event.result is not None and event.result.timings.window == "jump" and not self._stopping:
                    # answered from the small window after a jump: warm the full one when the engine is idle.
                    # Queued before the answer is posted, so whoever sees the answer also sees the prefill
                    # (``background`` in /health: the bench waits for it before timing another server; the
                    # condition's lock is reentrant).
                    with contextlib.suppress(LocalcoderError):  # the answer is posted whatever happens here
                        self.prefill(job.request, f"{job.key}#window")
                self._finish_locked(job, event)

    def _run(self, job: Job) -> _Event:
        assert self.completer is not None
        if job.background:
            self.stats.prefills += 1
        else:
            self.stats.started += 1
        try:
            stream = self.completer.stream(job.request, job.cancel, job.key)
            for delta in stream:
                job.post(_Event("delta", delta))
            assert stream.result is not None
            if not job.background:
                self._on_result(stream.result)
            return _Event("done", result=stream.result)
        except Exception as exc:  # typed errors go to the caller; others are logged
            if not isinstance(exc, LocalcoderError):
                log.exception("completion failed")
            return _Event("error", error=exc)


async def _job_deltas(job: Job) -> AsyncIterator[Delta]:
    queue, held = job.events, None
    while True:
        event, held = held or await queue.get(), None
        if event.kind == "delta":  # deltas that arrived while the caller was busy go out as one
            text = [event.text]
            while not queue.empty():
                nxt = queue.get_nowait()
                if nxt.kind != "delta":
                    held = nxt
                    break
                text.append(nxt.text)
            yield Delta("".join(text))
        elif event.kind == "done":
            yield Delta("", event.result)
            return
        else:
            assert event.error is not None
            raise event.error


# ---- HTTP: a running `localcoder serve` ----------------------------------------------------------


def infill_body(req: InfillRequest) -> dict[str, Any]:
    """The ``/infill`` body that carries everything an in-process request would use."""
    s = req.sampling
    body: dict[str, Any] = {
        "input_prefix": req.prefix, "input_suffix": req.suffix,
        "input_extra": [{"filename": sn.path, "text": sn.text} for sn in req.snippets],
        "n_predict": req.max_tokens, "t_max_predict_ms": req.time_budget_ms, "stream": True,
        "stop": list(req.stop), "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed,
        "cache_prompt": req.cache_prompt, "mode": req.mode,
    }
    if req.indent:
        body["n_indent"] = req.indent
    for name in ("path", "repo", "language", "order"):
        if getattr(req, name):
            body[name] = getattr(req, name)
    if req.budget is not None:
        body.update(prefix_tokens=req.budget.prefix_tokens, suffix_tokens=req.budget.suffix_tokens,
                    extra_tokens=req.budget.extra_tokens)
    check = getattr(req, "check", None)
    if check is not None:  # a checked completion: the server samples, writes tests and runs them
        body.update(check="tests", candidates=check.candidates, check_tests=check.tests, n_predict=check.max_tokens,
                    temperature=check.temperature, top_p=check.top_p, top_k=check.top_k, seed=check.seed)
    return body


def result_from_infill(data: dict[str, Any], text: str, req: InfillRequest) -> CompletionResult:
    t = data.get("timings") or {}
    evaluated, cached = int(t.get("prompt_n", 0) or 0), int(t.get("cache_n", 0) or 0)
    timings = Timings(prompt_n=evaluated + cached, cached_n=cached, prompt_ms=float(t.get("prompt_ms", 0) or 0),
                      predicted_n=int(t.get("predicted_n", 0) or 0),
                      predicted_ms=float(t.get("predicted_ms", 0) or 0),
                      specialist=t.get("specialist"), route_ms=float(t.get("route_ms", 0) or 0),
                      adapter_switch_ms=float(t.get("adapter_switch_ms", 0) or 0))
    stop = str(data.get("stop_reason") or data.get("stop_type") or "limit")
    timings.cancelled = stop == "cancelled"
    if isinstance(data.get("checked"), dict):  # the evidence of a checked completion (infill_body's check)
        from localcoder.checked import CheckedResult

        return CheckedResult(text, stop, req.mode, timings, bool(data.get("truncated", False)), evaluated + cached,
                             checked=data["checked"])
    return CompletionResult(text, stop, req.mode, timings, bool(data.get("truncated", False)), evaluated + cached)


class HttpClient:
    """A running ``localcoder serve`` through ``POST /infill`` with ``stream: true``."""

    def __init__(self, url: str, *, api_key: str = "", timeout_s: float = 120.0):
        import httpx

        self.url = url.rstrip("/")
        self.description = f"http:{self.url}"
        self.client_id = uuid.uuid4().hex  # the server scopes supersession by it (X-Localcoder-Client)
        headers = {"X-Localcoder-Client": self.client_id}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers,
                                       timeout=httpx.Timeout(timeout_s, connect=3.0))
        self._live: dict[str, asyncio.Event] = {}
        self.stats = ClientStats()

    def _unreachable(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"cannot reach localcoder serve at {self.url}: {exc.__class__.__name__}",
                                  hint="start it with `localcoder serve` or fix serverUrl")

    def generate(self, request: InfillRequest, key: str | None = None, *, deltas: bool = True) -> Generation:
        request.validate()
        stop = asyncio.Event()
        if key is not None:
            if key in self._live:
                self._live[key].set()
                self.stats.superseded += 1
            self._live[key] = stop
        self.stats.submitted += 1
        return Generation(self._stream(request, key, stop, deltas), lambda reason: stop.set())

    async def _stream(self, request: InfillRequest, key: str | None, stop: asyncio.Event,
                      deltas: bool = True) -> AsyncIterator[Delta]:
        import httpx

        body = infill_body(request)
        if key is not None:
            body["lane"] = key
        try:
            async with self._http.stream("POST", "/infill", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    kind, message = _error_body(response)
                    raise http_error(response.status_code, kind, message, self.url)
                self.stats.started += 1
                async for delta in self._events(response, request, stop):
                    if deltas or delta.result is not None:
                        yield delta
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        finally:
            if key is not None and self._live.get(key) is stop:
                del self._live[key]

    async def _events(self, response, request: InfillRequest, stop: asyncio.Event) -> AsyncIterator[Delta]:
        import json

        text = []
        lines = response.aiter_lines()
        while True:
            line = await _next_or_stop(lines, stop)
            if stop.is_set():  # superseded or aborted: leaving closes the stream, the server stops
                yield Delta("", cancelled_result(request))
                return
            if line is None:
                raise BackendUnavailable(f"{self.url} closed the stream before the end")
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                err = data["error"]
                raise http_error(500, err.get("type"), str(err.get("message", "")), self.url)
            if data.get("stop"):
                yield Delta("", result_from_infill(data, "".join(text), request))
                return
            piece = str(data.get("content", ""))
            if piece:
                text.append(piece)
                yield Delta(piece)

    def forget(self, path: str | None, repo: str | None = None, key: str | None = None) -> None:
        """Nothing to send: the server keeps routes per path in a bounded LRU (``Router.max_documents``)."""

    async def abort(self, key: str) -> None:
        if key in self._live:
            self._live[key].set()
            self.stats.aborted += 1

    def prefill(self, request: InfillRequest, key: str | None = None) -> None:
        """Warm the server's cache: an ``n_predict: 0`` request, as llama.vim sends."""
        body = {**infill_body(request), "n_predict": 0, "stream": False}

        async def send() -> None:
            try:
                await self._http.post("/infill", json=body)
            except Exception:  # a warm-up that fails costs nothing
                pass

        try:
            asyncio.get_running_loop().create_task(send())
        except RuntimeError:
            pass

    async def health(self) -> dict[str, Any]:
        import httpx

        try:
            r = await self._http.get("/health", timeout=3.0)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if r.status_code != 200:
            kind, message = _error_body(r)
            raise http_error(r.status_code, kind, message, self.url)
        return {"status": "ok", "server_url": self.url, **r.json()}

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        await self.health()  # fail early (at start-up) when the server is not there

    def counters(self) -> dict[str, Any]:
        return {"engine": "http", "server_url": self.url, "http_requests": self.stats.submitted}

    async def close(self) -> None:
        await self._http.aclose()


async def _next_or_stop(lines: AsyncIterator[str], stop: asyncio.Event) -> str | None:
    """The next line of the stream, or None as soon as ``stop`` is set (or the stream ends)."""
    nxt = asyncio.ensure_future(lines.__anext__())
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({nxt, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if nxt in done:
        try:
            return nxt.result()
        except StopAsyncIteration:
            return None
    nxt.cancel()
    return None


def _error_body(r: Any) -> tuple[str | None, str]:
    """(error type, message) from an OpenAI/llama.cpp-style error body."""
    try:
        err = r.json().get("error")
    except ValueError:
        return None, r.text[:200]
    if isinstance(err, dict):
        return err.get("type"), str(err.get("message", ""))
    return None, str(err or r.text[:200])


def _kinds() -> dict[str, type[LocalcoderError]]:
    import localcoder.errors as errors

    out = {}
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, LocalcoderError) and obj is not QueueFull:
            out.setdefault(obj.kind, obj)
    return out


def http_error(status: int, kind: str | None, message: str, url: str) -> LocalcoderError:
    """The server's error back to our typed errors: by its ``type`` field, else by HTTP status."""
    cls = _kinds().get(kind or "")
    if cls is not None:
        return cls(f"{url}: {message}")
    if status == 429:
        return QueueFull(f"{url} is busy: {message}")
    if status in (401, 403):
        return Unauthorized(f"{url} refused the request: {message}", hint="check the server's API key")
    if status == 404:
        return ModelNotFound(f"{url}: {message}")
    if 400 <= status < 500:
        return InvalidRequest(f"{url} rejected the request: {message}")
    return BackendUnavailable(f"{url} failed with HTTP {status}: {message}")


# ---- composition root ----------------------------------------------------------------------------


def open_client(cfg: Config, *, pull: bool = False, **hooks: Any) -> EngineClient:
    """The client for ``cfg``: HTTP when ``lsp.server_url`` is set, else the engine in this process
    (loaded on the client's worker thread; ``wait_ready`` / ``health`` tell when it is up)."""
    if cfg.lsp.server_url:
        return HttpClient(cfg.lsp.server_url, api_key=cfg.lsp.server_api_key)
    return InProcessClient(lambda: Completer.from_config(cfg, pull=pull), max_queue=cfg.server.max_queue, **hooks)

"""One worker thread that owns the engine; a bounded FIFO of jobs; supersession and cancellation.

Engines run one generation at a time, so every completion runs on this single thread and the
event loop only awaits events. A job's events (text deltas, then the result or an error) cross to
the loop with ``call_soon_threadsafe``. Fairness: first come, first served, and a client has at
most one live job per lane (a newer request on the same lane cancels the older one), so one busy
editor cannot starve another.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from localcoder.completion import CompletionResult, Completer, InfillRequest
from localcoder.engines.base import CancelToken, Timings
from localcoder.errors import QueueFull

log = logging.getLogger("localcoder.server")


@dataclass
class Event:
    kind: str  # delta | done | error
    text: str = ""
    result: CompletionResult | None = None
    error: BaseException | None = None


@dataclass
class Job:
    request: InfillRequest
    lane: str | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: CancelToken = field(default_factory=CancelToken)
    id: int = 0
    cancel_reason: str | None = None  # disconnect | superseded | shutdown
    finished: bool = False

    def post(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (server shutting down)
            pass


def cancelled_result(req: InfillRequest) -> CompletionResult:
    return CompletionResult("", "cancelled", req.mode, Timings(cancelled=True), False, 0)


class Scheduler:
    def __init__(self, completer: Completer, max_queue: int,
                 on_cancel: Callable[[str], None] = lambda reason: None,
                 on_result: Callable[[CompletionResult], None] = lambda result: None):
        self.completer = completer
        self.max_queue = max_queue
        self._on_cancel = on_cancel
        self._on_result = on_result
        self._waiting: deque[Job] = deque()
        self._lanes: dict[str, Job] = {}
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._service_s = 0.5  # moving average of job time (for Retry-After)
        self._thread = threading.Thread(target=self._work, name="localcoder-engine", daemon=True)
        self._thread.start()

    # ---- loop side ------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def submit(self, request: InfillRequest, lane: str | None) -> Job:
        job = Job(request, lane, asyncio.get_running_loop(), id=next(self._ids))
        with self._cond:
            if lane is not None and lane in self._lanes:
                self._cancel_locked(self._lanes[lane], "superseded")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later",
                                retry_after_s=self._retry_after_locked())
            self._waiting.append(job)
            if lane is not None:
                self._lanes[lane] = job
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        with self._cond:
            self._cancel_locked(job, reason)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._waiting) + ([self._running] if self._running else []):
                self._cancel_locked(job, "shutdown")
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _cancel_locked(self, job: Job, reason: str) -> None:
        if job.finished or job.cancel.cancelled:
            return
        job.cancel.cancel()
        job.cancel_reason = reason
        self._on_cancel(reason)
        if job in self._waiting:  # never started: answer now, free its place in the queue
            self._waiting.remove(job)
            self._finish_locked(job, Event("done", result=cancelled_result(job.request)))

    def _finish_locked(self, job: Job, event: Event) -> None:
        job.finished = True
        if job.lane is not None and self._lanes.get(job.lane) is job:
            del self._lanes[job.lane]
        job.post(event)

    def _retry_after_locked(self) -> int:
        return max(1, math.ceil(self._service_s * (len(self._waiting) + 1)))

    # ---- worker thread --------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _work(self) -> None:
        while (job := self._next()) is not None:
            t0 = time.perf_counter()
            event = self._run(job)
            with self._cond:
                self._running = None
                self._service_s = 0.8 * self._service_s + 0.2 * (time.perf_counter() - t0)
                self._finish_locked(job, event)

    def _run(self, job: Job) -> Event:
        try:
            stream = self.completer.stream(job.request, job.cancel)
            for delta in stream:
                job.post(Event("delta", delta))
            assert stream.result is not None
            self._on_result(stream.result)
            return Event("done", result=stream.result)
        except Exception as exc:  # typed errors go to the client; others are logged 500s
            if not hasattr(exc, "kind"):
                log.exception("completion failed")
            return Event("error", error=exc)

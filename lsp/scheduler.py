"""One generation at a time, the newest request per document wins, nothing leaks.

Engines are not thread-safe and a generation blocks for seconds on a CPU, so generations run in a
single worker thread, never on pygls' event loop. For each document only the latest request
matters: a new one cancels the previous ticket (its generation stops before the next token, or
never starts if it is still waiting for the worker or its debounce). ``$/cancelRequest`` cancels
the asyncio task awaiting the ticket; we cancel the ticket too, so the engine really stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from localcoder.completion import InfillRequest
from localcoder.engines.base import CancelToken
from localcoder.lsp.backends import Backend, Completion

log = logging.getLogger("localcoder.lsp")


@dataclass
class Ticket:
    key: str
    seq: int
    cancel: CancelToken = field(default_factory=CancelToken)

    @property
    def superseded(self) -> bool:
        return self.cancel.cancelled


@dataclass
class SchedulerStats:
    requests: int = 0
    superseded: int = 0  # replaced by a newer request for the same document
    cancelled: int = 0  # $/cancelRequest from the client
    generations: int = 0  # backend calls actually started
    skipped: int = 0  # cancelled before the worker reached them


class Scheduler:
    def __init__(self, backend: Callable[[], Backend]):
        self._backend = backend  # called in the worker: opens the backend lazily
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localcoder-engine")
        self._latest: dict[str, Ticket] = {}
        self._seq = itertools.count(1)
        self.stats = SchedulerStats()

    def issue(self, key: str) -> Ticket:
        """A ticket for a new request on ``key``; the previous one is cancelled."""
        self.stats.requests += 1
        prev = self._latest.get(key)
        if prev is not None and not prev.cancel.cancelled:
            prev.cancel.cancel()
            self.stats.superseded += 1
        ticket = Ticket(key, next(self._seq))
        self._latest[key] = ticket
        return ticket

    def release(self, ticket: Ticket) -> None:
        if self._latest.get(ticket.key) is ticket:
            del self._latest[ticket.key]

    def cancel_all(self) -> None:
        for t in list(self._latest.values()):
            t.cancel.cancel()

    async def run(self, ticket: Ticket, make_request: Callable[[], InfillRequest | None],
                  debounce_s: float = 0.0) -> Completion | None:
        """Wait out the debounce, then generate in the worker. None when superseded or empty."""
        try:
            if debounce_s > 0:
                await asyncio.sleep(debounce_s)
            if ticket.superseded:
                return None
            req = make_request()  # snapshot the document now, after the debounce
            if req is None:
                return None
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self._worker, self._generate, ticket, req)
            return None if ticket.superseded else result
        except asyncio.CancelledError:
            ticket.cancel.cancel()
            self.stats.cancelled += 1
            raise
        finally:
            self.release(ticket)

    async def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` in the worker (backend loading, docstrings): serialised with generations."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def _generate(self, ticket: Ticket, req: InfillRequest) -> Completion | None:
        if ticket.superseded:
            self.stats.skipped += 1
            return None
        backend = self._backend()
        self.stats.generations += 1
        return backend.complete(req, ticket.cancel)

    def shutdown(self) -> None:
        self.cancel_all()
        self._worker.shutdown(wait=False, cancel_futures=True)

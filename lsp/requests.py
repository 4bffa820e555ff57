"""What is LSP-specific about running a completion: the debounce, and "the newest request per
document wins".

The engine client (``localcoder.client``) owns the engine thread, the queue and cancellation; here a
new request for a document marks the previous one superseded at once (its generation stops before
its next token, or it never leaves its debounce), and ``$/cancelRequest`` cancels the asyncio task
awaiting it, which cancels its generation too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from localcoder.client import EngineClient, Generation
from localcoder.completion import CompletionResult, InfillRequest

log = logging.getLogger("localcoder.lsp")


@dataclass
class Ticket:
    key: str
    seq: int
    superseded: bool = False
    generation: Generation | None = None

    def supersede(self) -> None:
        self.superseded = True
        if self.generation is not None:
            self.generation.cancel("superseded")


@dataclass
class RequestStats:
    requests: int = 0
    superseded: int = 0  # replaced by a newer request for the same document
    cancelled: int = 0  # $/cancelRequest from the client
    generations: int = 0  # requests that left their debounce and went to the engine
    skipped: int = 0  # superseded before they went to the engine
    typed_through: int = 0  # answered from the suggestion being typed into (no model call, localcoder.typed)


@dataclass
class Requests:
    _latest: dict[str, Ticket] = field(default_factory=dict)
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))
    stats: RequestStats = field(default_factory=RequestStats)
    specialists: Counter = field(default_factory=Counter)  # results by specialist adapter (a specialist bundle)

    def issue(self, key: str) -> Ticket:
        """A ticket for a new request on ``key``; the previous one is superseded."""
        self.stats.requests += 1
        prev = self._latest.get(key)
        if prev is not None and not prev.superseded:
            prev.supersede()
            self.stats.superseded += 1
        ticket = Ticket(key, next(self._seq))
        self._latest[key] = ticket
        return ticket

    def release(self, ticket: Ticket) -> None:
        if self._latest.get(ticket.key) is ticket:
            del self._latest[ticket.key]

    def cancel_all(self) -> None:
        for ticket in list(self._latest.values()):
            ticket.supersede()

    async def run(self, client: EngineClient, ticket: Ticket, make_request: Callable[[], InfillRequest | None],
                  debounce_s: float = 0.0) -> CompletionResult | None:
        """Wait out the debounce, then complete. None when superseded or nothing to ask."""
        try:
            if debounce_s > 0:
                await asyncio.sleep(debounce_s)
            await client.wait_ready()  # the first request after start waits for the model to load
            if ticket.superseded:
                self.stats.skipped += 1
                return None
            req = make_request()  # snapshot the document now, after the debounce
            if req is None:
                return None
            self.stats.generations += 1
            t0 = time.perf_counter()
            ticket.generation = gen = client.generate(req, ticket.key, deltas=False)  # the result only
            result = None
            try:
                async for delta in gen:
                    result = delta.result or result
            finally:
                await gen.aclose()
            if result is None or ticket.superseded or result.stop_type == "cancelled":
                return None
            result.elapsed_ms = (time.perf_counter() - t0) * 1000
            self.stats.typed_through += bool(result.timings.reused)
            if result.timings.specialist is not None:
                self.specialists[result.timings.specialist] += 1
            return result
        except asyncio.CancelledError:
            self.stats.cancelled += 1
            raise
        finally:
            self.release(ticket)

"""Connection limits for uvicorn: read timeouts and a cap on connections.

uvicorn bounds the idle time between requests (``timeout_keep_alive``), the size of an incomplete
request head (``h11_max_incomplete_event_size``) and the number of connections plus running
requests (``limit_concurrency``: beyond it a request gets 503), but it waits forever for a client
that sends half its headers or half its body. ``TimedH11Protocol`` adds both deadlines: the
request head must be complete within ``header_timeout_s`` of its first byte (or of the
connection), the body within ``body_timeout_s`` of the head; otherwise the connection is closed
(the route, if it was reading, sees a disconnect). h11's size bound only covers a head still
incomplete when a read ends, so a whole oversized head in one read would pass: the protocol
measures the head itself and answers 431 (JSON body, ``param: headers``) beyond ``max_header_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from localcoder.config import ServerConfig

log = logging.getLogger("localcoder.server")


class TimedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 16384

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._head = b""  # the bytes of the request head read so far (bounded by max_header_bytes)
        self._rejected = False
        self._arm(self.header_timeout_s, "request head")

    def data_received(self, data: bytes) -> None:
        if self._rejected:  # answered 431: the rest of what the client sends is read and dropped
            return
        if self._deadline is None and self._between_requests():
            self._arm(self.header_timeout_s, "request head")  # a new request begins on a kept-alive connection
        if self._between_requests() and self._head_too_large(data):
            return
        super().data_received(data)
        if not self._between_requests():
            self._head = b""
        if self.conn.their_state is h11.SEND_BODY and self._what == "request head":
            self._arm(self.body_timeout_s, "request body")
        elif self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()

    def _head_too_large(self, data: bytes) -> bool:
        """True (and a 431 sent, the connection closed) when the head being read is over the limit."""
        self._head = (self._head + data)[: self.max_header_bytes + 4]
        end = self._head.find(b"\r\n\r\n")
        if (end < 0 and len(self._head) <= self.max_header_bytes) or 0 <= end <= self.max_header_bytes:
            return False
        import json

        from localcoder.server.errors import HeadersTooLarge, error_body

        body = json.dumps(error_body(HeadersTooLarge(
            f"the request head is larger than {self.max_header_bytes} bytes", param="headers"))).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self._disarm()
        # close our side but keep reading (and dropping) a moment: closing with unread bytes would send a
        # reset that can destroy the 431 before the client reads it
        self._rejected = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(2.0, self.transport.close)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._what = what
        self._deadline = self.loop.call_later(seconds, self._expired, seconds, what)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()  # type: ignore[union-attr]
        self._deadline, self._what = None, ""

    def _expired(self, seconds: float, what: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            peer = "%s:%d" % self.client if self.client else "?"
            log.warning("closing the connection from %s: its %s took longer than %gs", peer, what, seconds)
            self.transport.close()


def uvicorn_options(cfg: ServerConfig) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.Config`` that bound what a client can hold."""
    protocol = type("TimedH11Protocol", (TimedH11Protocol,),
                    {"header_timeout_s": float(cfg.header_timeout_s), "body_timeout_s": float(cfg.body_timeout_s),
                     "max_header_bytes": cfg.max_header_bytes})
    return {"http": protocol, "timeout_keep_alive": cfg.keep_alive_s, "limit_concurrency": cfg.max_connections,
            "h11_max_incomplete_event_size": cfg.max_header_bytes}

"""The LSP wire: frames in, JSON-RPC messages checked, lifecycle enforced. Nothing goes unanswered.

pygls reads frames with a loop that trusts the client: a ``Content-Length`` of 10**12 makes it
allocate that much (``MemoryError``), and one non-numeric, negative, lower-case, too small or too
large length leaves it waiting for a body that never comes, deaf to everything after. Here:

- ``read_frames`` finds headers case-insensitively; a length that is not a number, is 0 or is over
  ``max_message_bytes`` is answered with a JSON-RPC error (``id: null``) and the reader skips to
  the next ``Content-Length`` header. A body that is cut short (the client stops sending for
  ``BODY_IDLE_S``), or that holds the start of the next frame, is answered with an error carrying
  the request's id, and the next frame is read normally.
- ``LocalcoderProtocol`` checks messages: strings must be strings (``"text": 5`` is invalid
  params, not the text "5"); a request with malformed params gets an InvalidParams response
  (pygls would drop it); an unknown method gets -32601 even without ``params``.
- Lifecycle (LSP spec): a request before ``initialize`` gets -32002, one after ``shutdown`` gets
  InvalidRequest; notifications then are dropped, except ``exit``, which exits 1 without a prior
  ``shutdown``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
from typing import Any, BinaryIO, Callable

import cattrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcServerNotInitialized,
)
from pygls.io_ import StdoutWriter
from pygls.protocol import LanguageServerProtocol

log = logging.getLogger("localcoder.lsp")

BODY_IDLE_S = 2.0  # a body that stops arriving for this long is taken as cut short
_HEADER = re.compile(rb"content-length[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?\n$", re.IGNORECASE)
_FIELD = re.compile(rb"^[!-9;-~]+[ \t]*:[^\r\n]*\r?\n$")  # any other header field (Content-Type)
_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')


# ---- messages --------------------------------------------------------------------------------------
class _Answered:
    """Stands in for a message that was already answered (or dropped) while being parsed."""

    jsonrpc = "2.0"


_ANSWERED = _Answered()


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, cattrs.ClassValidationError):
        return "; ".join(cattrs.transform_error(exc, path="$"))
    return str(exc) if exc else "malformed message"


def _strict_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


class LocalcoderProtocol(LanguageServerProtocol):
    def __init__(self, server, converter):
        super().__init__(server, converter)
        converter.register_structure_hook(str, _strict_str)  # cattrs would turn 5 into "5"
        self._initialized = False

    # ---- replies that pygls cannot make ----------------------------------------------------------
    def reply_error(self, msg_id: Any, exc: JsonRpcException) -> None:
        """An error response; ``msg_id`` None is sent as ``"id": null`` (parse errors)."""
        err = exc.to_response_error()
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": err.code, "message": err.message}})

    def warn_user(self, text: str) -> None:
        log.warning(text)
        self.notify(types.WINDOW_SHOW_MESSAGE, types.ShowMessageParams(types.MessageType.Error, f"localcoder: {text}"))

    # ---- parsing ------------------------------------------------------------------------------------
    def _handles(self, method: Any) -> bool:
        return isinstance(method, str) and (method in self.fm.features or method in self.fm.builtin_features)

    def structure_message(self, data: dict[str, Any]):
        if not isinstance(data, dict) or "jsonrpc" not in data:
            return data
        if "method" in data and "params" not in data and not self._handles(data["method"]):
            data = {**data, "params": None}  # unknown method: answer -32601, not a params error
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            method = data.get("method")
            text = f"invalid params for {method}: {_describe(exc.__cause__)}"
            if "id" in data and "method" in data:
                if self._lifecycle_error(method) is not None:
                    self.reply_error(data["id"], self._lifecycle_error(method))  # type: ignore[arg-type]
                else:
                    log.warning(text)
                    self.reply_error(data["id"], JsonRpcInvalidParams(message=text))
            elif str(method).startswith("textDocument/did"):  # the document is now out of step: say so
                self.warn_user(f"ignored {text}")
            else:
                log.warning("ignored message: %s", text)
            return _ANSWERED

    # ---- lifecycle ----------------------------------------------------------------------------------
    def _lifecycle_error(self, method: Any) -> JsonRpcException | None:
        if method is None or method == types.EXIT:
            return None
        if self._shutdown:
            return JsonRpcInvalidRequest(message=f"{method}: the server is shut down; only exit is accepted")
        if not self._initialized and method != types.INITIALIZE:
            return JsonRpcServerNotInitialized(message=f"{method}: the server is not initialized; send initialize first")
        if self._initialized and method == types.INITIALIZE:
            return JsonRpcInvalidRequest(message="initialize was already received")
        return None

    def handle_message(self, message):
        if message is _ANSWERED:
            return
        method, is_request = getattr(message, "method", None), hasattr(message, "id")
        if getattr(message, "jsonrpc", None) != self.VERSION:
            if is_request:
                self.reply_error(message.id, JsonRpcInvalidRequest(message='"jsonrpc" must be "2.0"'))
            return
        error = self._lifecycle_error(method)
        if error is not None:
            if is_request:
                self.reply_error(message.id, error)
            else:
                log.info("dropped notification %s: %s", method, error.message)
            return
        if method == types.INITIALIZE:
            self._initialized = True
        super().handle_message(message)


# ---- frames --------------------------------------------------------------------------------------------
class Inbox:
    """Bytes from the client (fed by a pump), read as lines or as counts with an idle deadline."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.eof = False
        self._more = asyncio.Event()

    def feed(self, data: bytes) -> None:
        if data:
            self.buf += data
        else:
            self.eof = True
        self._more.set()

    async def _wait(self, timeout: float | None = None) -> bool:
        self._more.clear()
        try:
            await asyncio.wait_for(self._more.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def line(self, limit: int) -> bytes | None:
        """The next line with its ``\\n`` (the rest at EOF; None when nothing is left). A line longer
        than ``limit`` is junk: only its last bytes are kept, where a header may end."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                out = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return out
            if self.eof:
                out = bytes(self.buf)
                self.buf.clear()
                return out or None
            if len(self.buf) > limit:
                del self.buf[: len(self.buf) - 256]
            start = len(self.buf)
            await self._wait()

    async def take(self, n: int, idle_s: float) -> bytes:
        """``n`` bytes, or fewer when the client stops sending for ``idle_s`` or closes."""
        while len(self.buf) < n and not self.eof:
            if not await self._wait(idle_s):
                break
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def unread(self, data: bytes) -> None:
        self.buf[:0] = data


def parse_length(value: bytes, limit: int) -> tuple[int | None, str | None]:
    """(length, None) or (None, why the header is unusable)."""
    shown = value[:40].decode("latin-1")
    if not value.isdigit():
        return None, f"invalid Content-Length {shown!r}: message skipped"
    if len(value) > 18 or int(value) > limit:
        return None, (f"Content-Length {shown} exceeds the limit of {limit} bytes (lsp setting "
                      "max_message_bytes): message skipped")
    if int(value) == 0:
        return None, "Content-Length 0: empty message skipped"
    return int(value), None


async def read_frames(inbox: Inbox, protocol: LocalcoderProtocol, limit: int, stop: threading.Event,
                      on_error: Callable[[Exception, Any], Any] | None = None) -> None:
    """Read frames until EOF (or ``stop``) and hand each message to ``protocol``."""
    length: int | None = None
    while not stop.is_set():
        line = await inbox.line(limit)
        if line is None:
            break
        header = _HEADER.search(line)
        if header is not None:
            if header.start() > 0:
                log.warning("skipped %d bytes before a Content-Length header", header.start())
            length, problem = parse_length(header.group(1), limit)
            if problem is not None:
                log.warning(problem)
                protocol.reply_error(None, JsonRpcParseError(message=problem))
        elif line in (b"\r\n", b"\n"):
            if length is not None:
                body = await inbox.take(length, BODY_IDLE_S)
                dispatch(protocol, inbox, body, length, on_error)
            length = None
        elif not _FIELD.match(line):
            log.warning("skipped %d bytes that are not part of a frame", len(line))


def _frame_error(protocol: LocalcoderProtocol, body: bytes, text: str) -> None:
    found = _ID.search(body)
    msg_id = json.loads(found.group(1)) if found else None
    log.warning(text)
    protocol.reply_error(msg_id, JsonRpcParseError(message=text))


def dispatch(protocol: LocalcoderProtocol, inbox: Inbox, body: bytes, declared: int,
             on_error: Callable[[Exception, Any], Any] | None = None) -> None:
    """Parse one frame's body; a frame whose length does not match its body is answered, not run."""
    if len(body) < declared:
        _frame_error(protocol, body, f"Content-Length {declared} but the body ended after {len(body)} bytes")
        return
    try:
        text = body.decode("utf-8")
        start = len(text) - len(text.lstrip())
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except UnicodeDecodeError as exc:
        return _frame_error(protocol, body, f"the message is not valid UTF-8 (byte {exc.start})")
    except json.JSONDecodeError as exc:
        return _frame_error(protocol, body, f"malformed JSON ({exc.msg} at byte {exc.pos}): Content-Length "
                                            f"{declared} may be wrong")
    except RecursionError:
        return _frame_error(protocol, body, "the message is nested too deeply")
    rest = text[end:]
    if rest.strip():
        at = rest.lower().find("content-length")
        if at >= 0:
            inbox.unread(rest[at:].encode("utf-8"))  # the next frame began inside this one
        return _frame_error(protocol, body, f"Content-Length {declared} is larger than the message "
                                            f"({len(text[:end].encode('utf-8'))} bytes)")
    if not isinstance(obj, dict):
        protocol.reply_error(None, JsonRpcInvalidRequest(message="a message must be a JSON object (no batches)"))
        return
    try:
        message = protocol.structure_message(obj)
        if not hasattr(message, "jsonrpc"):
            protocol.reply_error(obj.get("id"), JsonRpcInvalidRequest(message='not a JSON-RPC 2.0 message'))
            return
        protocol.handle_message(message)
    except Exception as exc:
        log.exception("unable to handle message")
        if on_error is not None:
            on_error(exc, JsonRpcException)


# ---- pumps: where the bytes come from ---------------------------------------------------------------------
def pump_file(stdin: BinaryIO, inbox: Inbox, loop: asyncio.AbstractEventLoop) -> None:
    """A daemon thread reads whatever arrives and feeds it to the loop. It reads the descriptor, not
    the buffered file: a daemon thread blocked inside a BufferedReader aborts interpreter exit."""
    try:
        fd = stdin.fileno()
        read: Callable[[int], bytes] = lambda n: os.read(fd, n)
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests)
        read = getattr(stdin, "read1", stdin.read)

    def run() -> None:
        while True:
            try:
                data = read(1 << 16)
            except (OSError, ValueError):
                data = b""
            try:
                loop.call_soon_threadsafe(inbox.feed, data)
            except RuntimeError:  # the loop is closed: the server has exited
                return
            if not data:
                return

    threading.Thread(target=run, name="lsp-stdin", daemon=True).start()


async def pump_stream(reader: asyncio.StreamReader, inbox: Inbox) -> None:
    while True:
        data = await reader.read(1 << 16)
        inbox.feed(data)
        if not data:
            return


class FramedServer:
    """Mixin for a pygls ``LanguageServer``: stdio and TCP through ``read_frames``.

    ``exit`` raises SystemExit(1) without a prior ``shutdown``; pygls swallows it and the process
    exits 0, so here the code is passed on (``localcoder lsp`` then exits with it).
    """

    def max_message_bytes(self) -> int:
        cfg = getattr(self, "config", None)
        return cfg.lsp.max_message_bytes if cfg is not None else 64 << 20

    async def _serve(self, inbox: Inbox) -> None:
        await read_frames(inbox, self.protocol, self.max_message_bytes(), self._stop_event,  # type: ignore[attr-defined]
                          self.report_server_error)  # type: ignore[attr-defined]

    def _start_io_async(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        self._stop_event = threading.Event()
        self.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))  # type: ignore[attr-defined]

        async def main() -> None:
            inbox = Inbox()
            pump_file(stdin or sys.stdin.buffer, inbox, asyncio.get_running_loop())
            await self._serve(inbox)

        self._run(main)

    def start_tcp(self, host: str, port: int) -> None:
        self._stop_event = threading.Event()

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.protocol.set_writer(writer)  # type: ignore[attr-defined]
            inbox = Inbox()
            pump = asyncio.ensure_future(pump_stream(reader, inbox))
            try:
                await self._serve(inbox)
            finally:
                pump.cancel()
                self.shutdown()  # type: ignore[attr-defined]

        async def main() -> None:
            self._server = await asyncio.start_server(connection, host, port)
            async with self._server:
                await self._server.serve_forever()

        self._run(main)

    def _run(self, main: Callable[[], Any]) -> None:
        code = 0
        try:
            asyncio.run(main())
        except BrokenPipeError:
            log.error("the connection to the client is lost; shutting down")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except (KeyboardInterrupt, asyncio.CancelledError):
            pass
        finally:
            self.shutdown()  # type: ignore[attr-defined]
        if code:
            raise SystemExit(code)

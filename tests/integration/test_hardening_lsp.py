"""Hostile LSP input (issue 12): broken frames, lifecycle gaps, bad didChange, lone surrogates.

Each test runs the real `localcoder lsp` (fake engine) over stdio and writes the exact bytes of the
case; ``Wire`` reads the server's frames back with a deadline, so a silent server fails the test.
"""

from __future__ import annotations

import atexit
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time

import pytest
from lsp_helpers import fake_server, server_env

CONFIG_HOME = tempfile.mkdtemp(prefix="lc-hard-lsp-")
atexit.register(shutil.rmtree, CONFIG_HOME, True)
URI = "file:///work/proj/a.py"


def frame(obj, length: int | None = None, header: str = "Content-Length") -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode("utf-8")
    return f"{header}: {len(body) if length is None else length}\r\n\r\n".encode("ascii") + body


def req(msg_id, method: str, params=None) -> dict:
    out = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    if params is not None:
        out["params"] = params
    return out


def note(method: str, params=None) -> dict:
    return {"jsonrpc": "2.0", "method": method, "params": params if params is not None else {}}


INIT = req(1, "initialize", {"processId": None, "rootUri": "file:///work/proj", "capabilities": {}})


class Wire:
    """`localcoder lsp` as a child process, spoken to in raw bytes."""

    def __init__(self, *flags: str, **env: str):
        self.proc = subprocess.Popen(fake_server(*flags), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=server_env(CONFIG_HOME, **env))
        self.inbox: queue.Queue = queue.Queue()
        self.log: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.log.extend(iter(self.proc.stderr.readline, b"")), daemon=True).start()

    def stderr(self) -> str:
        return b"".join(self.log[-30:]).decode("utf-8", "replace")

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line == b"\r\n":
                    break
            self.inbox.put(json.loads(out.read(length)))

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def expect(self, match, timeout: float = 10.0) -> dict:
        """The next message for which ``match(msg)`` holds (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"the server said nothing matching in time; stderr:\n{self.stderr()}"
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                raise AssertionError(f"the server went silent; stderr:\n{self.stderr()}") from None
            if match(msg):
                return msg

    def reply(self, msg_id, timeout: float = 10.0) -> dict:
        return self.expect(lambda m: m.get("id") == msg_id and "method" not in m, timeout)

    def shown(self, timeout: float = 10.0) -> str:
        return self.expect(lambda m: m.get("method") == "window/showMessage", timeout)["params"]["message"]

    def initialize(self) -> None:
        self.send(frame(INIT))
        assert "capabilities" in self.reply(1)["result"]
        self.send(frame(note("initialized")))

    def alive(self, msg_id=900) -> None:
        """The server still answers a well-formed request."""
        self.send(frame(req(msg_id, "localcoder/stats", {})))
        assert "result" in self.reply(msg_id), "no answer after the broken frame"

    def finish(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.send(frame(req(999, "shutdown")))
            self.reply(999)  # the spec's order: exit only after shutdown's response
            self.send(frame(note("exit")))
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def wire():
    w = Wire()
    w.initialize()
    yield w
    w.finish()


# ---- frames -------------------------------------------------------------------------------------------


def test_huge_content_length_is_refused_not_a_memory_error(wire):
    wire.send(b"Content-Length: 1000000000000\r\n\r\n" + json.dumps(req(2, "localcoder/stats", {})).encode())
    err = wire.expect(lambda m: "error" in m)
    assert err["id"] is None and err["error"]["code"] == -32700 and "max_message_bytes" in err["error"]["message"]
    wire.alive()
    assert wire.proc.poll() is None


def test_frame_over_the_configured_limit_is_skipped():
    w = Wire(LOCALCODER_MAX_MESSAGE_BYTES="4096")
    try:
        w.initialize()
        big = note("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python", "version": 1,
                                                               "text": "x" * 10_000}})
        w.send(frame(big))
        assert "exceeds the limit of 4096" in w.expect(lambda m: "error" in m)["error"]["message"]
        w.alive()
        w.send(frame(req(3, "textDocument/inlineCompletion", {"textDocument": {"uri": URI},
                                                               "position": {"line": 0, "character": 0},
                                                               "context": {"triggerKind": 1}})))
        assert w.reply(3)["error"]["code"] == -32602  # the document never opened
    finally:
        assert w.finish() == 0


BAD_LENGTHS = {
    "non-numeric": b"Content-Length: abc\r\n\r\n",
    "negative": b"Content-Length: -5\r\n\r\n",
    "zero": b"Content-Length: 0\r\n\r\n",
    "float": b"Content-Length: 12.5\r\n\r\n",
    "empty": b"Content-Length:\r\n\r\n",
    "digits and junk": b"Content-Length: 12abc\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(BAD_LENGTHS))
def test_bad_content_length_is_answered_and_the_server_resynchronises(wire, case):
    wire.send(BAD_LENGTHS[case] + json.dumps(req(2, "localcoder/stats", {})).encode())
    err = wire.expect(lambda m: "error" in m)
    assert err["id"] is None and err["error"]["code"] == -32700
    wire.alive()


def test_lowercase_header_is_accepted(wire):
    wire.send(frame(req(2, "localcoder/stats", {}), header="content-length"))
    assert "result" in wire.reply(2)
    wire.send(frame(req(3, "localcoder/stats", {}), header="CONTENT-LENGTH"))
    assert "result" in wire.reply(3)
    wire.send(b"Content-Length:" + frame(req(4, "localcoder/stats", {}))[len(b"Content-Length: "):])  # no space
    assert "result" in wire.reply(4)


def test_content_type_header_is_allowed(wire):
    body = json.dumps(req(2, "localcoder/stats", {})).encode()
    wire.send(b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n%s"
              % (len(body), body))
    assert "result" in wire.reply(2)


def test_too_small_content_length_is_answered_with_the_id(wire):
    body = json.dumps(req(2, "localcoder/stats", {})).encode()
    wire.send(frame(body, length=len(body) - 5))
    err = wire.expect(lambda m: "error" in m)
    assert err["error"]["code"] == -32700 and "Content-Length" in err["error"]["message"]
    wire.alive()


def test_too_large_content_length_followed_by_a_frame(wire):
    body = json.dumps(req(2, "localcoder/stats", {})).encode()
    wire.send(frame(body, length=len(body) + 40) + frame(req(3, "localcoder/stats", {})))
    err = wire.reply(2)
    assert err["error"]["code"] == -32700 and "larger than the message" in err["error"]["message"]
    assert "result" in wire.reply(3)  # the frame that began inside the broken one is served


def test_too_large_content_length_at_the_end_is_answered_after_a_pause(wire):
    body = json.dumps(req(2, "localcoder/stats", {})).encode()
    t0 = time.monotonic()
    wire.send(frame(body, length=len(body) + 1000))
    err = wire.reply(2, timeout=10)
    assert err["error"]["code"] == -32700 and "ended after" in err["error"]["message"]
    assert time.monotonic() - t0 < 8
    wire.alive()


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b"5", b'{"id": 7, "method": "x"}',
                                  b"[" * 5000 + b"]" * 5000])
def test_bad_bodies_are_answered(wire, body):
    wire.send(frame(body))
    err = wire.expect(lambda m: "error" in m)
    assert err["error"]["code"] in (-32700, -32600)
    wire.alive()


def test_junk_between_frames_is_skipped(wire):
    wire.send(b"hello there\r\n\r\n\r\n" + frame(req(2, "localcoder/stats", {})))
    assert "result" in wire.reply(2)


def test_jsonrpc_1_request_is_answered(wire):
    wire.send(frame({"jsonrpc": "1.0", "id": 2, "method": "localcoder/stats", "params": {}}))
    assert wire.reply(2)["error"]["code"] == -32600


# ---- lifecycle -------------------------------------------------------------------------------------------


def test_request_before_initialize_is_32002_and_notifications_are_dropped():
    w = Wire()
    try:
        w.send(frame(req(5, "localcoder/stats", {})))
        assert w.reply(5)["error"]["code"] == -32002
        w.send(frame(note("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python",
                                                                    "version": 1, "text": "x = 1\n"}})))
        w.initialize()
        w.send(frame(req(6, "localcoder/stats", {})))
        assert w.reply(6)["result"]["documents"] == 0  # the early didOpen was dropped
        w.send(frame(INIT))
        assert w.reply(1)["error"]["code"] == -32600  # a second initialize
    finally:
        assert w.finish() == 0


def test_request_after_shutdown_is_invalid_request_and_exit_is_0():
    w = Wire()
    w.initialize()
    w.send(frame(req(2, "shutdown")))
    assert w.reply(2)["result"] is None
    w.send(frame(req(3, "localcoder/stats", {})))
    err = w.reply(3)
    assert err["error"]["code"] == -32600 and "shut down" in err["error"]["message"]
    w.send(frame(note("exit")))
    assert w.proc.wait(20) == 0


def test_exit_without_shutdown_exits_1():
    w = Wire()
    w.initialize()
    w.send(frame(note("exit")))
    assert w.proc.wait(20) == 1


def test_unknown_method_without_params_is_32601(wire):
    wire.send(frame(req(2, "no/such/method")))
    err = wire.reply(2)["error"]
    assert err["code"] == -32601 and err["message"] == "Method Not Found: no/such/method"
    wire.send(frame(req(3, "textDocument/hover", {"textDocument": {"uri": URI}, "position": {"line": 0, "character": 0}})))
    assert wire.reply(3)["error"]["code"] == -32601
    wire.send(frame({"jsonrpc": "2.0", "method": "no/such/notification"}))  # ignored, not a crash
    wire.alive()


# ---- didChange -----------------------------------------------------------------------------------------


def open_doc(wire: Wire, text: str = "line0\nline1\n") -> None:
    wire.send(frame(note("textDocument/didOpen", {"textDocument": {"uri": URI, "languageId": "python",
                                                                   "version": 1, "text": text}})))


def change(wire: Wire, version: int, changes: list) -> None:
    wire.send(frame(note("textDocument/didChange", {"textDocument": {"uri": URI, "version": version},
                                                    "contentChanges": changes})))


def rng(a: tuple, b: tuple) -> dict:
    return {"start": {"line": a[0], "character": a[1]}, "end": {"line": b[0], "character": b[1]}}


def completion_prefix(wire: Wire, msg_id: int, line: int, character: int) -> None:
    wire.send(frame(req(msg_id, "textDocument/inlineCompletion", {
        "textDocument": {"uri": URI}, "position": {"line": line, "character": character},
        "context": {"triggerKind": 1}})))


@pytest.mark.parametrize("changes", [
    [{"range": rng((1, 3), (0, 2)), "text": "x"}],  # ends before it starts
    [{"range": rng((0, 0), (0, 1)), "text": "ok"}, {"range": rng((1, 4), (1, 1)), "text": "y"}],  # 2nd bad
    [{"range": rng((0, -1), (0, 1)), "text": "x"}],  # negative
    [{"range": {"start": {"line": "a", "character": 0}, "end": {"line": 0, "character": 0}}, "text": "x"}],
    [{"text": 5}],
    [{"range": rng((0, 0), (0, 1)), "text": 5}],
    [{"range": rng((0, 0), (0, 1))}],
])
def test_invalid_did_change_is_a_clear_message_and_the_document_is_unchanged(wire, changes):
    open_doc(wire)
    change(wire, 2, changes)
    message = wire.shown()
    assert "didChange" in message and "internal error" not in message.lower()
    wire.send(frame(req(7, "localcoder/stats", {})))
    assert wire.reply(7)["result"]["documents"] == 1
    # the text is still "line0\nline1\n": a valid edit at the old coordinates lands where expected
    change(wire, 3, [{"range": rng((1, 5), (1, 5)), "text": "!"}])
    wire.send(frame(req(8, "localcoder/stats", {})))
    wire.reply(8)
    completion_prefix(wire, 9, 1, 6)
    assert "error" not in wire.reply(9)  # position 1:6 exists only if line 1 is "line1!"
    completion_prefix(wire, 10, 2, 0)
    assert "error" not in wire.reply(10)
    completion_prefix(wire, 11, 3, 0)
    assert wire.reply(11)["error"]["code"] == -32602  # there is no line 3: nothing was inserted


# ---- lone surrogates ------------------------------------------------------------------------------------------


def test_lone_surrogates_in_documents_are_completed_not_crashed(wire):
    for i in range(100):  # the engine loads in the background after `initialized`
        wire.send(frame(req(500 + i, "localcoder/stats", {})))
        if "engine" in wire.reply(500 + i)["result"]:
            break
        time.sleep(0.1)
    # json.dumps writes "\ud800" as the escape, exactly what a buggy client would send
    open_doc(wire, "def f\ud800():\n    ")
    change(wire, 2, [{"range": rng((1, 4), (1, 4)), "text": "x = '\udfff'\n    "}])
    completion_prefix(wire, 3, 2, 4)
    reply = wire.reply(3)
    assert "error" not in reply and reply["result"]["items"][0]["insertText"] == "return a + b"

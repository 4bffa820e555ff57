"""Slow clients (issue 12, item 3): `localcoder serve` (fake engine, a real process on 127.0.0.1)
closes connections that send half their headers or half their body, idle kept-alive ones, and caps
the number of connections. Every client here is bounded: it gives up after a few seconds."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from test_server_cli import start_serve, stop, wait_ready

LIMITS = {"LOCALCODER_HEADER_TIMEOUT_S": "1", "LOCALCODER_BODY_TIMEOUT_S": "2", "LOCALCODER_KEEP_ALIVE_S": "1"}


@pytest.fixture(scope="module")
def serve():
    proc, url = start_serve(env=LIMITS)
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop(proc)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``s`` (reading whatever it sent first); fails after ``seconds``."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        raise AssertionError(f"the connection was still open after {seconds}s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_half_sent_headers_are_cut_off(serve):
    s = connect(serve)
    s.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
    assert closed_within(s, 8) < 5


def test_a_connection_that_sends_nothing_is_cut_off(serve):
    s = connect(serve)
    assert closed_within(s, 8) < 5


def test_a_trickle_of_header_bytes_does_not_extend_the_deadline(serve):
    s = connect(serve)
    t0 = time.monotonic()
    s.settimeout(0.3)
    with pytest.raises((BrokenPipeError, ConnectionResetError, AssertionError)):
        for ch in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
            s.sendall(bytes([ch]))
            time.sleep(0.1)
            try:
                if s.recv(1) == b"":
                    raise AssertionError("closed")
            except socket.timeout:
                pass
    assert time.monotonic() - t0 < 6


def test_half_sent_body_is_cut_off(serve):
    s = connect(serve)
    s.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"input_prefix\": ")
    assert closed_within(s, 10) < 6


def test_idle_kept_alive_connection_is_closed(serve):
    s = connect(serve)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    s.settimeout(5)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    assert closed_within(s, 8) < 5


def test_fifty_slow_clients_are_all_dropped_and_others_are_served_meanwhile(serve):
    slow = []
    for _ in range(50):
        s = connect(serve)
        s.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append(s)
    r = httpx.post(f"{serve}/infill", json={"input_prefix": "def f():\n    "}, timeout=10)
    assert r.status_code == 200 and r.json()["content"] == "return a + b"
    deadline = time.monotonic() + 10
    for s in slow:
        closed_within(s, max(0.1, deadline - time.monotonic()))


def test_a_full_request_is_not_cut_off_by_the_header_deadline(serve):
    """The deadlines bound reading, not answering: a kept-alive client makes several requests."""
    with httpx.Client(base_url=serve, timeout=10) as c:
        for _ in range(3):
            assert c.post("/infill", json={"input_prefix": "x = "}).status_code == 200
            time.sleep(0.5)


def test_connection_cap_answers_503_then_recovers():
    proc, url = start_serve(env={**LIMITS, "LOCALCODER_MAX_CONNECTIONS": "4"})
    try:
        wait_ready(url, proc)
        held = [connect(url) for _ in range(4)]
        for s in held:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a head each
        time.sleep(0.2)
        r = httpx.get(f"{url}/health", timeout=5)
        assert r.status_code == 503  # uvicorn's own answer beyond limit_concurrency
        for s in held:
            closed_within(s, 6)  # the header deadline frees them
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        stop(proc)


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_request_head_is_431_with_a_json_body(serve, chunked):
    """A 64 KB header (the battery's case): sent in one write, h11's incomplete-event bound never sees
    it; the protocol measures the head and answers 431 naming the headers, then the server serves on."""
    s = connect(serve)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n"
    try:
        if chunked:
            for i in range(0, len(head), 4096):
                s.sendall(head[i:i + 4096])
        else:
            s.sendall(head)
    except (BrokenPipeError, ConnectionResetError):  # the server may stop listening once it has answered
        pass
    s.settimeout(8)
    reply = b""
    try:
        while chunk := s.recv(4096):
            reply += chunk
    except ConnectionResetError:
        pass
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b'"param": "headers"' in reply and b"larger than 16384 bytes" in reply
    ok = httpx.get(f"{serve}/health", headers={"X-Normal": "a" * 8000}, timeout=10)  # a big but legal head
    assert ok.status_code == 200

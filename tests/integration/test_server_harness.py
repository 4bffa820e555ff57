"""Helpers shared by the server tests (no tests here): a real uvicorn server on 127.0.0.1 with a
random free port, in a thread of the test process, so tests can inspect the fake engine directly."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import httpx

from conftest import serve_app
from localcoder.completion import Completer
from localcoder.config import Config
from localcoder.engines.fake import FakeEngine
from localcoder.server.app import create_app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "clients"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(**fields) -> Config:
    cfg = Config()
    cfg.apply(fields)
    return cfg


@contextlib.contextmanager
def running_server(completer, cfg: Config | None = None) -> Iterator[str]:
    """Serve ``create_app(completer, cfg)`` with uvicorn in a thread; yields the base URL."""
    with serve_app(create_app(completer, cfg or make_config())) as url:
        yield url


def fake_completer(completion: str = "return a + b\n", delay_s: float = 0.0) -> tuple[Completer, FakeEngine]:
    engine = FakeEngine(completion=completion, token_delay_s=delay_s)
    return Completer(engine), engine


def wait_until(predicate, timeout_s: float = 5.0, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def client(url: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=url, **{"timeout": 30, **kw})

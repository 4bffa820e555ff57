"""Shared fixtures.

Unit tests use the fake engine or tiny random models built here; integration tests (marked
``integration``) use the real packaged Qwen2.5-Coder 0.5B from the model cache, which ``make test``
pulls first. No test reaches a model hub.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from localcoder.engines.fake import FakeEngine

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine(completion="return a + b\n")


@pytest.fixture(scope="session")
def model_05b_path() -> Path:
    """The packaged 0.5B GGUF (pulled by `make test`; pulled here if missing)."""
    from localcoder import models

    return models.resolve(DEFAULT_MODEL, pull_if_missing=True, progress=False).path  # type: ignore[return-value]


@pytest.fixture(scope="session")
def llama_engine(model_05b_path):
    """One real llama.cpp engine for the session (2 threads, 4k context)."""
    from localcoder.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(model_05b_path, n_ctx=4096, n_threads=min(2, os.cpu_count() or 2), model_name=DEFAULT_MODEL)
    yield eng
    eng.close()

"""Shared fixtures.

Unit tests use the fake engine or tiny random models built here; integration tests (marked
``integration``) use the real packaged Qwen2.5-Coder 0.5B from the model cache, which ``make test``
pulls first. No test reaches a model hub.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from localcoder.engines.fake import FakeEngine

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI ``app`` with a real uvicorn in a thread on 127.0.0.1; yields the base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


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


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(model_05b_path) -> Path:
    """The real Qwen2.5-Coder tokenizer (with FIM special tokens), extracted once from the packaged GGUF."""
    from localcoder import models
    from localcoder.engines.torch import convert_gguf_to_hf

    return convert_gguf_to_hf(models.resolve(DEFAULT_MODEL), tokenizer_only=True)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random-weight Qwen2 causal LM (4 layers, hidden 64) with the real tokenizer, saved as an
    HF directory. For unit tests of torch/ONNX/GGUF/distill code paths: fast and hub-free."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=False, rope_theta=10000.0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(str(out), safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir)).save_pretrained(str(out))
    return out

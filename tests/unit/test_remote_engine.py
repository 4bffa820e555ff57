"""The remote engine against a fake OpenAI-style server (Starlette under real uvicorn on 127.0.0.1)
that replays vLLM's and llama-server's ``/v1/completions`` streaming shapes, and misbehaves on demand:
garbage, 4xx/5xx, slow streams, a stream cut mid-token, down then up, another vocabulary; and it
records what it was sent and whether the client went away."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from conftest import free_port, serve_app
from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import GenerationRequest
from localcoder.engines.fake import ByteTokenizer
from localcoder.engines.remote import RemoteEngine
from localcoder.errors import BackendUnavailable, InvalidRequest
from localcoder.server.app import create_app

TOK = ByteTokenizer()
EOS = 256  # <|endoftext|> in the byte tokenizer


def vllm_chunk(text: str, ids: list[int], finish: str | None = None) -> dict[str, Any]:
    """One chunk as vLLM 0.6-0.10 streams it with logprobs=1 and return_tokens_as_token_ids."""
    return {"id": "cmpl-8f2c", "object": "text_completion", "created": 1733140000, "model": "Qwen/Qwen2.5-Coder-7B",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "stop_reason": None,
                         "logprobs": {"text_offset": [0] * len(ids), "token_logprobs": [-0.01] * len(ids),
                                      "tokens": [f"token_id:{i}" for i in ids],
                                      "top_logprobs": [{f"token_id:{i}": -0.01} for i in ids]}}],
            "usage": None}


class FakeRemote:
    """State of the fake server: ``mode`` picks the behaviour of the next requests."""

    def __init__(self, completion: str = "return a + b\n"):
        self.completion = completion
        self.mode = "vllm"
        self.delay_s = 0.0  # between chunks
        self.first_delay_s = 0.0
        self.bodies: list[dict[str, Any]] = []
        self.disconnected = threading.Event()
        self.chunks_sent = 0
        self.tokenize_ids: list[int] | None = None  # None: the byte tokenizer's ids

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                 Route("/completion", self.completions, methods=["POST"]),
                                 Route("/props", self.props),
                                 Route("/tokenize", self.tokenize, methods=["POST"]),
                                 Route("/health", self.health)])

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def props(self, request: Request):
        if self.mode != "llama":
            return PlainTextResponse("not found", status_code=404)
        return JSONResponse({"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1})

    async def tokenize(self, request: Request):
        body = await request.json()
        if self.mode == "no-tokenize":
            return PlainTextResponse("not found", status_code=404)
        ids = self.tokenize_ids if self.tokenize_ids is not None else TOK.tokenize(body["content"])
        return JSONResponse({"tokens": ids})

    async def completions(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        if self.mode == "500":
            return JSONResponse({"error": {"message": "CUDA out of memory", "type": "server_error"}}, status_code=500)
        if self.mode == "400":
            return JSONResponse({"error": {"message": "prompt too long", "type": "invalid_request_error"}},
                                status_code=400)
        return StreamingResponse(self.stream(body), media_type="text/event-stream")

    async def stream(self, body: dict[str, Any]):
        ids = TOK.tokenize(self.completion)[: body.get("max_tokens", body.get("n_predict"))]
        try:
            if self.first_delay_s:
                await asyncio.sleep(self.first_delay_s)
            for line in self.lines(ids):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.chunks_sent += 1
                yield line
        except (asyncio.CancelledError, GeneratorExit):
            self.disconnected.set()
            raise

    def lines(self, ids: list[int]) -> Iterator[str]:
        if self.mode == "garbage":
            yield "data: <html>502 Bad Gateway</html>\n\n"
            return
        for i, t in enumerate(ids):
            if self.mode == "cut" and i == 3:
                yield 'data: {"choices": [{"text": "x", "tok'  # cut in the middle of a chunk, no [DONE]
                return
            if self.mode == "llama":  # llama-server's native /completion with return_tokens
                yield "data: " + json.dumps({"content": TOK.token_bytes(t).decode(), "tokens": [t], "stop": False,
                                             "id_slot": 0, "index": 0}) + "\n\n"
            elif self.mode == "text":  # a server that sends text only (here two characters at a time)
                piece = self.completion[2 * i: 2 * i + 2]
                if piece:
                    yield "data: " + json.dumps({"choices": [{"text": piece, "index": 0}]}) + "\n\n"
            else:
                yield "data: " + json.dumps(vllm_chunk(TOK.token_bytes(t).decode("latin-1"), [t])) + "\n\n"
        if self.mode == "llama":  # its last chunk says stop and carries the timings; no [DONE]
            yield "data: " + json.dumps({"content": "", "tokens": [], "stop": True, "stop_type": "eos", "timings": {
                "prompt_n": 5, "cache_n": 7, "prompt_ms": 12.5, "predicted_n": len(ids), "predicted_ms": 40.0}}) + "\n\n"
            return
        yield "data: " + json.dumps({"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]}) + "\n\n"
        yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": len(ids)}}) + "\n\n"
        yield "data: [DONE]\n\n"


serve = serve_app  # one uvicorn-in-a-thread helper (tests/conftest.py)


@pytest.fixture
def remote():
    fake = FakeRemote()
    with serve(fake.app()) as url:
        yield fake, url


def engine_for(url: str, **kw) -> RemoteEngine:
    kw.setdefault("read_timeout_s", 5.0)
    return RemoteEngine(url, TOK, model_name="fake", **kw)


def complete(engine: RemoteEngine, prefix: str = "def add(a, b):\n    ", suffix: str = "\n") -> Any:
    completer = Completer(engine, "qwen")
    return completer.complete(InfillRequest(prefix=prefix, suffix=suffix, max_tokens=32, mode="multi"))


def test_vllm_stream_shape_token_ids_in_and_out(remote):
    fake, url = remote
    engine = engine_for(url, remote_model="Qwen/Qwen2.5-Coder-7B")
    result = complete(engine)
    assert result.text == "return a + b"
    body = fake.bodies[-1]
    assert body["stream"] is True and body["model"] == "Qwen/Qwen2.5-Coder-7B"
    assert isinstance(body["prompt"], list) and all(isinstance(t, int) for t in body["prompt"])
    prompt = TOK.decode(body["prompt"])
    assert prompt.startswith("<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>") and prompt.endswith("<|fim_middle|>")
    assert body["return_tokens_as_token_ids"] is True and EOS in body["stop_token_ids"]


def test_llama_server_tokens_and_timings(remote):
    fake, url = remote
    fake.mode = "llama"
    engine = engine_for(url)
    stream = engine.generate(GenerationRequest(tokens=TOK.tokenize("def f():"), max_tokens=32))
    assert TOK.decode(list(stream)) == "return a + b\n"
    body = fake.bodies[-1]
    assert engine.native and body["n_predict"] == 32 and body["return_tokens"] is True and "logprobs" not in body
    assert stream.timings.prompt_ms == 12.5 and stream.timings.predicted_ms == 40.0
    assert stream.timings.cached_n == 7 and stream.timings.prompt_n == 8 and stream.timings.stopped_by_token


def test_text_only_server_is_retokenized(remote):
    fake, url = remote
    fake.mode, fake.completion = "text", "x = 'ünï'\n"
    stream = engine_for(url).generate(GenerationRequest(tokens=TOK.tokenize("y"), max_tokens=64))
    assert TOK.decode(list(stream)) == "x = 'ünï'\n"


@pytest.mark.parametrize("mode, error, words", [
    ("garbage", BackendUnavailable, "not JSON"),
    ("500", BackendUnavailable, "HTTP 500: CUDA out of memory"),
    ("400", InvalidRequest, "rejected the request: prompt too long"),
    ("cut", BackendUnavailable, ""),
])
def test_bad_remote_answers_are_typed_errors_and_the_next_request_works(remote, mode, error, words):
    fake, url = remote
    engine = engine_for(url)
    fake.mode = mode
    with pytest.raises(error) as info:
        list(engine.generate(GenerationRequest(tokens=[1, 2, 3], max_tokens=16)))
    assert words in str(info.value) and url in str(info.value)
    fake.mode = "vllm"
    assert TOK.decode(list(engine.generate(GenerationRequest(tokens=[1, 2, 3], max_tokens=16)))) == "return a + b\n"


def test_a_stream_cut_mid_token_says_the_stream_ended(remote):
    fake, url = remote
    fake.mode = "cut"
    with pytest.raises(BackendUnavailable, match="not JSON|before \\[DONE\\]"):
        list(engine_for(url).generate(GenerationRequest(tokens=[1], max_tokens=16)))


def test_a_slow_stream_times_out_instead_of_hanging(remote):
    fake, url = remote
    fake.first_delay_s = 3.0
    engine = engine_for(url, read_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match="timed out"):
        list(engine.generate(GenerationRequest(tokens=[1], max_tokens=4)))
    assert time.monotonic() - t0 < 2.5


def test_closing_the_stream_disconnects_the_remote(remote):
    fake, url = remote
    fake.completion, fake.delay_s = "word " * 100, 0.05
    stream = engine_for(url).generate(GenerationRequest(tokens=[1], max_tokens=500))
    assert [next(stream), next(stream)] == TOK.tokenize("wo")
    stream.close()
    assert fake.disconnected.wait(5), "the remote never saw the client go away"
    time.sleep(0.3)
    assert fake.chunks_sent < 50


def test_cancel_stops_before_the_next_token_and_disconnects(remote):
    fake, url = remote
    fake.completion, fake.delay_s = "word " * 100, 0.05
    request = GenerationRequest(tokens=[1], max_tokens=500)
    stream = engine_for(url).generate(request)
    got = [next(stream)]
    request.cancel.cancel()
    got += list(stream)
    assert len(got) <= 2 and stream.timings.cancelled
    assert fake.disconnected.wait(5)


def test_vocabulary_mismatch_is_refused_at_start(remote):
    fake, url = remote
    fake.tokenize_ids = [151643, 12, 13]
    with pytest.raises(BackendUnavailable, match="different vocabulary"):
        engine_for(url)
    fake.tokenize_ids = None
    engine_for(url)  # the same vocabulary passes
    fake.mode = "no-tokenize"
    engine_for(url)  # a server without /tokenize cannot be checked: accepted


def test_health_reports_the_remote(remote):
    fake, url = remote
    engine = engine_for(url)
    health = engine.health()
    assert health["status"] == "ok" and health["url"] == url and health["http_status"] == 200
    down = engine_for(f"http://127.0.0.1:{free_port()}")
    assert down.health()["status"] == "unreachable"


def test_bad_url_is_a_clear_error():
    with pytest.raises(InvalidRequest) as info:
        engine_for("127.0.0.1:8000")
    assert info.value.param == "engine_url"


def test_remote_down_gives_503_then_recovers_through_localcoder_serve():
    """Our own server in front: a remote that is down answers 503 with a clear message, at once; when
    the remote comes up on that port, the next request succeeds, and a vocabulary check ran then."""
    port = free_port()
    engine = engine_for(f"http://127.0.0.1:{port}", connect_timeout_s=1.0)
    cfg = Config()
    with serve(create_app(Completer(engine, "qwen"), cfg)) as ours:
        body = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "n_predict": 16}
        t0 = time.monotonic()
        r = httpx.post(f"{ours}/infill", json=body, timeout=10)
        assert r.status_code == 503 and time.monotonic() - t0 < 3
        assert "unreachable" in r.json()["error"]["message"]
        health = httpx.get(f"{ours}/health", timeout=10).json()
        assert health["remote"]["status"] == "unreachable"
        fake = FakeRemote()
        with serve(fake.app(), port):
            r = httpx.post(f"{ours}/infill", json=body, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["content"] == "return a + b"
            assert httpx.get(f"{ours}/health", timeout=10).json()["remote"]["status"] == "ok"
            metrics = metric_values(httpx.get(f"{ours}/metrics", timeout=10).text)
        assert engine._vocab_checked
    # /metrics: the remote's requests and errors, and its latency in the engine histogram
    assert metrics["localcoder_remote_requests_total"] == 2 and metrics["localcoder_remote_errors_total"] == 1
    assert metrics['localcoder_engine_seconds_count{phase="prompt"}'] == 1  # the one that completed
    assert 0 < metrics['localcoder_engine_seconds_sum{phase="prompt"}'] < 5
    assert 0 < metrics["localcoder_remote_first_token_seconds_last"] < 5


def metric_values(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def test_engine_remote_from_config_needs_a_url():
    from localcoder.engines import load_engine
    from localcoder.models import resolve

    cfg = Config()
    cfg.apply({"engine": "remote", "model": "fake"})
    with pytest.raises(InvalidRequest) as info:
        load_engine(resolve("fake"), cfg.model)
    assert info.value.param == "engine_url"


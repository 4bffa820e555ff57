"""The HTTP server over a real uvicorn socket with the fake engine: every endpoint and client shape,
streaming, cancellation (the engine really stops), supersession, queue limits, auth, CORS, bad input."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_server_harness import client, fake_completer, fixture, make_config, running_server, wait_until

EDITOR = {"X-Localcoder-Client": "editor-1"}  # one editor process (our LSP sends one id per process)
LONG = "word " * 200  # 1,000 tokens in the byte tokenizer, no newline: long enough to cancel mid-way


@pytest.fixture
def fake():
    completer, engine = fake_completer()
    with running_server(completer) as url:
        yield url, engine


def sse_data(lines: list[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# ---- client fixtures, unchanged ------------------------------------------------------------------


def test_llama_vim_infill_returns_only_response_fields_flattened(fake):
    url, engine = fake
    body = fixture("llama_vim_infill")
    with client(url) as c:
        r = c.post("/infill", json=body)
    assert r.status_code == 200
    data = r.json()
    assert set(data) == set(body["response_fields"])
    assert data["content"] == "return a + b"
    assert data["timings/predicted_n"] > 0 and data["truncated"] is False
    prompt = engine.prompts[-1]
    assert prompt.startswith("<|repo_name|>") and "<|file_sep|>util/strings.py\ndef strip_comment" in prompt
    assert "<|fim_prefix|>" + body["input_prefix"] + body["prompt"] + "<|fim_suffix|>" in prompt


def test_llama_vim_typing_reuses_the_kv_cache(fake):
    url, engine = fake
    body = fixture("llama_vim_infill")
    with client(url) as c:
        first = c.post("/infill", json=body).json()
        body["prompt"] += "key"
        second = c.post("/infill", json=body).json()
    assert first["tokens_cached"] == 0
    assert second["tokens_cached"] > 100
    assert second["timings/prompt_n"] < first["timings/prompt_n"]


def test_llama_vim_warmup_fills_the_cache_without_generating(fake):
    url, engine = fake
    with client(url) as c:
        r = c.post("/infill", json=fixture("llama_vim_warmup"))
    assert r.status_code == 200 and r.json() == {}
    assert wait_until(lambda: engine.prompts)  # the prefill runs in the background, after the answer
    assert engine.tokens_generated_total == 0
    assert "util/strings.py" in engine.prompts[-1]


def test_continue_openai_suffix_streams_sse_and_done(fake):
    url, engine = fake
    body = fixture("continue_openai_suffix")
    with client(url) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = sse_data(list(r.iter_lines()))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == "return a + b"
    assert all(ch["object"] == "text_completion" for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[0]["choices"][0]["finish_reason"] is None
    assert "<|fim_suffix|>" + body["suffix"] + "<|fim_middle|>" in engine.prompts[-1]


def test_continue_raw_fim_prompt_uses_special_tokens(fake):
    url, engine = fake
    body = fixture("continue_raw_fim")
    with client(url) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == "return a + b"
    assert engine.prompts[-1] == body["prompt"]  # same tokens: markers became special tokens
    assert r.json()["usage"]["prompt_tokens"] == len(engine.tokenizer.tokenize(body["prompt"], special=True))


def test_fim_marker_text_in_a_suffix_request_is_not_a_special_token(fake):
    url, engine = fake
    with client(url) as c:
        r = c.post("/v1/completions", json={"prompt": "a = 1\n", "suffix": "# <|fim_middle|> here\n"})
    assert r.status_code == 200
    ids = engine.cache.tokens
    assert ids.count(engine.tokenizer.specials["<|fim_middle|>"]) == 1  # only the real marker


def test_tabby_segments_get_a_tabby_answer(fake):
    url, engine = fake
    with client(url) as c:
        r = c.post("/v1/completions", json=fixture("tabby_segments"))
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"id", "choices"} and data["choices"] == [{"index": 0, "text": "return a + b"}]
    prompt = engine.prompts[-1]
    assert prompt.startswith("<|repo_name|>app\n")
    assert "<|file_sep|>util/strings.py\n" in prompt and "<|file_sep|>app/main.py\n" in prompt
    assert "<|file_sep|>app/config.py\n<|fim_prefix|>" in prompt


def test_infill_streaming_sends_deltas_then_a_final_chunk(fake):
    url, _ = fake
    body = {**fixture("llama_vim_infill"), "stream": True}
    with client(url) as c, c.stream("POST", "/infill", json=body) as r:
        chunks = [json.loads(d) for d in sse_data(list(r.iter_lines()))]
    assert "".join(ch["content"] for ch in chunks) == "return a + b"
    assert chunks[-1]["stop"] is True and chunks[-1]["stop_type"] in ("eos", "word")
    assert all(ch["stop"] is False for ch in chunks[:-1])
    assert "timings" in chunks[-1] and "tokens_cached" in chunks[-1]


def test_health_models_metrics(fake):
    url, _ = fake
    with client(url) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"] == "fake" and h["engine"] == "fake" and h["queue_depth"] == 0
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == "fake" and models["data"][0]["meta"]["fim_format"] == "qwen"
        assert c.get("/v1/health").json()["model"] == "fake"
        c.post("/infill", json=fixture("llama_vim_infill"))
        c.post("/infill", json={"n_predict": "many"})
        text = c.get("/metrics").text
    assert 'localcoder_requests_total{endpoint="/infill",status="200"} 1' in text
    assert 'localcoder_requests_total{endpoint="/infill",status="400"} 1' in text
    assert 'localcoder_request_seconds_count{endpoint="/infill"} 2' in text
    assert "localcoder_generated_tokens_total 14" in text  # "return a + b" + newline + EOS
    assert "localcoder_queue_depth 0" in text and "localcoder_prompt_tokens_total" in text


# ---- bad input: 4xx naming the field, and the server keeps serving --------------------------------

BAD = [
    ("/infill", b'{"input_prefix": "a",', "body", 400),
    ("/infill", b"", "body", 400),
    ("/infill", b'{"input_prefix": "\xff\xfe"}', "body", 400),
    ("/infill", b"[1, 2]", "body", 400),
    ("/infill", json.dumps({"input_prefix": 3}).encode(), "input_prefix", 400),
    ("/infill", json.dumps({"n_predict": -1}).encode(), "n_predict", 400),
    ("/infill", json.dumps({"n_predict": 10**9}).encode(), "n_predict", 400),
    ("/infill", json.dumps({"n_predict": "64"}).encode(), "n_predict", 400),
    ("/infill", json.dumps({"n_predict": True}).encode(), "n_predict", 400),
    ("/infill", json.dumps({"temperature": -1}).encode(), "temperature", 400),
    ("/infill", json.dumps({"top_p": 0}).encode(), "top_p", 400),
    ("/infill", json.dumps({"stop": [1]}).encode(), "stop", 400),
    ("/infill", json.dumps({"stream": "yes"}).encode(), "stream", 400),
    ("/infill", json.dumps({"input_extra": {"filename": "a"}}).encode(), "input_extra", 400),
    ("/infill", json.dumps({"input_extra": [{"filename": "a", "text": 5}]}).encode(), "input_extra[0].text", 400),
    ("/infill", json.dumps({"t_max_predict_ms": -5}).encode(), "t_max_predict_ms", 400),
    ("/v1/completions", json.dumps({"prompt": "x", "frobnicate": 1}).encode(), "frobnicate", 400),
    ("/v1/completions", json.dumps({"prompt": "x", "n": 2}).encode(), "n", 400),
    ("/v1/completions", json.dumps({"prompt": "x", "echo": True}).encode(), "echo", 400),
    ("/v1/completions", json.dumps({"prompt": 42}).encode(), "prompt", 400),
    ("/v1/completions", json.dumps({"prompt": ["a", "b"]}).encode(), "prompt", 400),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -1}).encode(), "max_tokens", 400),
    ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), "max_tokens", 400),
    ("/v1/completions", json.dumps({"prompt": "<|fim_prefix|>a<|fim_middle|>"}).encode(), "prompt", 400),
    ("/v1/completions", json.dumps({"prompt": "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
                                    "suffix": "c"}).encode(), "suffix", 400),
    ("/v1/completions", json.dumps({"segments": []}).encode(), "segments", 400),
    ("/v1/completions", json.dumps({"segments": {"prefix": 1}}).encode(), "segments.prefix", 400),
    ("/v1/completions", json.dumps({"segments": {"prefix": "a", "declarations": [{"filepath": "b", "body": 2}]}}
                                   ).encode(), "segments.declarations[0].body", 400),
]


def test_every_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(fake):
    url, _ = fake
    with client(url) as c:
        for path, raw, param, status in BAD:
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status, (raw, r.text)
            err = r.json()["error"]
            assert err["param"] == param, (raw, err)
            assert err["type"] == "invalid_request_error" and err["message"]
        assert c.get("/health").status_code == 200
        assert c.post("/infill", json=fixture("llama_vim_infill")).json()["content"] == "return a + b"


def test_unknown_route_and_wrong_method_use_the_error_shape(fake):
    url, _ = fake
    with client(url) as c:
        r = c.get("/nope")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
        r = c.get("/infill")
        assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"


def test_body_over_the_limit_is_413():
    completer, _ = fake_completer()
    with running_server(completer, make_config(max_body_bytes=2000)) as url, client(url) as c:
        r = c.post("/infill", json={"input_prefix": "a" * 5000})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"

        def chunked():  # no Content-Length: the limit still holds while streaming the body
            yield b'{"input_prefix": "'
            for _ in range(10):
                yield b"a" * 500
            yield b'"}'

        r = c.post("/infill", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/infill", json={"input_prefix": "a" * 100}).status_code == 200


def test_context_too_long_is_422():
    from localcoder.completion import Completer
    from localcoder.engines.fake import FakeEngine

    completer = Completer(FakeEngine(n_ctx=64))
    with running_server(completer) as url, client(url) as c:
        r = c.post("/infill", json={"input_prefix": "a" * 200, "n_predict": 32})
        assert r.status_code == 422 and r.json()["error"]["type"] == "context_length_exceeded"


# ---- auth and CORS -------------------------------------------------------------------------------


def test_bearer_auth_when_a_key_is_set():
    completer, _ = fake_completer()
    with running_server(completer, make_config(api_key="s3cret-key")) as url, client(url) as c:
        body = fixture("llama_vim_infill")
        missing = c.post("/infill", json=body)
        wrong = c.post("/infill", json=body, headers={"Authorization": "Bearer s3cret-kez"})
        scheme = c.post("/infill", json=body, headers={"Authorization": "Basic s3cret-key"})
        for r in (missing, wrong, scheme):
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json() == missing.json()  # nothing says which part failed
        ok = c.post("/infill", json=body, headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200 and ok.json()["content"] == "return a + b"
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").status_code == 200  # liveness stays open, says nothing else


def test_no_auth_by_default_on_loopback(fake):
    url, _ = fake
    with client(url) as c:
        assert c.post("/infill", json=fixture("llama_vim_infill")).status_code == 200


def test_cors_only_when_origins_are_given(fake):
    url, _ = fake
    origin = {"Origin": "http://localhost:3000"}
    with client(url) as c:
        r = c.post("/infill", json=fixture("llama_vim_infill"), headers=origin)
        assert "access-control-allow-origin" not in r.headers
    completer, _ = fake_completer()
    with running_server(completer, make_config(cors_origins="http://localhost:3000")) as url2, client(url2) as c:
        r = c.post("/infill", json=fixture("llama_vim_infill"), headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = c.post("/infill", json=fixture("llama_vim_infill"), headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/infill", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200


# ---- cancellation, supersession, queue -----------------------------------------------------------


def assert_engine_stopped(engine, budget: int) -> None:
    """The engine is idle and its decode counter no longer grows (and never reached ``budget``)."""
    assert wait_until(lambda: not engine.active.is_set(), 5)
    n = engine.tokens_generated_total
    time.sleep(0.2)
    assert engine.tokens_generated_total == n < budget


def test_client_disconnect_mid_stream_stops_the_engine():
    completer, engine = fake_completer(LONG, delay_s=0.01)
    with running_server(completer) as url:
        body = {"prompt": "def f():\n", "max_tokens": 4000, "stream": True}
        with client(url) as c, c.stream("POST", "/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 5:
                    break  # leaving the block closes the connection mid-stream
        assert_engine_stopped(engine, len(LONG))
        with client(url) as c:
            assert c.get("/health").status_code == 200
            metrics = c.get("/metrics").text
            assert 'localcoder_cancellations_total{reason="disconnect"} 1' in metrics
            t0 = time.monotonic()
            r = c.post("/infill", json={"input_prefix": "a", "n_predict": 3})
            assert r.status_code == 200 and time.monotonic() - t0 < 2  # the engine is free


def test_client_disconnect_while_waiting_for_a_plain_response_stops_the_engine():
    completer, engine = fake_completer(LONG, delay_s=0.01)
    with running_server(completer) as url:
        with client(url) as c, pytest.raises(httpx.ReadTimeout):
            c.post("/infill", json={"input_prefix": "a", "n_predict": 4000}, timeout=0.3)
        assert_engine_stopped(engine, len(LONG))


def test_newer_request_on_the_same_slot_supersedes_the_running_one():
    completer, engine = fake_completer(LONG, delay_s=0.01)
    with running_server(completer) as url:
        first: dict = {}

        def stream_first() -> None:
            body = {"input_prefix": "a", "n_predict": 4000, "stream": True, "id_slot": 3}
            with client(url) as c, c.stream("POST", "/infill", json=body, headers=EDITOR) as r:
                first["chunks"] = [json.loads(d) for d in sse_data(list(r.iter_lines()))]

        t = threading.Thread(target=stream_first)
        t.start()
        assert wait_until(lambda: engine.tokens_generated_total >= 5)
        with client(url) as c:
            second = c.post("/infill", json={"input_prefix": "b", "n_predict": 4, "id_slot": 3}, headers=EDITOR).json()
        t.join(10)
        final = first["chunks"][-1]
        assert final["stop"] is True and final["stop_reason"] == "cancelled"
        assert final["tokens_predicted"] < len(LONG) and second["content"] == "word"
        assert engine.tokens_generated_total == final["tokens_predicted"] + 4
        with client(url) as c:
            assert 'reason="superseded"} 1' in c.get("/metrics").text


def test_two_editors_on_one_slot_do_not_cancel_each_other():
    """llama.vim's default id_slot is 0 in every editor: only the same client supersedes itself."""
    completer, engine = fake_completer("abc\n", delay_s=0.05)
    with running_server(completer) as url:
        results: dict = {}

        def post(name: str, headers: dict) -> None:
            with client(url) as c:
                results[name] = c.post("/infill", json={"input_prefix": name, "id_slot": 0}, headers=headers).json()

        threads = [threading.Thread(target=post, args=("vim-a", {})),  # no header: the connection is the client
                   threading.Thread(target=post, args=("vim-b", {})),
                   threading.Thread(target=post, args=("code-a", {"X-Localcoder-Client": "a"})),
                   threading.Thread(target=post, args=("code-b", {"X-Localcoder-Client": "b"}))]
        for t in threads:
            t.start()
            time.sleep(0.02)
        for t in threads:
            t.join(15)
        assert {name: r["content"] for name, r in results.items()} == dict.fromkeys(results, "abc")
        assert len(results) == 4 and len(engine.prompts) == 4


def test_other_slots_are_not_superseded_and_queued_requests_can_be_superseded():
    completer, engine = fake_completer("abc\n", delay_s=0.3)
    with running_server(completer) as url:
        results: dict = {}

        def post(name: str, body: dict) -> None:
            with client(url) as c:
                results[name] = c.post("/infill", json=body, headers=EDITOR).json()

        running = threading.Thread(target=post, args=("running", {"input_prefix": "a", "id_slot": 1}))
        running.start()
        assert wait_until(engine.active.is_set)
        queued = threading.Thread(target=post, args=("queued", {"input_prefix": "b", "id_slot": 2}))
        queued.start()
        time.sleep(0.2)
        newer = threading.Thread(target=post, args=("newer", {"input_prefix": "c", "id_slot": 2}))
        newer.start()
        for t in (running, queued, newer):
            t.join(15)
        assert results["running"]["content"] == "abc" and results["newer"]["content"] == "abc"
        assert results["queued"]["content"] == "" and results["queued"]["stop_reason"] == "cancelled"
        assert len(engine.prompts) == 2  # the superseded request never reached the engine


def test_full_queue_answers_429_with_retry_after():
    completer, engine = fake_completer("abc\n", delay_s=0.3)
    with running_server(completer, make_config(max_queue=1)) as url:
        threads = [threading.Thread(target=lambda: client(url).post("/infill", json={"input_prefix": "a"}))
                   for _ in range(2)]
        threads[0].start()
        assert wait_until(engine.active.is_set)
        threads[1].start()
        with client(url) as c:
            assert wait_until(lambda: "localcoder_queue_depth 1" in c.get("/metrics").text)
            r = c.post("/infill", json={"input_prefix": "z"})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "queue_full"
        for t in threads:
            t.join(15)

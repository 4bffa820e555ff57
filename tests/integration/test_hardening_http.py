"""Hostile HTTP input (issue 12): lone surrogates, deep nesting, browsers and DNS rebinding.

Each test sends the exact bytes of the case to a real uvicorn server on 127.0.0.1 (fake engine).
"""

from __future__ import annotations

import json

import pytest
from test_server_harness import client, fake_completer, make_config, running_server

JSON = {"content-type": "application/json"}
LONE = "\ud800"
REPLACED = "\ufffd"


def raw(obj: dict) -> bytes:
    """JSON with the surrogate as the escape ``\\ud800`` (what a client's JSON encoder sends)."""
    return json.dumps(obj).encode("ascii")


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


INFILL_CASES = {
    "input_prefix": {"input_prefix": f"def f{LONE}(a):\n    "},
    "input_suffix": {"input_prefix": "x = ", "input_suffix": f"\n# {LONE}\n"},
    "prompt": {"input_prefix": "def f():\n", "prompt": f"    y{LONE} = "},
    "input_extra.text": {"input_prefix": "x = ", "input_extra": [{"filename": "a.py", "text": f"A = '{LONE}'"}]},
    "input_extra.filename": {"input_prefix": "x = ", "input_extra": [{"filename": f"{LONE}.py", "text": "A = 1"}]},
    "stop": {"input_prefix": "x = ", "stop": [f"{LONE}"]},
    "low surrogate": {"input_prefix": "a\udfffb = "},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(INFILL_CASES))
def test_infill_lone_surrogate_is_replaced_not_a_500(case, stream):
    completer, engine = fake_completer()
    with running_server(completer) as url, client(url) as c:
        r = c.post("/infill", content=raw({**INFILL_CASES[case], "stream": stream}), headers=JSON)
        assert r.status_code == 200, r.text
        if stream:
            events = sse_events(r.text)
            assert events[-1]["stop"] is True and "".join(e["content"] for e in events) == "return a + b"
        else:
            assert r.json()["content"] == "return a + b"
        if case != "stop":  # the surrogate reached the prompt as U+FFFD
            assert REPLACED in engine.prompts[-1] and LONE not in engine.prompts[-1]


OPENAI_CASES = {
    "prompt": {"prompt": f"def f{LONE}():\n    ", "suffix": "\n"},
    "suffix": {"prompt": "def f():\n    ", "suffix": f"\n# {LONE}"},
    "prompt list": {"prompt": [f"x{LONE} = "]},
    "raw FIM prompt": {"prompt": f"<|fim_prefix|>x{LONE} = <|fim_suffix|>\n<|fim_middle|>"},
    "stop": {"prompt": "x = ", "stop": LONE},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(OPENAI_CASES))
def test_openai_lone_surrogate_is_replaced(case, stream):
    completer, engine = fake_completer()
    with running_server(completer) as url, client(url) as c:
        r = c.post("/v1/completions", content=raw({**OPENAI_CASES[case], "stream": stream}), headers=JSON)
        assert r.status_code == 200, r.text
        if stream:
            assert r.text.rstrip().endswith("data: [DONE]")
            assert "".join(e["choices"][0]["text"] for e in sse_events(r.text)) == "return a + b"
        else:
            assert r.json()["choices"][0]["text"] == "return a + b"
        if case != "stop":
            assert REPLACED in engine.prompts[-1]


@pytest.mark.parametrize("field", ["prefix", "suffix", "filepath", "git_url"])
def test_tabby_segments_lone_surrogate_is_replaced(field):
    completer, engine = fake_completer()
    segments = {"prefix": "def f():\n    ", "suffix": "\n", "filepath": "a.py", "git_url": "https://x/r.git"}
    segments[field] = segments[field] + LONE
    with running_server(completer) as url, client(url) as c:
        r = c.post("/v1/completions", content=raw({"language": "python", "segments": segments}), headers=JSON)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "return a + b"
        if field in ("prefix", "suffix", "filepath"):
            assert REPLACED in engine.prompts[-1]


def test_a_surrogate_echoed_in_an_error_message_is_a_400_not_a_500():
    completer, _ = fake_completer()
    with running_server(completer) as url, client(url) as c:
        r = c.post("/v1/completions", content=raw({"prompt": "x", f"bad{LONE}": 1}), headers=JSON)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == f"bad{REPLACED}"


# ---- deep nesting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/infill", "/v1/completions"])
def test_deeply_nested_body_is_a_clear_400(path):
    body = b'{"x":' + b"[" * 1000 + b"]" * 1000 + b"}"  # about 2 KB
    completer, _ = fake_completer()
    with running_server(completer) as url, client(url) as c:
        r = c.post(path, content=body, headers=JSON)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "body" and "nested too deeply" in err["message"]
        follow_up = {"input_prefix": "x = "} if path == "/infill" else {"prompt": "x = "}
        assert c.post(path, json=follow_up).status_code == 200


def test_moderate_nesting_is_still_parsed():
    completer, _ = fake_completer()
    body = b'{"input_prefix": "x = ", "ignored": ' + b"[" * 50 + b"]" * 50 + b"}"
    with running_server(completer) as url, client(url) as c:
        assert c.post("/infill", content=body, headers=JSON).status_code == 200


# ---- browsers and DNS rebinding ---------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
@pytest.mark.parametrize("path", ["/infill", "/v1/completions"])
def test_post_body_that_is_not_json_is_415(path, content_type):
    completer, engine = fake_completer()
    headers = {"content-type": content_type} if content_type else {}
    with running_server(completer) as url, client(url) as c:
        r = c.post(path, content=b'{"input_prefix": "x = ", "prompt": "x = "}', headers=headers)
        assert r.status_code == 415, r.text
        err = r.json()["error"]
        assert err["type"] == "unsupported_media_type" and err["param"] == "content-type"
        assert engine.prompts == []  # nothing ran


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"])
def test_json_content_types_are_served(content_type):
    completer, _ = fake_completer()
    with running_server(completer) as url, client(url) as c:
        r = c.post("/infill", content=b'{"input_prefix": "x = "}', headers={"content-type": content_type})
        assert r.status_code == 200


def test_post_without_a_body_needs_no_content_type():
    completer, _ = fake_completer()
    with running_server(completer) as url, client(url) as c:
        assert c.post("/v1/health").status_code == 200  # Tabby's health check posts an empty body


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "192.168.1.10:8765", "0.0.0.0"])
@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/infill")])
def test_foreign_host_is_refused_on_loopback(host, method, path):
    completer, engine = fake_completer()
    with running_server(completer) as url, client(url) as c:
        r = c.request(method, path, content=b'{"input_prefix": "x"}' if method == "POST" else None,
                      headers={"host": host, **JSON})
        assert r.status_code == 403, r.text
        assert r.json()["error"]["type"] == "host_not_allowed"
        assert engine.prompts == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8765", "localhost", "localhost:1", "LOCALHOST:8765",
                                  "[::1]", "[::1]:8765"])
def test_loopback_hosts_are_served(host):
    completer, _ = fake_completer()
    with running_server(completer) as url, client(url) as c:
        assert c.get("/health", headers={"host": host}).status_code == 200
        assert c.post("/infill", json={"input_prefix": "x = "}, headers={"host": host}).status_code == 200


def test_allowed_hosts_are_served_and_others_still_refused():
    completer, _ = fake_completer()
    cfg = make_config(allowed_hosts="dev.internal, Proxy.Example:443")
    with running_server(completer, cfg) as url, client(url) as c:
        assert c.get("/health", headers={"host": "dev.internal:8765"}).status_code == 200
        assert c.get("/health", headers={"host": "proxy.example"}).status_code == 200
        assert c.get("/health", headers={"host": "evil.example"}).status_code == 403


def test_every_shared_client_body_is_still_served():
    """The bodies that real editor clients send (tests/fixtures/clients) pass the guard."""
    from test_server_harness import FIXTURES

    completer, _ = fake_completer()
    paths = {"llama_vim_infill": "/infill", "llama_vim_warmup": "/infill", "continue_openai_suffix": "/v1/completions",
             "continue_raw_fim": "/v1/completions", "tabby_segments": "/v1/completions"}
    with running_server(completer) as url, client(url) as c:
        for name, path in paths.items():
            body = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
            body.pop("stream", None)
            assert c.post(path, json=body).status_code == 200, name

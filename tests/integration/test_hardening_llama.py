"""Lone surrogates reach the real llama.cpp tokenizer as U+FFFD (issue 12, item 1): before the fix
every one of these bodies was a 500 (UnicodeEncodeError in the tokenizer)."""

from __future__ import annotations

import json

import pytest
from test_server_harness import client, make_config, running_server

from localcoder.completion import Completer

pytestmark = pytest.mark.integration

JSON = {"content-type": "application/json"}
BODIES = [
    ("/infill", {"input_prefix": "def add(a, b\ud800):\n    ", "input_suffix": "\n", "n_predict": 8}),
    ("/infill", {"input_prefix": "x = 1\n", "input_suffix": "# \udc00\n", "prompt": "y = ", "n_predict": 8,
                 "input_extra": [{"filename": "\ud800.py", "text": "Z = '\ud83d'\n"}], "stream": True}),
    ("/v1/completions", {"prompt": "def f\ud800():\n    return ", "suffix": "\n", "max_tokens": 8}),
    ("/v1/completions", {"prompt": "<|fim_prefix|>z\udfff = <|fim_suffix|>\n<|fim_middle|>", "max_tokens": 8,
                         "stream": True}),
    ("/v1/completions", {"segments": {"prefix": "def g(\ud800):\n    ", "suffix": "\n", "filepath": "\udc80.py"}}),
]


@pytest.fixture(scope="module")
def real_server(llama_engine):
    llama_engine.reset_cache()
    with running_server(Completer(llama_engine), make_config(max_tokens=8)) as url:
        yield url


@pytest.mark.parametrize("path,body", BODIES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BODIES)])
def test_lone_surrogates_are_completed_by_llama_cpp(real_server, path, body):
    with client(real_server, timeout=120) as c:
        r = c.post(path, content=json.dumps(body).encode("ascii"), headers=JSON)
    assert r.status_code == 200, r.text
    if body.get("stream"):
        assert "data: " in r.text and "server_error" not in r.text
    else:
        assert "error" not in r.json()

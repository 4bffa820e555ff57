"""End to end with the real packaged Qwen2.5-Coder 0.5B (llama.cpp) behind a real uvicorn socket."""

from __future__ import annotations

import pytest
from test_server_harness import client, fixture, make_config, running_server

from localcoder.completion import Completer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_server(llama_engine):
    llama_engine.reset_cache()
    with running_server(Completer(llama_engine), make_config(suffix_tokens=64, max_tokens=24)) as url:
        yield url


def test_llama_vim_infill_completes_sensibly_and_typing_reuses_the_cache(real_server):
    body = fixture("llama_vim_infill")
    with client(real_server, timeout=120) as c:
        first = c.post("/infill", json=body)
        assert first.status_code == 200, first.text
        text = first.json()["content"]
        assert text.strip(), first.json()
        assert any(word in text for word in ("line", "key", "split", "=", "result")), text
        body["prompt"] += "key"  # the user typed three characters
        second = c.post("/infill", json=body).json()
    assert second["tokens_cached"] > 0
    assert second["timings/prompt_n"] < first.json()["timings/prompt_n"]


def test_continue_raw_fim_and_tabby_with_the_real_model(real_server):
    with client(real_server, timeout=120) as c:
        raw = c.post("/v1/completions", json=fixture("continue_raw_fim")).json()
        tabby = c.post("/v1/completions", json=fixture("tabby_segments")).json()
    assert raw["choices"][0]["text"].strip() and raw["usage"]["prompt_tokens"] > 30
    assert tabby["choices"][0]["text"].strip()

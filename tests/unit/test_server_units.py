"""Server pieces without a socket: schema parsing, the error mapping, auth, metrics (the engine client's
queue is tested in test_client.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.config import CompletionConfig, ServerConfig
from localcoder.engines.fake import FakeEngine
from localcoder.errors import ContextTooLong, InvalidRequest, QueueFull, Unauthorized
from localcoder.fim.formats import get_format
from localcoder.server import schemas
from localcoder.server.auth import bearer_ok, check_bind, is_loopback, resolve_api_key
from localcoder.server.errors import BodyTooLarge, error_response, status_for
from localcoder.server.metrics import Metrics

CLIENTS = Path(__file__).resolve().parents[1] / "fixtures" / "clients"
QWEN = get_format("qwen")


def load(name: str) -> dict:
    return json.loads((CLIENTS / f"{name}.json").read_text())


def test_llama_vim_body_maps_to_an_infill_request():
    call = schemas.parse_infill(load("llama_vim_infill"), CompletionConfig())
    req = call.request
    assert req.prefix.endswith("for line in fh:\n            ") and req.suffix.startswith("\n    return result")
    assert req.max_tokens == 128 and req.time_budget_ms == 1000 and req.indent == 12
    assert req.sampling.top_p == 0.9 and req.sampling.temperature == 0.0
    assert [s.path for s in req.snippets] == ["util/strings.py"] and call.slot == 0


def test_response_fields_flatten_paths_like_llama_cpp():
    body = {"content": "x", "timings": {"prompt_n": 3, "predicted_ms": 1.5}, "truncated": False}
    out = schemas.select_fields(body, ["content", "timings/prompt_n", "missing/x", ""])
    assert out == {"content": "x", "timings/prompt_n": 3}
    assert schemas.select_fields(body, None) is body


def test_raw_fim_prompt_splits_into_prefix_and_suffix():
    call = schemas.parse_openai(load("continue_raw_fim"), CompletionConfig(), QWEN)
    assert call.request.prefix.endswith("for line in fh:\n            ")
    assert call.request.suffix == "\n    return result\n"
    assert "<|endoftext|>" in call.request.stop


def test_tabby_body_maps_context_and_repo():
    call = schemas.parse_tabby(load("tabby_segments"), CompletionConfig(max_tokens=9))
    req = call.request
    assert call.path == "app/config.py" and req.repo == "app" and req.language == "python"
    assert [s.path for s in req.snippets] == ["util/strings.py", "app/main.py"] and req.max_tokens == 9


@pytest.mark.parametrize("body, param", [
    (b"", "body"), (b"  ", "body"), (b"{", "body"), (b"\xff", "body"), (b'"str"', "body"),
])
def test_json_body_errors_name_the_body(body, param):
    with pytest.raises(InvalidRequest) as exc:
        schemas.parse_json_body(body)
    assert exc.value.param == param


@pytest.mark.parametrize("obj, param", [
    ({"n_predict": -1}, "n_predict"), ({"n_predict": 5000}, "n_predict"), ({"n_predict": 1.5}, "n_predict"),
    ({"top_k": -2}, "top_k"), ({"temperature": float("nan")}, "temperature"), ({"cache_prompt": 1}, "cache_prompt"),
    ({"response_fields": "content"}, "response_fields"), ({"input_suffix": ["a"]}, "input_suffix"),
    ({"stop": ["a"] * 17}, "stop"), ({"id_slot": "0"}, "id_slot"),
])
def test_infill_field_errors_name_the_field(obj, param):
    with pytest.raises(InvalidRequest) as exc:
        schemas.parse_infill(obj, CompletionConfig())
    assert exc.value.param == param


def test_whole_float_counts_are_accepted_like_json_numbers():
    assert schemas.parse_infill({"n_predict": 16.0}, CompletionConfig()).request.max_tokens == 16


def test_openai_accepts_known_extensions_and_rejects_unknown():
    ok = schemas.parse_openai({"prompt": ["x"], "suffix": None, "top_k": 5, "user": "u", "stop": "\n"},
                              CompletionConfig(), QWEN)
    assert ok.request.prefix == "x" and ok.request.stop == ("\n",) and ok.user == "u"
    with pytest.raises(InvalidRequest) as exc:
        schemas.parse_openai({"prompt": "x", "best_of": 3}, CompletionConfig(), QWEN)
    assert exc.value.param == "best_of"


def test_stop_types_map_to_llama_cpp_and_openai_vocabularies():
    assert [schemas.llama_stop_type(s) for s in ("eos", "limit", "time", "line", "cancelled")] == \
        ["eos", "limit", "limit", "word", "none"]
    assert schemas.openai_finish_reason("limit") == "length" and schemas.openai_finish_reason("line") == "stop"


def test_one_error_mapping():
    assert status_for(InvalidRequest("x", param="a")) == 400
    assert status_for(ContextTooLong("x")) == 422
    assert status_for(BodyTooLarge("x")) == 413
    assert status_for(Unauthorized("x")) == 401
    r = error_response(QueueFull("full", retry_after_s=3))
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert json.loads(r.body) == {"error": {"message": "full", "type": "queue_full", "param": None}}
    r = error_response(RuntimeError("secret detail"))
    assert r.status_code == 500 and b"secret" not in r.body


def test_auth_helpers(tmp_path):
    assert bearer_ok("Bearer k", "k") and bearer_ok("bearer k", "k")
    assert not bearer_ok("Bearer K", "k") and not bearer_ok(None, "k") and not bearer_ok("Token k", "k")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    check_bind(ServerConfig(host="127.0.0.1"), "")
    check_bind(ServerConfig(host="0.0.0.0"), "key")
    check_bind(ServerConfig(host="0.0.0.0", insecure_no_auth=True), "")
    with pytest.raises(InvalidRequest) as exc:
        check_bind(ServerConfig(host="0.0.0.0"), "")
    assert exc.value.param == "host"
    f = tmp_path / "k"
    f.write_text("abc\n")
    assert resolve_api_key(ServerConfig(api_key_file=str(f))) == "abc"
    with pytest.raises(InvalidRequest):
        resolve_api_key(ServerConfig(api_key_file=str(tmp_path / "missing")))


def test_metrics_render_prometheus_text():
    m = Metrics()
    m.observe_request("/infill", 200, 0.03)
    m.observe_request("/secret/path", 404, 0.001)
    m.observe_cancel("superseded")
    text = m.render({"queue_depth": lambda: 2})
    assert 'localcoder_requests_total{endpoint="/infill",status="200"} 1' in text
    assert 'localcoder_requests_total{endpoint="other",status="404"} 1' in text
    assert 'localcoder_request_seconds_bucket{endpoint="/infill",le="0.025"} 0' in text
    assert 'localcoder_request_seconds_bucket{endpoint="/infill",le="0.05"} 1' in text
    assert 'localcoder_cancellations_total{reason="superseded"} 1' in text and "localcoder_queue_depth 2" in text


def test_metrics_count_completions_by_window():
    from localcoder.completion import CompletionResult
    from localcoder.engines.base import Timings

    m = Metrics()
    for window in ("jump", "full", "full"):
        m.observe_result(CompletionResult("x", "line", "single", Timings(window=window), False, 10))
    m.observe_result(CompletionResult("x", "line", "single", Timings(reused=True), False, 0))  # typed through
    text = m.render({})
    assert 'localcoder_window_completions_total{window="jump"} 1' in text
    assert 'localcoder_window_completions_total{window="full"} 2' in text

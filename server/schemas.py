"""Request and response shapes of the clients we serve: llama.cpp ``/infill``, OpenAI
``/v1/completions`` (with ``suffix`` or a raw FIM prompt) and Tabby's ``segments``.

Parsing turns a JSON body into an ``InfillRequest`` or raises ``InvalidRequest`` naming the
offending field as the client spelled it (``n_predict``, ``segments.prefix``, ``input_extra[0].text``).
Strictness follows the server each shape comes from: OpenAI rejects unknown fields, so does our
OpenAI shape; llama.cpp and Tabby ignore fields they do not know (their clients send many), so
do we, after checking the types of every field we read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

from localcoder.completion import MAX_TOKENS_LIMIT, InfillRequest
from localcoder.config import CompletionConfig
from localcoder.engines.base import Sampling
from localcoder.errors import InvalidRequest
from localcoder.fim.formats import FimFormat, Snippet
from localcoder.text import clean

MAX_STOP_WORDS = 16
MAX_SNIPPETS = 64

# ---- JSON body -----------------------------------------------------------------------------------


def parse_json_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("the request body is empty: send a JSON object", param="body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {exc.start})", param="body") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                             param="body") from None
    except RecursionError:
        raise InvalidRequest("the JSON body is nested too deeply: no request of ours nests more than a "
                             "few levels", param="body") from None
    if not isinstance(obj, dict):
        raise InvalidRequest("the request body must be a JSON object", param="body")
    return obj


# ---- typed field readers -------------------------------------------------------------------------


def _type_error(name: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"{name} must be {expected}, got {type(value).__name__} {value!r:.40}", param=name)


def get_str(obj: dict, key: str, default: str = "", *, name: str | None = None, nullable: bool = True) -> str:
    name = name or key
    value = obj.get(key, default)
    if value is None and nullable:
        return default
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def get_int(obj: dict, key: str, default: int, lo: int, hi: int, *, name: str | None = None) -> int:
    name = name or key
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {value}", param=name)
    return value


def get_float(obj: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = obj.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _type_error(key, "a number", value)
    if value > hi or value < lo or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise InvalidRequest(f"{key} must be in {bracket}{lo}, {hi}], got {value}", param=key)
    return float(value)


def get_bool(obj: dict, key: str, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(key, "true or false", value)
    return value


def get_stop(obj: dict, key: str = "stop") -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise _type_error(key, "a string or a list of strings", value)
    if len(words) > MAX_STOP_WORDS:
        raise InvalidRequest(f"{key} has {len(words)} entries; at most {MAX_STOP_WORDS}", param=key)
    return tuple(w for w in words if w)


def get_list(obj: dict, key: str, *, name: str | None = None) -> list:
    name = name or key
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _type_error(name, "a list", value)
    if len(value) > MAX_SNIPPETS:
        raise InvalidRequest(f"{name} has {len(value)} entries; at most {MAX_SNIPPETS}", param=name)
    return value


def get_object(obj: dict, key: str, *, name: str | None = None, required: bool = False) -> dict:
    name = name or key
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"{name} is required", param=name)
        return {}
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    return value


def get_sampling(obj: dict) -> Sampling:
    return Sampling(temperature=get_float(obj, "temperature", 0.0, 0.0, 2.0),
                    top_k=get_int(obj, "top_k", 40, 0, 1000),
                    top_p=get_float(obj, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                    seed=get_int(obj, "seed", 0, -1, 2**32 - 1))


def snippets_from(items: list, name: str, path_key: str, text_key: str) -> list[Snippet]:
    out = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise _type_error(where, "an object", item)
        text = get_str(item, text_key, name=f"{where}.{text_key}")
        if text:
            out.append(Snippet(get_str(item, path_key, "untitled", name=f"{where}.{path_key}") or "untitled", text))
    return out


# ---- llama.cpp /infill ---------------------------------------------------------------------------


@dataclass
class InfillCall:
    request: InfillRequest
    stream: bool
    response_fields: list[str] | None
    slot: int | None  # llama.cpp id_slot: a client's lane (supersedes its previous request)
    lane: str | None = None  # our extension: a named lane (the LSP's document), wins over id_slot


def parse_infill(obj: dict, defaults: CompletionConfig) -> InfillCall:
    """llama.cpp's /infill: prefix = input_prefix + prompt (the cursor line up to the cursor)."""
    extra = snippets_from(get_list(obj, "input_extra"), "input_extra", "filename", "text")
    fields = obj.get("response_fields")
    if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
        raise _type_error("response_fields", "a list of strings", fields)
    slot = get_int(obj, "id_slot", -1, -1, 1 << 20)
    indent = get_int(obj, "n_indent", 0, 0, 1000)
    req = InfillRequest(
        prefix=get_str(obj, "input_prefix") + get_str(obj, "prompt"),
        suffix=get_str(obj, "input_suffix"),
        snippets=extra,
        max_tokens=get_int(obj, "n_predict", defaults.max_tokens, 0, MAX_TOKENS_LIMIT),
        time_budget_ms=get_int(obj, "t_max_predict_ms", defaults.time_budget_ms, 0, 600_000),
        stop=get_stop(obj),
        sampling=get_sampling(obj),
        indent=indent or None,
        cache_prompt=get_bool(obj, "cache_prompt", True),
        **_localcoder_fields(obj, defaults),
    )
    req = checked_option(obj, req, "n_predict")
    lane = get_str(obj, "lane") or None
    return InfillCall(req, get_bool(obj, "stream", False), fields, slot if slot >= 0 else None, lane)


def _localcoder_fields(obj: dict, defaults: CompletionConfig) -> dict[str, Any]:
    """Fields our own HTTP client sends to /infill so a remote request equals a local one: the
    file's path, repo and language, the mode, the FIM order and the context budget."""
    from localcoder.fim.context import Budget

    out: dict[str, Any] = {"mode": get_str(obj, "mode", defaults.mode) or defaults.mode}
    for key in ("path", "repo", "language", "order"):
        out[key] = get_str(obj, key) or None
    if any(k in obj for k in ("prefix_tokens", "suffix_tokens", "extra_tokens")):
        out["budget"] = Budget(get_int(obj, "prefix_tokens", defaults.prefix_tokens, 0, 1 << 20),
                               get_int(obj, "suffix_tokens", defaults.suffix_tokens, 0, 1 << 20),
                               get_int(obj, "extra_tokens", defaults.extra_tokens, 0, 1 << 20))
    return out


def checked_option(obj: dict, req: InfillRequest, max_tokens_key: str) -> InfillRequest:
    """Our extension on /infill and /v1/completions: ``"check": "tests"`` (with ``candidates`` and
    ``check_tests``) asks for an execution-checked completion (``localcoder.checked``); the response
    then carries ``checked`` (every candidate, its score, the tests it passes, errors)."""
    check = get_str(obj, "check", "off") or "off"
    if check == "off":
        return req
    if check != "tests":
        raise InvalidRequest(f"check must be off or tests, got {check!r}", param="check")
    from localcoder.checked import MAX_CANDIDATES, MAX_TESTS, CheckOptions, checked_request

    s = req.sampling
    opts = CheckOptions(candidates=get_int(obj, "candidates", 8, 1, MAX_CANDIDATES),
                        tests=get_int(obj, "check_tests", 8, 0, MAX_TESTS),
                        temperature=s.temperature if "temperature" in obj else 0.8,
                        top_p=s.top_p if "top_p" in obj else 0.95, seed=max(0, s.seed),
                        max_tokens=req.max_tokens if obj.get(max_tokens_key) else 256)
    return checked_request(req, opts)


def checked_field(result) -> dict[str, Any]:
    """``{"checked": evidence}`` for a checked completion's result, else nothing."""
    evidence = getattr(result, "checked", None)
    return {"checked": evidence} if evidence is not None else {}


def infill_response(result, model: str, slot: int | None) -> dict[str, Any]:
    timings = result.timings
    return {
        "index": 0,
        "content": result.text,
        "id_slot": slot if slot is not None else 0,
        "stop": True,
        "model": model,
        "tokens_predicted": timings.predicted_n,
        "tokens_evaluated": result.tokens_evaluated,
        "tokens_cached": result.tokens_cached,
        "truncated": result.truncated,
        "stop_type": llama_stop_type(result.stop_type),
        "stop_reason": result.stop_type,  # ours, finer than llama.cpp's eos|limit|word|none
        "has_new_line": "\n" in result.text,
        "timings": timings.to_dict(),
        **checked_field(result),
    }


def llama_stop_type(ours: str) -> str:
    if ours in ("eos", "limit", "word"):
        return ours
    if ours == "time":
        return "limit"
    if ours == "cancelled":
        return "none"
    return "word"  # line / block / suffix / brackets: a stop rule matched


def select_fields(body: dict[str, Any], fields: Sequence[str] | None) -> dict[str, Any]:
    """llama.cpp's ``response_fields``: keep only these; a path ``a/b`` becomes the flat key ``"a/b"``."""
    if fields is None:
        return body
    out: dict[str, Any] = {}
    for path in fields:
        node: Any = body
        for part in path.split("/"):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            out[path] = node
    return out


# ---- OpenAI /v1/completions ----------------------------------------------------------------------

OPENAI_FIELDS = frozenset({
    # OpenAI's documented completion fields
    "model", "prompt", "suffix", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user",
    "seed",
    # extensions that FIM clients send to llama.cpp / Ollama / vLLM-style servers
    "top_k", "min_p", "repeat_penalty", "cache_prompt", "raw", "keep_alive", "id_slot",
    # ours: execution-checked completion (checked_option)
    "check", "candidates", "check_tests",
})


@dataclass
class OpenAICall:
    request: InfillRequest
    stream: bool
    model: str
    user: str | None


def parse_openai(obj: dict, defaults: CompletionConfig, fmt: FimFormat) -> OpenAICall:
    unknown = sorted(set(obj) - OPENAI_FIELDS)
    if unknown:
        raise InvalidRequest(f"unrecognized request argument: {unknown[0]}", param=unknown[0])
    _reject_unsupported(obj)
    prompt = clean(_single_prompt(obj))  # before the raw-FIM split looks for the markers
    suffix = clean(get_str(obj, "suffix"))
    if any(marker in prompt for marker in (fmt.prefix, fmt.suffix, fmt.middle)):
        prompt, suffix = _split_raw_fim(prompt, suffix, fmt)
    req = InfillRequest(
        prefix=prompt, suffix=suffix, mode=defaults.mode,
        max_tokens=get_int(obj, "max_tokens", defaults.max_tokens, 0, MAX_TOKENS_LIMIT),
        time_budget_ms=defaults.time_budget_ms, stop=get_stop(obj), sampling=get_sampling(obj),
        cache_prompt=get_bool(obj, "cache_prompt", True),
    )
    req = checked_option(obj, req, "max_tokens")
    user = get_str(obj, "user") or None
    return OpenAICall(req, get_bool(obj, "stream", False), get_str(obj, "model"), user)


def _reject_unsupported(obj: dict) -> None:
    get_bool(obj, "echo", False)
    get_float(obj, "presence_penalty", 0.0, -2.0, 2.0)
    get_float(obj, "frequency_penalty", 0.0, -2.0, 2.0)
    get_object(obj, "stream_options")
    if obj.get("echo"):
        raise InvalidRequest("echo is not supported: a FIM completion returns only the middle", param="echo")
    if get_int(obj, "n", 1, 1, 128) != 1:
        raise InvalidRequest("n must be 1: one completion per request", param="n")
    if get_int(obj, "best_of", 1, 1, 128) != 1:
        raise InvalidRequest("best_of must be 1", param="best_of")
    if obj.get("logprobs") not in (None, 0, False):
        raise InvalidRequest("logprobs are not supported", param="logprobs")


def _single_prompt(obj: dict) -> str:
    prompt = obj.get("prompt", "")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise InvalidRequest("prompt must be a string (or a list holding one string)", param="prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _type_error("prompt", "a string", prompt)
    return prompt


def _split_raw_fim(prompt: str, suffix: str, fmt: FimFormat) -> tuple[str, str]:
    """A prompt that already holds the model's FIM markers (Continue with a model template): its
    markers are the special tokens, so we rebuild the same token sequence from its parts."""
    if suffix:
        raise InvalidRequest("send either a raw FIM prompt or a suffix, not both", param="suffix")
    parsed = fmt.split_psm(prompt)
    if parsed is None:
        raise InvalidRequest(
            f"prompt contains FIM tokens but is not {fmt.prefix}prefix{fmt.suffix}suffix{fmt.middle}",
            param="prompt")
    return parsed


def openai_finish_reason(stop_type: str) -> str:
    return "length" if stop_type in ("limit", "time") else "stop"


def openai_usage(result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.timings.predicted_n,
            "total_tokens": result.prompt_tokens + result.timings.predicted_n}


# ---- Tabby /v1/completions -----------------------------------------------------------------------


@dataclass
class TabbyCall:
    request: InfillRequest
    path: str | None


def is_tabby(obj: dict) -> bool:
    return "segments" in obj


def parse_tabby(obj: dict, defaults: CompletionConfig) -> TabbyCall:
    seg = get_object(obj, "segments", required=True)
    path = get_str(seg, "filepath", name="segments.filepath") or None
    snippets = (snippets_from(get_list(seg, "declarations", name="segments.declarations"),
                              "segments.declarations", "filepath", "body")
                + snippets_from(get_list(seg, "relevant_snippets_from_changed_files",
                                         name="segments.relevant_snippets_from_changed_files"),
                                "segments.relevant_snippets_from_changed_files", "filepath", "body")
                + snippets_from(get_list(seg, "relevant_snippets_from_recently_opened_files",
                                         name="segments.relevant_snippets_from_recently_opened_files"),
                                "segments.relevant_snippets_from_recently_opened_files", "filepath", "body"))
    get_str(seg, "clipboard", name="segments.clipboard")  # type-checked; not used in the prompt
    req = InfillRequest(
        prefix=get_str(seg, "prefix", name="segments.prefix"),
        suffix=get_str(seg, "suffix", name="segments.suffix"),
        snippets=snippets, path=path, repo=_repo_name(get_str(seg, "git_url", name="segments.git_url")),
        language=get_str(obj, "language") or None, mode=defaults.mode, max_tokens=defaults.max_tokens,
        time_budget_ms=defaults.time_budget_ms,
        sampling=Sampling(temperature=get_float(obj, "temperature", 0.0, 0.0, 2.0),
                          seed=get_int(obj, "seed", 0, -1, 2**32 - 1)),
    )
    return TabbyCall(req, path)


def _repo_name(git_url: str) -> str | None:
    name = git_url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    return name or None

"""An engine in front of an existing inference server (vLLM, llama.cpp's llama-server, anything with
an OpenAI-style ``/v1/completions`` that takes a list of token ids as ``prompt``).

Everything above the engine (FIM formats, budgets, stop rules, the API shapes, the LSP) runs here
unchanged: the prompt is built and tokenized locally, sent as **token ids** with ``stream: true``,
and the stream comes back as token ids:

- llama-server (found by its ``/props``): its native ``/completion`` with ``return_tokens: true`` gives
  each chunk's ``tokens`` (its ``/v1/completions`` sends text only);
- vLLM: ``logprobs`` with ``return_tokens_as_token_ids`` gives ``"token_id:N"`` strings;
- otherwise the text is re-tokenized, holding back the last token until the text after it is known
  (a token boundary can move while more text arrives).

Closing the TokenStream, or ``request.cancel`` (checked between chunks), closes the HTTP stream, and
both servers abort a generation whose client went away. A remote that is down, slow, cut or talking
nonsense gives ``BackendUnavailable`` (HTTP 503) within the connect / read timeouts; every request
tries again, so the engine recovers by itself. The tokenizer comes from the model's own files; at the
first contact a probe string is tokenized both ways (where the server has ``/tokenize``) and a
different vocabulary is refused.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

from localcoder.engines.base import GenerationRequest, Stopwatch, Timings, TokenStream, Tokenizer, check_request
from localcoder.errors import BackendUnavailable, InvalidRequest, LocalcoderError

log = logging.getLogger("localcoder.engines.remote")

PROBE = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # ünïcödé → 你好\n\tx = 1e-9"


class RemoteEngine:
    name = "remote"
    device = "remote"

    def __init__(self, url: str, tokenizer: Tokenizer, *, model_name: str = "remote", remote_model: str = "",
                 api_key: str = "", n_ctx: int = 4096, connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"engine_url must be an http(s) URL, got {url!r}", param="engine_url")
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.remote_model = remote_model
        self.n_ctx = n_ctx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        # health, props, tokenize; like the generation stream (_stream), straight to the URL given, with no
        # proxy taken from the environment
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)
        self._headers = {**headers, "Content-Type": "application/json", "Accept": "text/event-stream"}
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self._vocab_checked = False
        self.native = False  # llama-server: its own /completion streams token ids (found at first contact)
        self.requests = 0
        self.errors = 0  # requests that ended in an error (remote down, HTTP error, cut stream, timeout)
        self.last_latency_ms = 0.0  # time to the first streamed token of the latest request
        self.check_vocabulary(required=False)

    @classmethod
    def from_config(cls, model, cfg) -> "RemoteEngine":
        if not cfg.engine_url:
            raise InvalidRequest("--engine remote needs --engine-url (the server's base URL)", param="engine_url")
        return cls(cfg.engine_url, local_tokenizer(model), model_name=model.name, remote_model=cfg.engine_model,
                   api_key=cfg.engine_api_key, n_ctx=cfg.ctx, connect_timeout_s=cfg.engine_connect_timeout_s,
                   read_timeout_s=cfg.engine_read_timeout_s)

    # ---- the Engine protocol --------------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> TokenStream:
        check_request(request, self.n_ctx)
        self.check_vocabulary(required=False)
        return TokenStream(lambda timings: self._counted(request, timings))

    def counters(self) -> dict[str, float]:
        """For ``/metrics`` (the per-request latency is in ``localcoder_engine_seconds``)."""
        return {"remote_requests_total": self.requests, "remote_errors_total": self.errors,
                "remote_first_token_seconds_last": round(self.last_latency_ms / 1000.0, 6)}

    def reset_cache(self) -> None:
        """The remote manages its own prefix cache; requests may opt out with ``cache_prompt``."""

    def close(self) -> None:
        self._http.close()

    def health(self) -> dict[str, Any]:
        """The remote's ``/health`` (both servers have one), for our ``/health``; never raises."""
        import httpx

        out: dict[str, Any] = {"url": self.url, "model": self.remote_model or None, "requests": self.requests,
                               "last_latency_ms": round(self.last_latency_ms, 3)}
        clock = Stopwatch()
        try:
            r = self._http.get("/health", timeout=3.0)
        except httpx.HTTPError as exc:
            return {**out, "status": "unreachable", "error": f"{exc.__class__.__name__}: {exc}"}
        out.update(status="ok" if r.status_code == 200 else "error", http_status=r.status_code,
                   health_ms=round(clock.ms(), 3))
        if r.status_code != 200:
            out["error"] = r.text[:200]
        return out

    # ---- one request ----------------------------------------------------------------------------
    def body(self, request: GenerationRequest) -> dict[str, Any]:
        """The request body: llama-server's native ``/completion`` (``return_tokens``: ids per chunk), or
        OpenAI's ``/v1/completions`` with vLLM's ``return_tokens_as_token_ids`` (ids in ``logprobs``)."""
        s = request.sampling
        body: dict[str, Any] = {
            "prompt": list(request.tokens), "stream": True, "temperature": s.temperature, "top_p": s.top_p,
            "top_k": s.top_k if s.temperature > 0 else 1, "seed": s.seed, "cache_prompt": request.cache_prompt,
        }
        if self.native:
            return {**body, "n_predict": request.max_tokens, "return_tokens": True}
        body.update(max_tokens=request.max_tokens, logprobs=1, return_tokens_as_token_ids=True,
                    stream_options={"include_usage": True})
        if request.stop_token_ids:
            body["stop_token_ids"] = sorted(request.stop_token_ids)  # vLLM stops there (llama-server on EOG)
        if self.remote_model:
            body["model"] = self.remote_model
        return body

    def _counted(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        try:
            yield from self._run(request, timings)
        except LocalcoderError:
            self.errors += 1
            raise

    def _run(self, request: GenerationRequest, timings: Timings) -> Iterator[int]:
        timings.prompt_n = len(request.tokens)
        self.requests += 1
        clock = Stopwatch()
        decoded = _Decoder(self.tokenizer)
        first: float | None = None
        if request.max_tokens == 0 or request.cancel.cancelled:
            timings.cancelled = request.cancel.cancelled
            return
        try:
            path = "/completion" if self.native else "/v1/completions"
            with self._stream(path, self.body(request)) as response:
                if response.status != 200:
                    raise self._http_error(response.status, response.read().decode("utf-8", "replace"))
                for chunk in _events(response, self.url):
                    if request.cancel.cancelled:  # leaving the `with` closes the stream: the remote aborts
                        timings.cancelled = True
                        return
                    if first is None:
                        first = clock.ms()
                        timings.prompt_ms = self.last_latency_ms = first
                    for token in decoded.feed(chunk):
                        if (yield from self._emit(token, request, timings, clock, first)):
                            return
                    if decoded.finished:
                        break
                else:
                    raise BackendUnavailable(f"{self.url} closed the stream before [DONE]",
                                             hint="the remote server may have crashed or restarted")
        except TimeoutError as exc:
            raise BackendUnavailable(f"the remote engine at {self.url} timed out ({exc.__class__.__name__})",
                                     hint="it is overloaded or stuck; see --engine-read-timeout-s") from None
        except http.client.IncompleteRead:
            raise BackendUnavailable(f"{self.url} closed the stream in the middle of a chunk",
                                     hint="the remote server may have crashed or restarted") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        for token in decoded.flush():
            if (yield from self._emit(token, request, timings, clock, first or 0.0)):
                return
        timings.stopped_by_token = decoded.finish_reason in ("stop", "eos")
        _apply_server_timings(timings, decoded.server_timings)

    @contextmanager
    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[http.client.HTTPResponse]:
        """POST ``body`` and hand back the streaming response, on a connection of its own that is closed
        afterwards (closing it is what makes the remote abort a generation we leave early).

        The generation stream uses the standard library's HTTP client rather than httpx: it runs once
        per token, and on a 64-token llama-server stream httpx's layers cost 19-20 ms of CPU against
        http.client's 10 (a bare socket: 6), CPU that on a shared box the engine's own threads lose."""
        url = urlsplit(self.url)
        connect_s, read_s = self._timeouts
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = cls(url.hostname or "127.0.0.1", url.port, timeout=connect_s)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(read_s)
            conn.request("POST", url.path.rstrip("/") + path, body=json.dumps(body).encode(), headers=self._headers)
            yield conn.getresponse()
        finally:
            conn.close()

    @staticmethod
    def _emit(token: int, request: GenerationRequest, timings: Timings, clock: Stopwatch, first: float):
        """Yield one token; True when a stop token ended the stream (the caller then closes it)."""
        timings.predicted_n += 1
        timings.predicted_ms = clock.ms() - first
        if token in request.stop_token_ids:
            timings.stopped_by_token = True
            return True
        yield token
        return False

    # ---- errors and the vocabulary check --------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"the remote engine at {self.url} is unreachable ({exc.__class__.__name__})",
                                  hint="start it, or fix --engine-url; requests succeed again once it is up")

    def _http_error(self, status: int, text: str) -> LocalcoderError:
        message = _error_message(text)
        if status in (400, 422):
            return InvalidRequest(f"the remote engine at {self.url} rejected the request: {message}", param="prompt")
        if status in (401, 403):
            return BackendUnavailable(f"the remote engine at {self.url} refused our credentials: {message}",
                                      hint="set --engine-api-key to the remote server's key")
        return BackendUnavailable(f"the remote engine at {self.url} failed with HTTP {status}: {message}")

    def check_vocabulary(self, *, required: bool) -> None:
        """Tokenize ``PROBE`` locally and on the remote's ``/tokenize``; refuse a different vocabulary.
        A remote that is down is checked again at the next request (``required`` raises instead)."""
        import httpx

        if self._vocab_checked:
            return
        self.native = self._is_llama_server()
        body: dict[str, Any] = {"content": PROBE, "prompt": PROBE, "add_special": False, "add_special_tokens": False}
        if self.remote_model:
            body["model"] = self.remote_model
        try:
            r = self._http.post("/tokenize", json=body, timeout=5.0)
        except httpx.HTTPError as exc:
            if required:
                raise self._unreachable(exc) from None
            log.warning("remote engine at %s not reachable yet (%s)", self.url, exc.__class__.__name__)
            return
        if r.status_code in (404, 405, 501):  # no /tokenize: nothing to compare
            self._vocab_checked = True
            return
        try:
            remote = [int(t) for t in r.json()["tokens"]]
        except (ValueError, KeyError, TypeError):
            log.warning("remote engine at %s: unexpected /tokenize answer (HTTP %s)", self.url, r.status_code)
            return
        local = self.tokenizer.tokenize(PROBE)
        log.info("remote engine at %s (%s)", self.url, "llama-server" if self.native else "OpenAI-style")
        if remote != local:
            at = next((i for i, (a, b) in enumerate(zip(local, remote)) if a != b), min(len(local), len(remote)))
            raise BackendUnavailable(
                f"the remote engine at {self.url} uses a different vocabulary than the local tokenizer of "
                f"{self.model_name}: a probe string gives {len(remote)} remote vs {len(local)} local tokens, "
                f"first difference at token {at}",
                hint="serve the same model on the remote, or pass the matching --model")
        self._vocab_checked = True


    def _is_llama_server(self) -> bool:
        """llama-server answers ``/props`` with its generation settings; vLLM has no such route."""
        import httpx

        try:
            r = self._http.get("/props", timeout=5.0)
            return r.status_code == 200 and "default_generation_settings" in r.json()
        except (httpx.HTTPError, ValueError, AttributeError):
            return False


class _Decoder:
    """Token ids out of OpenAI-style completion chunks (ids where the server sends them, else text)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.finished = False
        self.finish_reason: str | None = None
        self.server_timings: dict[str, Any] = {}
        self._text = ""  # text-only servers: everything so far, re-tokenized as it grows
        self._sent = 0  # tokens of _text already given out

    def feed(self, chunk: dict[str, Any]) -> list[int]:
        if chunk.get("done"):
            self.finished = True
            return []
        self.server_timings.update(_timings_of(chunk))
        choices = chunk.get("choices")
        if choices is None and "content" in chunk:  # llama-server's native shape
            choices = [chunk]
        if not isinstance(choices, list):
            raise BackendUnavailable("the remote engine sent a chunk without `choices`")
        out: list[int] = []
        for choice in choices[:1]:
            if not isinstance(choice, dict):
                raise BackendUnavailable("the remote engine sent a malformed chunk")
            out.extend(self._ids(choice, chunk))
            if choice.get("finish_reason") or choice.get("stop_type"):
                self.finish_reason = str(choice.get("finish_reason") or choice.get("stop_type"))
        return out

    def _ids(self, choice: dict[str, Any], chunk: dict[str, Any]) -> list[int]:
        tokens = choice.get("tokens", chunk.get("tokens"))
        if isinstance(tokens, list) and all(isinstance(t, int) for t in tokens):
            return tokens
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
            ids = [_token_id(t) for t in logprobs["tokens"]]
            if all(i is not None for i in ids):
                return ids  # type: ignore[return-value]
        text = choice.get("text", choice.get("content", ""))
        if not isinstance(text, str):
            raise BackendUnavailable("the remote engine sent a chunk whose text is not a string")
        return self._retokenize(text)

    def _retokenize(self, text: str) -> list[int]:
        """All but the last token of the text so far (its boundary may still move)."""
        if not text:
            return []
        self._text += text
        ids = self.tokenizer.tokenize(self._text)
        stable = ids[:-1]
        out, self._sent = stable[self._sent:], max(self._sent, len(stable))
        return out

    def flush(self) -> list[int]:
        if not self._text:
            return []
        ids = self.tokenizer.tokenize(self._text)
        out, self._sent = ids[self._sent:], len(ids)
        return out


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The stream's lines as bytes, as they arrive (SSE splits on newlines; JSON parses bytes)."""
    rest = b""
    while chunk := response.read1(65536):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if rest:
        yield rest


def _events(response, url: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of an SSE stream; ``{"done": True}`` for ``data: [DONE]``."""
    for line in _lines(response):
        if not line.startswith(b"data:"):
            if line.startswith(b"error:"):
                detail = line[6:].strip()[:200].decode("utf-8", "replace")
                raise BackendUnavailable(f"the remote engine at {url} reported an error: {detail}")
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            yield {"done": True}
            return
        try:
            data = json.loads(payload)
        except ValueError:  # not JSON, or not UTF-8
            raise BackendUnavailable(f"the remote engine at {url} sent something that is not JSON: {payload[:80]!r}",
                                     hint="is --engine-url an OpenAI-style completions server?") from None
        if not isinstance(data, dict):
            raise BackendUnavailable(f"the remote engine at {url} sent a non-object chunk")
        if "error" in data:
            message = _error_message(payload.decode("utf-8", "replace"))
            raise BackendUnavailable(f"the remote engine at {url} reported an error: {message}")
        yield data
        if data.get("stop") is True:  # llama-server's native shape ends without [DONE]
            yield {"done": True}
            return


def _token_id(token: Any) -> int | None:
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[9:])
        except ValueError:
            return None
    return None


def _timings_of(chunk: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(chunk.get("timings"), dict):
        out.update(chunk["timings"])
    if isinstance(chunk.get("usage"), dict):
        out["usage"] = chunk["usage"]
    return out


def _apply_server_timings(timings: Timings, server: dict[str, Any]) -> None:
    """Prefill/decode as the remote measured them (llama-server's ``timings``); our clocks otherwise."""
    try:
        if "prompt_ms" in server:
            timings.prompt_ms = float(server["prompt_ms"])
            timings.cached_n = max(0, min(timings.prompt_n, int(server.get("cache_n", 0) or 0)))
        if "predicted_ms" in server:
            timings.predicted_ms = float(server["predicted_ms"])
    except (TypeError, ValueError):
        log.warning("ignoring malformed remote timings: %r", server)


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text.strip()[:200] or "(empty body)"
    if isinstance(err, dict):
        return str(err.get("message", err))[:200]
    return str(err)[:200]


def local_tokenizer(model) -> Tokenizer:
    """The model's tokenizer without its weights: GGUF vocabulary only, or the HF tokenizer files."""
    if model.kind == "fake":
        from localcoder.engines.fake import ByteTokenizer

        return ByteTokenizer()
    if model.kind == "gguf":
        from localcoder.engines.llamacpp import LlamaTokenizer, import_llama

        llama_cpp = import_llama()
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(model_path=str(model.path), vocab_only=True, verbose=False)
        log.info("vocabulary of %s loaded in %.0f ms", model.name, (time.perf_counter() - t0) * 1000)
        tok = LlamaTokenizer(llm)
        tok._keepalive = llm  # type: ignore[attr-defined]  # the vocab lives as long as the Llama
        return tok
    if model.kind in ("hf", "onnx"):
        from transformers import AutoTokenizer

        from localcoder.engines.torch import HFTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(model.path)))
    raise InvalidRequest(f"no local tokenizer for a {model.kind} model", param="model")

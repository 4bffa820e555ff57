"""Where completions come from: an engine loaded in this process, or a running `localcoder serve`.

Both are called from the server's single engine thread (one generation at a time), never from
the event loop. Heavy libraries are imported only when the in-process backend is opened, and only
the configured engine's (``localcoder lsp`` with a GGUF model never imports torch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import CancelToken
from localcoder.errors import (BackendUnavailable, InvalidRequest, LocalcoderError, ModelNotFound, QueueFull,
                               Unauthorized)
from localcoder.fim.context import Budget

log = logging.getLogger("localcoder.lsp")


@dataclass
class Completion:
    text: str
    stop_type: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    elapsed_ms: float = 0.0


class Backend(Protocol):
    description: str

    def complete(self, req: InfillRequest, cancel: CancelToken) -> Completion: ...

    def set_budget(self, budget: Budget) -> None: ...

    def counters(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def budget_of(cfg: Config) -> Budget:
    c = cfg.completion
    return Budget(c.prefix_tokens, c.suffix_tokens, c.extra_tokens)


class LocalBackend:
    """A Completer over an engine in this process."""

    def __init__(self, completer: Completer, description: str):
        self.completer = completer
        self.description = description

    @classmethod
    def open(cls, cfg: Config) -> "LocalBackend":
        from localcoder.completion import completer_for
        from localcoder.engines import load_engine
        from localcoder.models import resolve

        model = resolve(cfg.model.model, pull_if_missing=False, progress=False)
        engine = load_engine(model, cfg.model)
        fmt = cfg.model.fim_format if cfg.model.fim_format != "auto" else model.fim_format
        completer = completer_for(engine, fmt, cfg.model.fim_order, budget_of(cfg))
        completer.format  # NotFimCapable now rather than at the first keystroke
        return cls(completer, f"{engine.name}:{model.name}")

    def complete(self, req: InfillRequest, cancel: CancelToken) -> Completion:
        t0 = time.perf_counter()
        r = self.completer.complete(req, cancel)
        return Completion(r.text, r.stop_type, r.prompt_tokens, r.tokens_cached,
                          (time.perf_counter() - t0) * 1000)

    def set_budget(self, budget: Budget) -> None:
        self.completer.budget = budget

    def counters(self) -> dict[str, Any]:
        engine = self.completer.engine
        out: dict[str, Any] = {"engine": engine.name, "model": engine.model_name}
        if hasattr(engine, "tokens_generated_total"):  # the fake engine counts decode steps
            out["engine_tokens_generated"] = engine.tokens_generated_total
        return out

    def close(self) -> None:
        self.completer.engine.close()


class HttpBackend:
    """A running `localcoder serve` (or llama.cpp's server) through its ``POST /infill``."""

    def __init__(self, url: str, timeout_s: float = 120.0):
        import httpx

        self.url = url.rstrip("/")
        self.description = f"http:{self.url}"
        self._client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=3.0))
        self._budget = Budget()
        self.requests = 0

    @classmethod
    def open(cls, cfg: Config) -> "HttpBackend":
        backend = cls(cfg.lsp.server_url)
        backend.set_budget(budget_of(cfg))
        return backend

    def check(self) -> None:
        """Fail early (at start-up) when the server is not there."""
        import httpx

        try:
            self._client.get("/health", timeout=3.0)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"cannot reach localcoder serve at {self.url}: {exc.__class__.__name__}",
                                     hint="start it with `localcoder serve` or fix serverUrl") from None

    def body(self, req: InfillRequest) -> dict[str, Any]:
        return {
            "input_prefix": req.prefix,
            "input_suffix": req.suffix,
            "input_extra": [{"filename": s.path, "text": s.text} for s in req.snippets],
            "n_predict": req.max_tokens,
            "t_max_predict_ms": req.time_budget_ms,
            "stream": False,
        }

    def complete(self, req: InfillRequest, cancel: CancelToken) -> Completion:
        import httpx

        t0 = time.perf_counter()
        self.requests += 1
        try:
            r = self._client.post("/infill", json=self.body(req))
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"cannot reach localcoder serve at {self.url}: {exc.__class__.__name__}",
                                     hint="start it with `localcoder serve` or fix serverUrl") from None
        if r.status_code != 200:
            kind, message = _error_body(r)
            raise http_error(r.status_code, kind, message, self.url)
        data = r.json()
        timings = data.get("timings") or {}
        return Completion(str(data.get("content", "")), str(data.get("stop_type", "")),
                          int(data.get("tokens_evaluated", 0) or 0), int(timings.get("cache_n", 0) or 0),
                          (time.perf_counter() - t0) * 1000)

    def set_budget(self, budget: Budget) -> None:
        self._budget = budget  # the server applies its own budgets; kept for symmetry

    def counters(self) -> dict[str, Any]:
        return {"engine": "http", "server_url": self.url, "http_requests": self.requests}

    def close(self) -> None:
        self._client.close()


def _error_body(r: Any) -> tuple[str | None, str]:
    """(error type, message) from an OpenAI/llama.cpp-style error body."""
    try:
        err = r.json().get("error")
    except ValueError:
        return None, r.text[:200]
    if isinstance(err, dict):
        return err.get("type"), str(err.get("message", ""))
    return None, str(err or r.text[:200])


def _kinds() -> dict[str, type[LocalcoderError]]:
    import localcoder.errors as errors

    out = {}
    for obj in vars(errors).values():
        if isinstance(obj, type) and issubclass(obj, LocalcoderError) and obj is not QueueFull:
            out.setdefault(obj.kind, obj)
    return out


def http_error(status: int, kind: str | None, message: str, url: str) -> LocalcoderError:
    """The server's error back to our typed errors: by its ``type`` field, else by HTTP status."""
    cls = _kinds().get(kind or "")
    if cls is not None:
        return cls(f"{url}: {message}")
    if status == 429:
        return QueueFull(f"{url} is busy: {message}")
    if status in (401, 403):
        return Unauthorized(f"{url} refused the request: {message}", hint="check the server's API key")
    if status == 404:
        return ModelNotFound(f"{url}: {message}")
    if 400 <= status < 500:
        return InvalidRequest(f"{url} rejected the request: {message}")
    return BackendUnavailable(f"{url} failed with HTTP {status}: {message}")


def open_backend(cfg: Config) -> Backend:
    if cfg.lsp.server_url:
        return HttpBackend.open(cfg)
    return LocalBackend.open(cfg)

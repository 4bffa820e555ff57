"""Typed settings of the language server: initializationOptions and didChangeConfiguration.

Clients send camelCase (``maxTokens``) or snake_case (``max_tokens``) keys, flat or under a
``localcoder`` section. Each key maps onto one field of the one ``Config`` (defaults < config file
< environment < command line < these settings), so validation and defaults live in one place and
a bad value is an ``InvalidRequest`` naming the setting.

| key              | Config field                | default              |
|------------------|-----------------------------|----------------------|
| serverUrl        | lsp.server_url              | "" (load in-process) |
| model, engine    | model.model, model.engine   | qwen2.5-coder-0.5b, auto |
| threads, ctx     | model.threads, model.ctx    | 0, 4096              |
| mode             | completion.mode             | auto                 |
| maxTokens        | completion.max_tokens       | 64                   |
| timeBudgetMs     | completion.time_budget_ms   | 0 (no limit)         |
| debounceMs       | lsp.debounce_ms             | 0                    |
| contextTokens    | completion.extra_tokens     | 512                  |
| prefixTokens, suffixTokens | completion.prefix_tokens / suffix_tokens | 1024, 256 |
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, fields
from typing import Any

from localcoder.config import Config, ModelConfig, field_names
from localcoder.errors import InvalidRequest

log = logging.getLogger("localcoder.lsp")

ALIASES = {"context_tokens": "extra_tokens", "url": "server_url", "debounce": "debounce_ms"}
CLIENT_ONLY = {"enabled", "command", "extra_args", "cmd", "keymaps", "filetypes", "native", "trace"}
RELOAD_FIELDS = {f.name for f in fields(ModelConfig)} | {"server_url"}


def snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _section(settings: Any) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise InvalidRequest("settings must be an object", param="initializationOptions")
    inner = settings.get("localcoder")
    return inner if isinstance(inner, dict) else settings


@dataclass
class Applied:
    config: Config
    changed: set[str]  # Config field names whose value changed
    ignored: list[str]  # unknown keys (logged, not fatal)

    @property
    def needs_reload(self) -> bool:
        return bool(self.changed & RELOAD_FIELDS)


def apply_settings(cfg: Config, settings: Any) -> Applied:
    """A new Config with ``settings`` applied; ``cfg`` is left untouched (all or nothing)."""
    new = copy.deepcopy(cfg)
    known = set(field_names())
    changed: set[str] = set()
    ignored: list[str] = []
    for key, value in _section(settings).items():
        name = ALIASES.get(snake(key), snake(key))
        if name in CLIENT_ONLY:
            continue
        if name not in known:
            ignored.append(key)
            continue
        if value is None:
            continue
        before = _get(new, name)
        try:
            new.set(name, value)
        except InvalidRequest as exc:
            raise InvalidRequest(f"setting {key!r}: {exc.message}", param=key) from None
        if _get(new, name) != before:
            changed.add(name)
    if ignored:
        log.warning("ignoring unknown settings: %s", ", ".join(sorted(ignored)))
    _validate(new)
    return Applied(new, changed, ignored)


def _get(cfg: Config, name: str) -> Any:
    for section in cfg.sections().values():
        if hasattr(section, name):
            return getattr(section, name)
    raise KeyError(name)


def _validate(cfg: Config) -> None:
    c = cfg.completion  # choices (mode, engine, ...) were checked by Config.set, once per field
    for name in ("max_tokens", "time_budget_ms", "prefix_tokens", "suffix_tokens", "extra_tokens"):
        if getattr(c, name) < 0:
            raise InvalidRequest(f"setting {name!r} must be >= 0", param=name)
    if cfg.lsp.debounce_ms < 0:
        raise InvalidRequest("setting 'debounce_ms' must be >= 0", param="debounce_ms")
    url = cfg.lsp.server_url
    if url and not re.match(r"^https?://", url):
        raise InvalidRequest(f"setting 'serverUrl' must be an http(s) URL, got {url!r}", param="serverUrl")

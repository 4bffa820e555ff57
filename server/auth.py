"""Bearer-token auth and the bind policy.

- ``check_bind``: a non-loopback address needs an API key unless ``insecure_no_auth`` is set.
- ``AuthMiddleware``: when a key is configured every request except ``/health`` must carry
  ``Authorization: Bearer <key>``; comparison is constant-time and a failure says only that the
  credentials are missing or invalid (not which part was wrong).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from localcoder.config import ServerConfig
from localcoder.errors import InvalidRequest, Unauthorized
from localcoder.server.errors import error_response

OPEN_PATHS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: ServerConfig) -> str:
    """The key from ``api_key`` or, if empty, the first line of ``api_key_file``."""
    if cfg.api_key:
        return cfg.api_key
    if not cfg.api_key_file:
        return ""
    path = Path(cfg.api_key_file).expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise InvalidRequest(f"cannot read the API key file {path}: {exc.strerror}", param="api_key_file") from None
    if not key:
        raise InvalidRequest(f"the API key file {path} is empty", param="api_key_file")
    return key


def check_bind(cfg: ServerConfig, api_key: str) -> None:
    if is_loopback(cfg.host) or api_key or cfg.insecure_no_auth:
        return
    raise InvalidRequest(
        f"refusing to listen on {cfg.host} without an API key: anyone on the network could use the model",
        param="host", hint="pass --api-key/--api-key-file, or --insecure-no-auth if you really mean it")


def bearer_ok(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    # Compare digests: constant time, and the lengths of the secrets do not leak either.
    given = hashlib.sha256(token.strip().encode("utf-8")).digest()
    wanted = hashlib.sha256(api_key.encode("utf-8")).digest()
    return hmac.compare_digest(given, wanted) & (scheme.lower() == "bearer")


def client_identity(scope: Scope) -> str:
    """Who is asking, for supersession lanes: the key's digest when auth is on, else the peer host."""
    key = scope.get("state", {}).get("api_key_id")
    if key:
        return key
    client = scope.get("client")
    return client[0] if client else "unknown"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.api_key = api_key
        self.key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not bearer_ok(headers.get("authorization"), self.api_key):
            response = error_response(Unauthorized("missing or invalid credentials"))
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["api_key_id"] = self.key_id
        await self.app(scope, receive, send)

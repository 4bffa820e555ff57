"""Keep web pages out: DNS rebinding and simple (preflight-free) cross-site POSTs.

A page on any site can make the browser POST ``text/plain`` (or a typeless blob) to
``http://127.0.0.1:8765`` without a CORS preflight, and a page on ``evil.example`` whose DNS
answer is rebound to 127.0.0.1 talks to us with ``Host: evil.example``. So:

- bound to loopback, the ``Host`` header must name loopback (``127.0.0.1``, ``localhost``,
  ``[::1]``, any port) or a name in ``allowed_hosts``: else 403 ``host_not_allowed``;
- a POST that carries a body must say ``Content-Type: application/json``: else 415.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from localcoder.config import ServerConfig
from localcoder.server.auth import is_loopback
from localcoder.server.errors import HostNotAllowed, UnsupportedMediaType, error_response


def host_name(host_header: str) -> str:
    """``example.com:80`` -> ``example.com``; ``[::1]:8765`` -> ``::1``; lower case, no final dot."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class GuardMiddleware:
    def __init__(self, app: ASGIApp, cfg: ServerConfig):
        self.app = app
        self.check_host = is_loopback(cfg.host)
        self.allowed = {host_name(h) for h in cfg.allowed_hosts.split(",") if h.strip()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self.refusal(scope)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> Exception | None:
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host")
        if self.check_host and host is not None and not self.host_ok(host_name(host)):
            return HostNotAllowed(f"Host {host[:100]!r} is not this server's: it listens on loopback only",
                                  hint="add the name to allowed_hosts if you proxy to it")
        has_body = headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers
        if scope["method"] == "POST" and has_body and not is_json(headers.get("content-type", "")):
            got = headers.get("content-type")
            return UnsupportedMediaType(f"the request body must be application/json, got {got[:100]!r}" if got
                                        else "the request body must be application/json: send Content-Type",
                                        param="content-type")
        return None

    def host_ok(self, name: str) -> bool:
        return is_loopback(name) or name in self.allowed

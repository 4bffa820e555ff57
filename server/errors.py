"""The one mapping from typed errors to an HTTP status and a JSON body.

Body shape (OpenAI's): ``{"error": {"message": ..., "type": ..., "param": ...}}``. Every route,
middleware and exception handler answers errors through ``error_response``; nothing matches on
message text.
"""

from __future__ import annotations

import errno
import logging

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from localcoder.errors import (
    BackendUnavailable,
    Cancelled,
    ContextTooLong,
    InvalidRequest,
    LocalcoderError,
    ModelCorrupt,
    ModelNotFound,
    NotFimCapable,
    NotReady,
    QueueFull,
    Unauthorized,
)
from localcoder.text import clean

log = logging.getLogger("localcoder.server")


class BodyTooLarge(InvalidRequest):
    """The request body exceeds ``max_body_bytes``."""

    kind = "request_too_large"


class HostNotAllowed(LocalcoderError):
    """The ``Host`` header names neither loopback nor an allowed host (DNS rebinding)."""

    kind = "host_not_allowed"


class UnsupportedMediaType(InvalidRequest):
    """A POST body that is not ``application/json`` (what a web page can send without a preflight)."""

    kind = "unsupported_media_type"


class HeadersTooLarge(InvalidRequest):
    """The request head (request line + headers) exceeds ``max_header_bytes``."""

    kind = "request_header_fields_too_large"


class RouteNotFound(LocalcoderError):
    kind = "not_found"


class MethodNotAllowed(LocalcoderError):
    kind = "method_not_allowed"


# Most specific first: the first isinstance match wins (ContextTooLong is an InvalidRequest).
STATUS: list[tuple[type[LocalcoderError], int]] = [
    (BodyTooLarge, 413),
    (HeadersTooLarge, 431),
    (UnsupportedMediaType, 415),
    (ContextTooLong, 422),
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (HostNotAllowed, 403),
    (RouteNotFound, 404),
    (ModelNotFound, 404),
    (MethodNotAllowed, 405),
    (Cancelled, 409),
    (QueueFull, 429),
    (NotFimCapable, 501),
    (NotReady, 503),
    (BackendUnavailable, 503),
    (ModelCorrupt, 500),
]


def status_for(exc: LocalcoderError) -> int:
    return next((code for typ, code in STATUS if isinstance(exc, typ)), 500)


def error_body(exc: BaseException) -> dict:
    if isinstance(exc, LocalcoderError):
        param = clean(exc.param) if isinstance(exc.param, str) else exc.param
        return {"error": {"message": clean(str(exc)), "type": exc.kind, "param": param}}  # may echo client text
    return {"error": {"message": "internal server error", "type": "server_error", "param": None}}


def error_response(exc: BaseException) -> JSONResponse:
    """Status, headers and JSON body for any exception (unknown ones become a logged 500)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        log.error("no space left on device: %s", exc)
        return JSONResponse({"error": {"message": "no space left on device on the server", "type": "disk_full",
                                       "param": None}}, status_code=507)
    if not isinstance(exc, LocalcoderError):
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(error_body(exc), status_code=500)
    headers = {}
    if isinstance(exc, QueueFull | NotReady):
        headers["Retry-After"] = str(getattr(exc, "retry_after_s", 1))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=status_for(exc), headers=headers)


def from_http_exception(exc: HTTPException) -> LocalcoderError:
    """Starlette's routing errors (404/405) as typed errors, so they share the body shape."""
    if exc.status_code == 404:
        return RouteNotFound("no such endpoint")
    if exc.status_code == 405:
        return MethodNotAllowed("method not allowed on this endpoint")
    return InvalidRequest(str(exc.detail))


async def handle_localcoder_error(request, exc: Exception) -> JSONResponse:
    return error_response(exc)


async def handle_http_exception(request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(from_http_exception(exc))


async def handle_unexpected(request, exc: Exception) -> JSONResponse:
    return error_response(exc)

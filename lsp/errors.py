"""The one place where errors meet the LSP.

- A bad request (unknown document, position past the end, malformed params) -> a JSON-RPC error
  response (InvalidParams, -32602) naming the parameter. The server carries on.
- A failure the user must fix (model missing, server unreachable, not a FIM model) -> one
  ``window/showMessage`` per kind of failure (not one per keystroke) and an empty completion.
  After a success the same kind may be shown again, so a later outage is not silent.
- Anything else -> logged with its traceback on stderr, shown once as an internal error.
"""

from __future__ import annotations

import logging

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidParams

from localcoder.errors import ContextTooLong, InvalidRequest, LocalcoderError

log = logging.getLogger("localcoder.lsp")


def to_response_error(exc: Exception) -> JsonRpcException:
    if isinstance(exc, JsonRpcException):
        return exc
    if isinstance(exc, InvalidRequest):
        data = {"param": exc.param, "type": exc.kind} if exc.param else {"type": exc.kind}
        return JsonRpcInvalidParams(message=str(exc), data=data)
    if isinstance(exc, LocalcoderError):
        return JsonRpcInternalError(message=str(exc), data={"type": exc.kind})
    return JsonRpcInternalError(message=f"internal error: {exc.__class__.__name__}: {exc}")


def is_request_error(exc: Exception) -> bool:
    """Errors that belong to one request (answer it) rather than to the setup (tell the user)."""
    return isinstance(exc, InvalidRequest) and not isinstance(exc, ContextTooLong)


def kind_of(exc: Exception) -> str:
    return exc.kind if isinstance(exc, LocalcoderError) else "internal_error"


class Reporter:
    """Shows each kind of failure to the user once, until a success re-arms it."""

    def __init__(self) -> None:
        self.shown: set[str] = set()
        self.counts: dict[str, int] = {}

    def failure(self, exc: Exception) -> types.ShowMessageParams | None:
        """The message to show for ``exc``, or None when this kind was already shown."""
        kind = kind_of(exc)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if isinstance(exc, LocalcoderError):
            log.error("%s: %s", kind, exc)
        else:
            log.error("internal error", exc_info=exc)
        if kind in self.shown or isinstance(exc, ContextTooLong):
            return None
        self.shown.add(kind)
        text = str(exc) if isinstance(exc, LocalcoderError) else f"internal error: {exc.__class__.__name__}: {exc}"
        return types.ShowMessageParams(type=types.MessageType.Error, message=f"localcoder: {text}")

    def success(self) -> None:
        self.shown.clear()

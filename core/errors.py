"""Typed errors. Each surface (CLI, HTTP, LSP) maps these once, in one place.

Never match on message text: match on the type (and ``param`` for validation errors).
"""

from __future__ import annotations


class LocalcoderError(Exception):
    """Base of every error the user can cause or fix."""

    kind = "localcoder_error"

    def __init__(self, message: str, *, param: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class InvalidRequest(LocalcoderError):
    """A request field is missing, of the wrong type or out of range. ``param`` names it."""

    kind = "invalid_request_error"


class ContextTooLong(InvalidRequest):
    """The prompt cannot fit the model's context even after trimming."""

    kind = "context_length_exceeded"


class ModelNotFound(LocalcoderError):
    kind = "model_not_found"


class ModelCorrupt(LocalcoderError):
    """A model file exists but is truncated or fails verification."""

    kind = "model_corrupt"


class NotFimCapable(LocalcoderError):
    """The model has no fill-in-the-middle tokens; infill requests cannot be served."""

    kind = "not_fim_capable"


class BackendUnavailable(LocalcoderError):
    """An engine's library (an optional extra) or device is not installed/usable."""

    kind = "backend_unavailable"


class NotReady(LocalcoderError):
    """The model is still loading."""

    kind = "model_loading"


class Cancelled(LocalcoderError):
    kind = "cancelled"


class QueueFull(LocalcoderError):
    kind = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthorized(LocalcoderError):
    kind = "authentication_error"


class InputFileError(LocalcoderError):
    """A source file cannot be used: missing, binary, not UTF-8, empty, position outside it."""

    kind = "input_file_error"

"""Domain exceptions. The HTTP layer maps each to an HTTP status in one place
(``http/wire.py``)."""

from __future__ import annotations


class BatchserveError(Exception):
    """Base of every error batchserve reports to a client.

    ``code`` is a stable machine-readable string that goes into the JSON error body.
    """

    code = "error"


class InternalError(BatchserveError):
    """A fault of the server's own, not the request's (HTTP 500); the details go to the log."""

    code = "internal"


class InvalidInput(BatchserveError):
    """The request or image is malformed or cannot be decoded (HTTP 400)."""

    code = "invalid_input"


class Unauthorized(BatchserveError):
    """The route needs a bearer token and the request carries none (HTTP 401)."""

    code = "unauthorized"


class Forbidden(BatchserveError):
    """The request's bearer token does not open this route (HTTP 403)."""

    code = "forbidden"


class PayloadTooLarge(BatchserveError):
    """The body, the image count or the pixel count is over its limit (HTTP 413)."""

    code = "payload_too_large"


class UnsupportedMediaType(BatchserveError):
    """The body's content type or the image format is not accepted (HTTP 415)."""

    code = "unsupported_media_type"


class Overloaded(BatchserveError):
    """The queue is full; the client should retry after ``retry_after_s`` (HTTP 503)."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(BatchserveError):
    """The model is not loaded and warmed up yet (HTTP 503)."""

    code = "not_ready"

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def reason(self) -> str:
        """Why, in a few words (``/readyz``); its message, unless it knows shorter ones."""
        return str(self)


class DeadlineExceeded(BatchserveError):
    """The request's deadline passed before its result was ready (HTTP 504)."""

    code = "deadline_exceeded"


class InferenceFailed(BatchserveError):
    """The model raised while running a batch; only that batch's requests fail (HTTP 500)."""

    code = "inference_failed"


class StorageFailed(BatchserveError):
    """The catalog or a snapshot could not be written; nothing acknowledged is lost
    (HTTP 500)."""

    code = "storage_failed"


class NotFound(BatchserveError):
    """No item with that id (HTTP 404)."""

    code = "not_found"


class ModelLoadError(BatchserveError):
    """The configured model cannot be loaded (bad path, hash mismatch, no such signature)."""

    code = "model_load_error"


class ConfigError(BatchserveError):
    """A setting has an invalid value or an unknown name."""

    code = "config_error"


class DatasetError(BatchserveError):
    """Training data that cannot be trained on (too few classes, an empty class)."""

    code = "dataset_error"

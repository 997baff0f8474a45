"""What the client raises: one class per kind of API error (by HTTP status), each with the
server's ``code`` and ``message``, and ``ConnectionFailed`` when no answer came back.

These mirror the server's domain errors (``batchserve.errors``) without importing them, so
that the client needs numpy and httpx only.
"""

from __future__ import annotations

import httpx


class BatchserveError(Exception):
    """An error the API answered: its HTTP ``status``, the stable ``code`` of its JSON body
    and the human ``message``; ``retry_after_s`` from the ``Retry-After`` header, when sent.
    ``status`` is 0 when no answer came back (``ConnectionFailed``)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after_s: float | None = None
    ) -> None:
        # All four in args: an error pickles (to another process) and unpickles intact.
        super().__init__(status, code, message, retry_after_s)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class InvalidInput(BatchserveError):
    """400: a malformed request, an undecodable image or an option out of range."""


class Unauthorized(BatchserveError):
    """401: the server needs a bearer token and none was sent."""


class Forbidden(BatchserveError):
    """403: the token sent does not open this route."""


class NotFound(BatchserveError):
    """404: no item of that id (or no such route)."""


class PayloadTooLarge(BatchserveError):
    """413: the body, an image, its pixels or the number of images is over a limit."""


class UnsupportedMediaType(BatchserveError):
    """415: the body's content type or the image's format is not accepted."""


class Unavailable(BatchserveError):
    """503: the model is loading, the queue is full or the server is draining; nothing was
    done, so any call may be repeated (after ``retry_after_s``)."""


class DeadlineExceeded(BatchserveError):
    """504: the request's deadline (``timeout_ms`` or the server's own) passed."""


class ServerError(BatchserveError):
    """Any other 5xx: the server failed (the model raised, the catalog could not write)."""


class ConnectionFailed(BatchserveError):
    """No answer: the connection could not be made or broke (status 0)."""


class TimedOut(ConnectionFailed):
    """No answer within the client's timeout; the server may still have done the work."""


ERROR_BY_STATUS: dict[int, type[BatchserveError]] = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    503: Unavailable,
    504: DeadlineExceeded,
}


def retry_after_s(headers: httpx.Headers) -> float | None:
    """The ``Retry-After`` header in seconds; None when absent or not a number of seconds
    (the HTTP-date form is not something batchserve sends)."""
    value = headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


def error_for(response: httpx.Response) -> BatchserveError:
    """The error a non-success ``response`` stands for. A body that is not the API's
    ``{"error": {"code", "message"}}`` (a proxy's page) gives ``http_<status>`` and the
    start of its text."""
    status = response.status_code
    kind = ERROR_BY_STATUS.get(status, ServerError if status >= 500 else BatchserveError)
    code, message = f"http_{status}", response.text[:200] or response.reason_phrase
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return kind(status, code, message, retry_after_s(response.headers))


def connection_error(failure: httpx.TransportError) -> ConnectionFailed:
    """``ConnectionFailed`` (``TimedOut`` for a read or write timeout) naming the request."""
    request = failure.request
    message = f"{request.method} {request.url}: {type(failure).__name__}: {failure}"
    unanswered = isinstance(failure, httpx.TimeoutException) and not isinstance(
        failure, httpx.ConnectTimeout | httpx.PoolTimeout
    )
    if unanswered:
        return TimedOut(0, "timed_out", message)
    return ConnectionFailed(0, "connection_failed", message)

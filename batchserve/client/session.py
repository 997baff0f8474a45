"""What the sync and async clients share besides their calls: the connection's settings
(base URL, bearer token, timeout, user agent) and the error that ends a wait for
readiness."""

from __future__ import annotations

from typing import Any

from batchserve import __version__
from batchserve.client.errors import Unavailable
from batchserve.client.retry import Retry

USER_AGENT = f"batchserve-client/{__version__}"
#: The default policy: three attempts, 0.1 s then 0.2 s apart (jittered), waits of at most 5 s.
DEFAULT_RETRY = Retry()
#: One attempt: a readiness poll is its own retry.
ONCE = Retry(attempts=1)


def options(url: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    """Keyword arguments of ``httpx.Client`` / ``httpx.AsyncClient`` for a server at
    ``url`` (which may carry a path prefix)."""
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return {"base_url": url, "headers": headers, "timeout": timeout_s}


def not_ready(url: str, timeout_s: float) -> Unavailable:
    return Unavailable(503, "not_ready", f"{url} was not ready within {timeout_s:g} s")

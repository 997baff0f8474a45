"""Bearer tokens: an optional one for every /v1 route and an optional one for writes.

``api_token`` set: every /v1 request needs a token; the API token and the write token
(writers may read) both open reads. ``write_token`` set: adding and deleting items needs
it. With only ``api_token`` set, it opens writes too. Tokens are compared in constant time,
all of them every time, so timing tells nothing of which one nearly matched.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from batchserve.errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Tokens:
    api: str = ""
    write: str = ""

    def accepted(self, write: bool) -> list[bytes]:
        """The tokens that open a request of this kind; empty when it is open to all."""
        if write:
            token = self.write or self.api
            return [token.encode()] if token else []
        if self.api:
            return [t.encode() for t in (self.api, self.write) if t]
        return []

    def check(self, authorization: bytes | None, write: bool) -> None:
        """Raise Unauthorized (no usable ``Authorization: Bearer``) or Forbidden (a token
        that does not open this request)."""
        accepted = self.accepted(write)
        if not accepted:
            return
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Unauthorized("this route needs an Authorization: Bearer <token> header")
        matches = [hmac.compare_digest(token, candidate) for candidate in accepted]
        if not any(matches):
            what = "adding or deleting items" if write else "this route"
            raise Forbidden(f"the bearer token does not allow {what}")

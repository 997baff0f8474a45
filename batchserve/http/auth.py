"""Who may call the API: bearer tokens, and, while no token is set, which pages in a browser.

``api_token`` set: every /v1 request needs a token; the API token and the write token
(writers may read) both open reads. ``write_token`` set: adding and deleting items needs
it. With only ``api_token`` set, it opens writes too. Tokens are compared in constant time,
all of them every time, so timing tells nothing of which one nearly matched.

With no token set, any program that reaches the port may call every route: that is what the
default (listening on 127.0.0.1) is for. What could call it on someone else's behalf is a
browser on that host: a page on another origin can POST a form to it (multipart needs no
preflight), and a page on a name its owner re-points to 127.0.0.1 (DNS rebinding) is of the
same origin as the API and could read its answers. So, while no token is set, the site
screens every request with ``BrowserGuard``: a ``Host`` that is not one of this server's
names is refused (421), and so is a request that may write (any method but GET, HEAD,
OPTIONS) sent by a page of another origin (``Origin``, ``Sec-Fetch-Site: cross-site``; 403).
A page's script can set none of these headers; a program that is not a browser sends no
``Origin`` and names the server as it reached it, so it passes.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers

from batchserve.errors import Forbidden, InvalidInput, Unauthorized


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


def writes(method: bytes, path: bytes) -> bool:
    """Whether a request adds or deletes items, which the write token guards: a POST or
    DELETE, in any case (routing reads the method so), to a path under /v1/items, as its
    route names it or as it was sent (percent-encoded or not)."""
    return method.upper() in (b"POST", b"DELETE") and unquote_to_bytes(path).startswith(
        b"/v1/items"
    )


# -- pages of other sites, while no token is set ---------------------------------------------

#: Methods that only read (RFC 9110, section 9.2.1); any other may write.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

#: Paths answered whatever name a request gives: health checks and the metrics scrape, which
#: load balancers, container runtimes and Prometheus make by a name of their own
#: (deploy/compose.yaml scrapes batchserve:8080); none reads or writes an item.
ANY_HOST_PATHS = frozenset(
    {b"/healthz", b"/readyz", b"/metrics", b"/v2/health/live", b"/v2/health/ready"}
)

#: A host name (reg-name, as browsers send it: letters, digits, '-', '.', '_') or an IP
#: literal, IPv6 in brackets.
_HOST = r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)"
#: ``Host``: host[:port] (RFC 9110, section 7.2; the port may be empty).
_AUTHORITY = re.compile(rf"{_HOST}(?::([0-9]{{0,5}}))?")
#: ``Origin``: scheme://host[:port] (RFC 6454, section 6.1); "null" and the rest match no
#: origin.
_ORIGIN = re.compile(rf"(https?)://{_HOST}(?::([0-9]{{1,5}}))?")
_DEFAULT_PORT = {"http": 80, "https": 443}

#: What a name given in ``allowed_hosts`` may be: a host name, '.' and a domain (it and its
#: subdomains), or '*'.
ALLOWED_HOST = re.compile(r"\*|\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|\[?[0-9a-f:.]+\]?")

#: (scheme, host, port): an origin, the host lower case, without brackets or a final dot.
Origin = tuple[str, str, int]


def _host_name(text: str) -> str:
    return text.strip("[]").rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Refusal:
    """How to answer a request refused from its headers: its status and JSON error."""

    status: int
    code: str
    message: str


@dataclass(frozen=True)
class BrowserGuard:
    """Keeps pages in a browser from calling a server that needs no token (see the module's
    docstring): ``refusal`` judges a request from its method, path and headers.

    ``names``: the host names served besides IP literals, lower case and without a final
    dot; one that starts with '.' also serves its subdomains, and '*' serves any name."""

    names: frozenset[str]

    @classmethod
    def allowing(cls, allowed_hosts: str, listen_host: str = "") -> BrowserGuard:
        """The guard for the ``allowed_hosts`` setting (comma-separated names) of a server
        listening on ``listen_host`` (a name it listens on is one of its names)."""
        entries = [e.strip().lower() for e in allowed_hosts.split(",")]
        names = {e if e.startswith(".") else _host_name(e) for e in entries if e}
        if listen_host:
            names.add(_host_name(listen_host.lower()))
        return cls(frozenset(names))

    def serves(self, host: str) -> bool:
        """Whether ``host`` (lower case, no brackets, no final dot) names this server: an IP
        literal, which no DNS answer can re-point, or one of ``names``."""
        if "*" in self.names or host in self.names or _is_ip(host):
            return True
        return any(n.startswith(".") and (host == n[1:] or host.endswith(n)) for n in self.names)

    def refusal(
        self, method: bytes, path: bytes, headers: Headers, secure: bool = False
    ) -> Refusal | None:
        """Why a request that needs no token is refused, or None to let it through.

        Its ``Host`` must name this server (see ``serves``; a path of ``ANY_HOST_PATHS``
        may give any). A request whose method may write must not say it comes from a page
        of another site: no ``Sec-Fetch-Site: cross-site``, and an ``Origin``, when it has
        one, equal to the server's own (``own_origin``)."""
        hosts = headers.getRawHeaders(b"host", [])
        if len(hosts) > 1:
            return Refusal(400, InvalidInput.code, "a request may give one Host header, not two")
        authority = _authority(hosts[0]) if hosts else None
        named_elsewhere = authority is None or not self.serves(authority[0])
        if hosts and named_elsewhere and path.partition(b"?")[0] not in ANY_HOST_PATHS:
            shown = hosts[0].decode("latin-1")[:100]
            return Refusal(
                421,
                "misdirected_request",
                f"this server does not answer to the name {shown!r}: with no token set, it "
                "answers only localhost, IP addresses and the names in --allowed-hosts (set "
                "--allowed-hosts, or --api-token)",
            )
        if method in SAFE_METHODS:
            return None
        fetch_sites = headers.getRawHeaders(b"sec-fetch-site", [])
        origins = headers.getRawHeaders(b"origin", [])
        own = own_origin(authority, headers, secure)
        # A browser's own word that the page is of this origin (a header no page can set):
        # behind a proxy that changes the port, the origin a page shows may differ from
        # the Host the server sees.
        same = any(s.strip().lower() == b"same-origin" for s in fetch_sites)
        cross = [] if same else [o for o in origins if own is None or _origin(o) != own]
        if cross or any(s.strip().lower() == b"cross-site" for s in fetch_sites):
            sender = cross[0].decode("latin-1")[:100] if cross else "another site"
            method_text = method.decode("latin-1")[:20]
            return Refusal(
                403,
                Forbidden.code,
                f"a page of {sender} may not send {method_text} requests to this server: with "
                "no token set, only its own pages may (set --api-token to let other clients "
                "in with a token)",
            )
        return None


def own_origin(
    authority: tuple[str, int | None] | None, headers: Headers, secure: bool
) -> Origin | None:
    """The origin a request was sent to: the scheme it came by (``X-Forwarded-Proto``
    when a proxy in front ends TLS; no page can send that header without a preflight, which
    this server never grants) and its ``Host``; None without a Host."""
    if authority is None:
        return None
    forwarded = headers.getRawHeaders(b"x-forwarded-proto", [b""])[0]
    scheme = forwarded.split(b",")[0].strip().lower().decode("latin-1")
    if scheme not in _DEFAULT_PORT:
        scheme = "https" if secure else "http"
    host, port = authority
    return scheme, host, port if port is not None else _DEFAULT_PORT[scheme]


def _authority(value: bytes) -> tuple[str, int | None] | None:
    """A ``Host`` header's host and port (None when it gives none); None when malformed."""
    found = _AUTHORITY.fullmatch(value.strip().lower().decode("latin-1"))
    if found is None:
        return None
    host, port = found.groups()
    return _host_name(host), int(port) if port else None


def _origin(value: bytes) -> Origin | None:
    """An ``Origin`` header's origin; None for "null" or a value that is not one."""
    found = _ORIGIN.fullmatch(value.strip().lower().decode("latin-1"))
    if found is None:
        return None
    scheme, host, port = found.groups()
    return scheme, _host_name(host), int(port) if port else _DEFAULT_PORT[scheme]

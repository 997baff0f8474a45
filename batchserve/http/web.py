"""What a browser gets: the search page and its script and styles, read from package data
(no build step, nothing fetched from elsewhere), and how any of them is served (the API
reference at ``/docs`` is rendered by openapi/docs_page.py)."""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from twisted.web.iweb import IRequest

#: Types of the files in batchserve/data/web, by suffix.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

#: The files served under /web/ (index.html is served at /).
FILES = ("app.js", "app.css", "docs.css")

#: The pages load only what this server serves; thumbnails come as blob: URLs.
POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'


def asset(name: str) -> Asset | None:
    """The file ``name`` of batchserve/data/web, or None (any other name, paths included).
    Nothing is kept of a name asked for: only the shipped files, read once, are held."""
    return shipped().get(name)


@cache  # no arguments: one entry, the fixed set of files
def shipped() -> Mapping[str, Asset]:
    """The files served, by name: FILES and index.html, those the package holds."""
    folder = importlib.resources.files("batchserve").joinpath("data/web")
    found: dict[str, Asset] = {}
    for name in (*FILES, "index.html"):
        resource = folder.joinpath(name)
        if resource.is_file():
            found[name] = Asset(resource.read_bytes(), TYPES["." + name.rpartition(".")[2]])
    return found


def respond(request: IRequest, found: Asset | None) -> bytes:
    """Serve ``found`` (revalidated by its ETag on every load, so a new version shows at
    once); a 404 page when the package lacks it."""
    if found is None:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"not found: this installation lacks its web files"
    request.setHeader(b"Content-Security-Policy", POLICY.encode())
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Cache-Control", b"no-cache")
    request.setHeader(b"ETag", found.etag.encode())
    if etag_matches(request.getHeader(b"if-none-match"), found.etag):
        request.setResponseCode(304)
        return b""
    request.setHeader(b"Content-Type", found.content_type.encode())
    return found.body


def etag_matches(if_none_match: bytes | None, etag: str) -> bool:
    """Whether an If-None-Match header (a list of tags, weak or strong, or *) holds ``etag``."""
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.decode("latin-1").split(",")}
    return etag in tags or "*" in tags

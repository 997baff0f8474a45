"""How a URL reaches its route: a path that is not UTF-8 is refused before Klein, and an
item id is one path segment even when it holds '/'."""

from __future__ import annotations

from urllib.parse import quote, unquote, unquote_to_bytes

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.routing import BaseConverter

from batchserve.errors import InvalidInput
from batchserve.http.wire import error_body


class PathSegment(BaseConverter):
    """One path segment, percent-decoded after routing: an item id may hold '/'
    (``/v1/items/a%2Fb/similar`` is item ``a/b``) and never clashes with a sub-route."""

    def to_python(self, value: str) -> str:
        return unquote(value)


#: Characters a path segment may hold as they are (RFC 3986 ``pchar``); others stay encoded.
_SEGMENT_SAFE = "-._~!$&'()*+,;=:@"


class Utf8URLs(Resource):
    """Before Klein: answers a URL that is not UTF-8 once percent-decoded with a JSON 400
    (Klein would answer in text and log a traceback for every such request), and routes on
    the path's segments as sent (Twisted decodes them, which turns an encoded '/' into a
    segment boundary), normalised so that equivalent spellings route alike. A path whose
    first segment names a branch (``v2``) goes to that branch's resource."""

    isLeaf = True  # noqa: N815 (Twisted API)

    def __init__(self, inner: IResource, branches: dict[bytes, IResource] | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._branches = branches or {}

    def render(self, request: IRequest) -> bytes | int:
        """The response's body, or NOT_DONE_YET while the route works."""
        try:
            unquote_to_bytes(request.uri).decode("utf-8")
        except UnicodeDecodeError:
            return error_body(request, 400, InvalidInput.code, "the URL is not valid UTF-8")
        request.postpath = [
            quote(unquote_to_bytes(segment), safe=_SEGMENT_SAFE).encode("ascii")
            for segment in request.path[1:].split(b"/")
        ]
        branch = self._branches.get(request.postpath[0], self._inner)
        answered: bytes | int = branch.render(request)
        return answered

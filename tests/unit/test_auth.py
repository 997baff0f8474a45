"""Which bearer tokens open which requests, compared in constant time."""

from __future__ import annotations

import hmac

import pytest
from twisted.web.http_headers import Headers

from batchserve.errors import Forbidden, Unauthorized
from batchserve.http.auth import BrowserGuard, Tokens


def test_no_tokens_set_opens_everything() -> None:
    Tokens().check(None, write=True)
    Tokens().check(b"Bearer anything", write=False)


@pytest.mark.parametrize(
    ("tokens", "write", "opens"),
    [
        (Tokens(api="a"), False, [b"a"]),
        (Tokens(api="a"), True, [b"a"]),
        (Tokens(write="w"), False, []),
        (Tokens(write="w"), True, [b"w"]),
        (Tokens(api="a", write="w"), False, [b"a", b"w"]),
        (Tokens(api="a", write="w"), True, [b"w"]),
    ],
)
def test_which_tokens_open_reads_and_writes(
    tokens: Tokens, write: bool, opens: list[bytes]
) -> None:
    assert tokens.accepted(write) == opens


@pytest.mark.parametrize("header", [None, b"", b"Bearer", b"Bearer   ", b"Basic YTph", b"a"])
def test_a_missing_or_malformed_header_is_unauthorized(header: bytes | None) -> None:
    with pytest.raises(Unauthorized):
        Tokens(api="a").check(header, write=False)


def test_a_wrong_token_is_forbidden_and_case_of_the_scheme_does_not_matter() -> None:
    with pytest.raises(Forbidden):
        Tokens(api="a").check(b"Bearer b", write=False)
    Tokens(api="a").check(b"bearer a", write=False)


def test_every_accepted_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    Tokens(api="a", write="w").check(b"Bearer a", write=False)
    assert compared == [(b"a", b"a"), (b"a", b"w")]  # no early exit on the first match


@pytest.mark.parametrize(
    ("host", "origin", "same"),
    [
        (b"localhost:8080", b"http://localhost:8080", True),
        (b"localhost", b"http://localhost:80", True),  # a default port, written or not
        (b"LocalHost:8080", b"http://localhost:8080", True),
        (b"[::1]:8080", b"http://[::1]:8080", True),
        (b"localhost:8080", b"http://localhost:8081", False),
        (b"localhost:8080", b"https://localhost:8080", False),
        (b"localhost:8080", b"http://127.0.0.1:8080", False),
        (b"localhost:8080", b"null", False),
        (b"localhost:8080", b"http://localhost:8080/path", False),
    ],
)
def test_only_a_request_from_the_servers_own_origin_may_write(
    host: bytes, origin: bytes, same: bool
) -> None:
    guard = BrowserGuard.allowing("localhost")
    headers = Headers({b"host": [host], b"origin": [origin]})
    refusal = guard.refusal(b"POST", b"/v1/items", headers)
    assert (refusal is None) == same
    assert refusal is None or (refusal.status, refusal.code) == (403, "forbidden")
    assert guard.refusal(b"GET", b"/v1/items", headers) is None  # reads: the browser's care

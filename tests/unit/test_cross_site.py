"""With no token set (the default), pages in a browser on other sites cannot use the server:
a form posted from another origin adds nothing (403), a name re-pointed at the server (DNS
rebinding) gets 421, while the server's own page, programs and health checks go on working;
once a token is set, none of this applies; a server listening beyond this host with no
token says so at start. The real Site from the server's builder, in memory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.http_headers import Headers

from batchserve.config import ServerSettings, ServeSettings
from batchserve.errors import ConfigError
from batchserve.http.auth import BrowserGuard, Tokens
from batchserve.server import Threads, build
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.store import ItemStore
from batchserve.testing import SyncModelRunner, encode_multipart, result_of, run_now
from tests.unit.test_api import BLUE, RED, Harness, ModelVia
from tests.unit.test_site import Connection

#: What a browser sends with a form posted from a page of another site.
FROM_ELSEWHERE = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}


def form_add(item_id: str) -> tuple[bytes, str]:
    """A multipart add of one item, as an HTML form posts it (no preflight)."""
    return encode_multipart([("image", "a.jpg", RED)], fields={"id": item_id})


def stored(h: Harness) -> list[str]:
    status, _, doc = h.request("GET", "/v1/items")
    assert status == 200
    return [item["id"] for item in doc["items"]]


def form_head(host: str, *headers: str, body: bytes, content_type: str) -> str:
    """The head of a form's POST /v1/items to ``host`` with ``headers`` ("Name: value")."""
    lines = [f"Host: {host}", *headers, f"Content-Type: {content_type}"]
    return (
        "POST /v1/items HTTP/1.1\n"
        + "".join(f"{line}\n" for line in lines)
        + (f"Content-Length: {len(body)}\n\n")
    )


def raw(h: Harness, head: str, body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """Send one request as written (its own Host header); its one response."""
    connection = Connection(h.server.site)
    connection.send(head, body)
    [response] = connection.responses()
    return response


def test_a_form_posted_from_another_origin_adds_nothing() -> None:
    h = Harness()
    body, ctype = form_add("planted")
    for headers in (FROM_ELSEWHERE, {"Origin": "http://evil.example"}, {"Origin": "null"}):
        status, _, doc = h.request("POST", "/v1/items", body, {"Content-Type": ctype, **headers})
        assert status == 403 and doc["error"]["code"] == "forbidden"
        assert "http://evil.example" in doc["error"]["message"] or "null" in str(doc)
    assert stored(h) == []


def test_a_cross_site_request_without_an_origin_cannot_delete() -> None:
    h = Harness()
    body, ctype = form_add("kept")
    assert h.request("POST", "/v1/items", body, {"Content-Type": ctype})[0] == 200
    status, _, doc = h.request("DELETE", "/v1/items/kept", b"", {"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and "another site" in doc["error"]["message"]
    assert stored(h) == ["kept"]


def test_a_page_of_another_origin_on_this_host_is_another_origin() -> None:
    h = Harness()
    body, ctype = form_add("planted")
    for origin in ("http://127.0.0.1:3000", "https://127.0.0.1:8080", "http://localhost:8080"):
        head = form_head("127.0.0.1:8080", f"Origin: {origin}", body=body, content_type=ctype)
        assert raw(h, head, body)[0] == 403, origin
    assert stored(h) == []


def test_a_page_the_browser_calls_same_origin_may_write_behind_a_proxy_that_moves_it() -> None:
    # A proxy that serves the page on another port than the Host it sends: the browser's
    # Sec-Fetch-Site, which no page can set, says the page is the server's own.
    h = Harness()
    body, ctype = form_add("from-own-page")
    origin, same = "Origin: http://127.0.0.1:8080", "Sec-Fetch-Site: same-origin"
    head = form_head("127.0.0.1:8081", origin, same, body=body, content_type=ctype)
    assert raw(h, head, body)[0] == 200
    assert stored(h) == ["from-own-page"]


def test_the_servers_own_page_adds_searches_and_deletes() -> None:
    h = Harness()
    body, ctype = form_add("mine")
    origin, same = "Origin: http://127.0.0.1:8080", "Sec-Fetch-Site: same-origin"
    own = form_head("127.0.0.1:8080", origin, same, body=body, content_type=ctype)
    status, _, doc = raw(h, own, body)
    assert status == 200 and doc["added"] == ["mine"]
    search = own.replace("/v1/items", "/v1/search").replace(str(len(body)), str(len(BLUE)))
    search = search.replace(ctype, "image/png")
    status, _, doc = raw(h, search, BLUE)
    assert status == 200 and doc["results"][0]["matches"][0]["id"] == "mine"
    delete = "DELETE /v1/items/mine HTTP/1.1\nHost: [::1]:8080\nOrigin: http://[::1]:8080\n\n"
    assert raw(h, delete)[0] == 200
    assert stored(h) == []


def test_behind_a_tls_proxy_the_own_origin_is_https() -> None:
    h = Harness()
    body, ctype = form_add("mine")
    tls = ("Origin: https://127.0.0.1", "X-Forwarded-Proto: https")
    head = form_head("127.0.0.1", *tls, body=body, content_type=ctype)
    assert raw(h, head, body)[0] == 200


def test_reads_from_another_origin_are_left_to_the_browser() -> None:
    # The browser keeps the answer from the page (no CORS header): nothing to refuse.
    h = Harness()
    assert h.request("GET", "/v1/items", b"", FROM_ELSEWHERE)[0] == 200


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io", "localhost.evil.example"]
)
def test_a_request_naming_another_host_is_misdirected(host: str) -> None:
    h = Harness()
    status, headers, doc = raw(h, f"GET /v1/items HTTP/1.1\nHost: {host}\n\n")
    assert status == 421 and doc["error"]["code"] == "misdirected_request"
    assert "--allowed-hosts" in doc["error"]["message"]
    assert headers["content-type"] == "application/json"
    assert raw(h, f"GET / HTTP/1.1\nHost: {host}\n\n")[0] == 421  # the page too


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:8080", "localhost.", "127.0.0.1:8", "[::1]:8080", "10.1.2.3"]
)
def test_localhost_and_ip_addresses_are_served(host: str) -> None:
    assert raw(Harness(), f"GET /v1/items HTTP/1.1\nHost: {host}\n\n")[0] == 200


def test_health_checks_and_metrics_answer_any_name() -> None:
    h = Harness()
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        connection = Connection(h.server.site)
        connection.send(f"GET {path} HTTP/1.1\nHost: batchserve:8080\n\n")
        assert connection.transport.value().startswith(b"HTTP/1.1 200 "), path


def test_a_malformed_or_repeated_host_is_refused() -> None:
    h = Harness()
    assert raw(h, "GET /v1/items HTTP/1.1\nHost: evil.example@localhost\n\n")[0] == 421
    status, _, doc = raw(h, "GET /v1/items HTTP/1.1\nHost: localhost\nHost: evil.example\n\n")
    assert status == 400 and "one Host" in doc["error"]["message"]


@pytest.mark.parametrize("tokens", [Tokens(api="api-secret"), Tokens(write="write-secret")])
def test_once_a_token_is_set_the_token_decides(tokens: Tokens) -> None:
    h = Harness(tokens=tokens)
    body, ctype = form_add("sent")
    token = tokens.write or tokens.api
    sent = ("Origin: http://evil.example", f"Authorization: Bearer {token}")
    head = form_head("search.example.com", *sent, body=body, content_type=ctype)
    assert raw(h, head, body)[0] == 200
    assert raw(h, head.replace(token, "wrong"), body)[0] == 403


def test_allowed_hosts_names_the_server_its_subdomains_or_any_name() -> None:
    guard = BrowserGuard.allowing("search.example.com, .corp.example,", "box.lan")
    assert all(
        guard.serves(host)
        for host in ("search.example.com", "corp.example", "a.b.corp.example", "box.lan")
    )
    assert not any(
        guard.serves(host) for host in ("localhost", "example.com", "xcorp.example", "evil")
    )
    assert BrowserGuard.allowing("*").serves("anything.example")
    headers = Headers({b"host": [b"search.example.com"]})
    assert guard.refusal(b"GET", b"/v1/items", headers) is None


def test_allowed_hosts_must_be_names() -> None:
    assert ServerSettings(allowed_hosts="a.example, .b.example, *, [::1]").allowed_hosts
    with pytest.raises(ConfigError, match="allowed_hosts"):
        ServerSettings(allowed_hosts="http://a.example/")


# -- the start-up warning ----------------------------------------------------------------


def started(tmp_path: Path, server: ServerSettings) -> list[str]:
    """The warnings a server with these settings logs as it starts listening."""
    worker = SyncModelRunner(Harness().model, loaded=False)
    built = build(
        ServeSettings(server=replace(server, workers="0"), store=StoreSettings(demo=False)),
        MemoryReactorClock(),
        model=ModelVia(worker, worker),
        threads=Threads(decode=run_now, store=run_now),
        store=lambda info: ItemStore(
            tmp_path, VectorIndex(info.dim, IndexParams()), info.fingerprint()
        ),
    )
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert result_of(built.start()) is None
    finally:
        globalLogPublisher.removeObserver(seen.append)
    return [e["log_format"] for e in seen if e["log_level"] == LogLevel.warn]


def test_listening_beyond_this_host_with_no_token_warns_naming_the_flags(
    tmp_path: Path,
) -> None:
    [warning] = started(tmp_path / "a", ServerSettings(host="0.0.0.0"))
    assert "no token" in warning and "--api-token" in warning and "--host 127.0.0.1" in warning
    assert "--allowed-hosts" in warning
    assert started(tmp_path / "b", ServerSettings(host="0.0.0.0", api_token="t")) == []
    assert started(tmp_path / "c", ServerSettings(host="127.0.0.1")) == []
    assert started(tmp_path / "d", ServerSettings(host="localhost")) == []

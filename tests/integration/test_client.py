"""The Python client against the real server (the built-in model, the 8 demo photos),
guarded by an API token: what it gets equals what the raw API answers, every call on items,
errors with the server's own message, and the async client doing several calls at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import batchserve
from batchserve.client import (
    AsyncClient,
    Client,
    Forbidden,
    InvalidInput,
    NewItem,
    NotFound,
    Unauthorized,
)
from tests.integration.conftest import Server, start_server, stop_server

TOKEN = "client-test-token"
DEMO = Path(batchserve.__file__).parent / "data" / "demo"
CAT = DEMO / "cat.jpg"
JPEG = {"Content-Type": "image/jpeg", "Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("client"), "--api-token", TOKEN)
    yield server
    stop_server(server)


@pytest.fixture
def client(guarded: Server) -> Iterator[Client]:
    with Client(guarded.url, token=TOKEN) as opened:
        yield opened


def test_embed_equals_what_the_raw_api_answers(guarded: Server, client: Client) -> None:
    raw = guarded.request("POST", "/v1/embed", CAT.read_bytes(), JPEG)
    assert raw.status == 200
    expected = np.asarray(raw.json()["results"][0]["embedding"], dtype=np.float32)
    one = client.embed(CAT)
    assert one.dtype == np.float32 and one.shape == (1, 1280)
    np.testing.assert_allclose(one[0], expected, atol=1e-6)
    two = client.embed([CAT.read_bytes(), DEMO / "coffee.jpg"])
    assert two.shape == (2, 1280)
    np.testing.assert_allclose(two[0], expected, atol=1e-6)


def test_search_finds_the_demo_cat_first_by_image_and_by_its_vector(client: Client) -> None:
    [matches] = client.search(CAT, k=3)
    assert matches[0].id == "sample/cat" and matches[0].score > 0.99
    assert matches[0].label == "animals" and isinstance(matches[0].predicted_class, str)
    [by_vector] = client.search(vectors=client.embed(CAT), k=1)
    assert [m.id for m in by_vector] == ["sample/cat"]
    [animals] = client.search(DEMO / "coffee.jpg", k=5, label="animals")
    assert [m.id for m in animals] == ["sample/cat"]


def test_classify_gives_k_labels_most_likely_first(client: Client) -> None:
    [labels] = client.classify(CAT, k=3)
    assert len(labels) == 3
    assert [x.score for x in labels] == sorted((x.score for x in labels), reverse=True)


def test_items_added_one_and_many_are_stored_listed_similar_and_deleted(client: Client) -> None:
    started = datetime.now(UTC) - timedelta(seconds=5)
    assert client.add(id="client/one a", image=CAT, label="pets", metadata={"n": 1}) == [
        "client/one a"
    ]
    names = sorted(p.name for p in DEMO.glob("*.jpg"))
    many = [
        NewItem(f"client/many/{name}", DEMO / name, label="many", metadata={"file": name})
        for name in names
    ]
    assert client.add(many) == [item.id for item in many]

    one = client.get("client/one a")
    assert (one.id, one.label, one.metadata) == ("client/one a", "pets", {"n": 1})
    assert one.created >= started and isinstance(one.predicted_class, str)
    coffee = client.get("client/many/coffee.jpg")
    assert (coffee.label, coffee.metadata) == ("many", {"file": "coffee.jpg"})

    top = client.similar("client/one a", k=3)
    assert top[0].id in ("sample/cat", "client/many/cat.jpg") and top[0].score > 0.99
    assert "client/one a" not in [m.id for m in top]
    in_many = client.similar("client/one a", k=3, label="many")
    assert in_many[0].id == "client/many/cat.jpg" and {m.label for m in in_many} == {"many"}

    listed = [item.id for item in client.items(limit=3)]
    assert set(listed) >= {"client/one a", *(i.id for i in many), "sample/cat"}
    assert len(listed) == len(set(listed))

    assert client.thumbnail("client/one a")[:3] == b"\xff\xd8\xff"
    client.delete("client/one a")
    with pytest.raises(NotFound) as raised:
        client.get("client/one a")
    assert raised.value.code == "not_found" and "client/one a" in raised.value.message


def test_an_invalid_option_raises_invalid_input_with_the_servers_message(
    guarded: Server, client: Client
) -> None:
    raw = guarded.request("POST", "/v1/search?k=0", CAT.read_bytes(), JPEG)
    assert raw.status == 400
    with pytest.raises(InvalidInput) as raised:
        client.search(CAT, k=0)
    assert raised.value.status == 400
    assert raised.value.code == raw.json()["error"]["code"]
    assert raised.value.message == raw.json()["error"]["message"]


def test_a_guarded_server_wants_the_token(guarded: Server, client: Client) -> None:
    with Client(guarded.url) as anonymous:
        assert anonymous.ready() is True  # /readyz stays open
        with pytest.raises(Unauthorized) as raised:
            anonymous.embed(CAT)
        assert raised.value.code == "unauthorized"
    with Client(guarded.url, token="wrong") as wrong, pytest.raises(Forbidden):
        wrong.model()
    assert client.model()["dim"] == 1280
    assert client.index_info()["size"] >= 8
    client.wait_ready(timeout_s=5)


def test_the_async_client_runs_calls_concurrently(guarded: Server) -> None:
    async def session() -> list[Any]:
        async with AsyncClient(guarded.url, token=TOKEN) as client:
            results: list[Any] = await asyncio.gather(
                client.embed(CAT),
                client.search(CAT, k=1),
                client.classify(DEMO / "coffee.jpg", k=1),
                client.model(),
                *(client.search(DEMO / name, k=1) for name in ("rocket.jpg", "brick.jpg")),
            )
            return results

    vectors, [cat], [labels], model, [rocket], [brick] = asyncio.run(session())
    assert vectors.shape == (1, model["dim"])
    assert cat[0].id == "sample/cat" and len(labels) == 1
    assert rocket[0].id in ("sample/rocket", "client/many/rocket.jpg")
    assert brick[0].id in ("sample/brick", "client/many/brick.jpg")

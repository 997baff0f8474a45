"""``--crop-views`` and ``--grey-view`` through the real server graph (fake model, every
thread run at once): an added item's views go through the model with it, are stored with
it, and a query that shows only part of the item (or is a grey copy) meets it at the
view's weight."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image
from twisted.internet.testing import MemoryReactorClock

from batchserve.config import ServerSettings, ServeSettings
from batchserve.models.images import DecodeLimits, decode_image
from batchserve.models.views import CROP_VIEWS, VIEW_WEIGHT, crop_boxes
from batchserve.server import Server, Threads, build
from batchserve.serving.records import AddTask, SearchRequest, SearchTask
from batchserve.storage.data_dir import StoreSettings
from batchserve.testing import FakeModel, SyncModelRunner, result_of, run_now

RED, BLUE = (230, 30, 30), (30, 40, 220)


def red_corner() -> npt.NDArray[np.uint8]:
    """Blue, with red exactly where the top-left crop view falls: that view is all red,
    while the whole image is mostly purple to the (mean-colour) fake model."""
    pixels = np.zeros((120, 160, 3), dtype=np.uint8)
    pixels[:] = BLUE
    left, top, right, bottom = crop_boxes(160, 120)[1]
    pixels[top:bottom, left:right] = RED
    return pixels


def top_left_view(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    left, top, right, bottom = crop_boxes(pixels.shape[1], pixels.shape[0])[1]
    return np.ascontiguousarray(pixels[top:bottom, left:right])


def png(pixels: npt.NDArray[np.uint8]) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


def plain(rgb: tuple[int, int, int] | npt.NDArray[np.uint8]) -> bytes:
    return png(np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (64, 64, 3)).copy())


#: Closer to the red corner (cosine 0.93 by the fake model) than the whole image is (0.79),
#: less close than the corner's own view counts (its weight, 0.95).
LOOK_ALIKE = (169, 33, 88)


def serve(data_dir: Path, model: FakeModel) -> tuple[Server, SyncModelRunner]:
    worker = SyncModelRunner(model, loaded=False)
    settings = ServeSettings(
        server=ServerSettings(workers="0"),
        store=StoreSettings(data_dir=str(data_dir), demo=False),
    )
    server = build(settings, MemoryReactorClock(), model=worker, threads=Threads(run_now, run_now))
    assert result_of(server.start()) is None
    return server, worker


def add(server: Server, item_id: str, data: bytes) -> Any:
    return result_of(server.service.add(lambda: [(data, AddTask(item_id))]))


def search(server: Server, data: bytes, k: int = 2) -> list[tuple[str, float]]:
    found = server.service.search(lambda: SearchRequest(SearchTask(k=k), images=[data]))
    return [(m.id, m.score) for m in result_of(found)[0]]


def test_an_added_item_sends_its_crop_views_through_the_model_and_stores_them(
    tmp_path: Path,
) -> None:
    model = FakeModel(crop_views=True)
    server, worker = serve(tmp_path, model)
    assert add(server, "corner", png(red_corner())) == ["corner"]
    assert sum(worker.batch_sizes) == 1 + CROP_VIEWS
    store = result_of(server.store.call(lambda store: store))
    (_fids, vectors), *_rest = list(store.catalog.vectors())
    assert vectors.shape == (1, 1 + CROP_VIEWS, model.info.dim)
    pictures = [decode_image(png(red_corner()), (32, 32), DecodeLimits())]
    for left, top, right, bottom in crop_boxes(160, 120):
        pictures.append(
            decode_image(png(red_corner()[top:bottom, left:right]), (32, 32), DecodeLimits())
        )
    np.testing.assert_allclose(vectors[0], model.predict(np.stack(pictures)).embeddings, atol=1e-6)
    # What an item's embedding is (GET /v1/items/{id}?embedding) stays the whole image's.
    np.testing.assert_allclose(store.embedding("corner"), vectors[0, 0])


def test_a_crop_of_an_item_finds_it_first_by_its_view_and_not_without_views(
    tmp_path: Path,
) -> None:
    crop = top_left_view(red_corner())
    results = {}
    for views in (0, CROP_VIEWS):
        model = FakeModel(crop_views=bool(views))
        server, _worker = serve(tmp_path / str(views), model)
        add(server, "corner", png(red_corner()))
        add(server, "look-alike", plain(LOOK_ALIKE))
        results[views] = search(server, png(crop))
    assert results[0][0][0] == "look-alike"
    assert results[CROP_VIEWS][0] == ("corner", pytest.approx(VIEW_WEIGHT))
    assert [item for item, _score in results[CROP_VIEWS]] == ["corner", "look-alike"]


def test_views_survive_a_restart_and_a_deleted_item_loses_them_all(tmp_path: Path) -> None:
    crop = png(top_left_view(red_corner()))
    model = FakeModel(crop_views=True)
    server, _worker = serve(tmp_path, model)
    add(server, "corner", png(red_corner()))
    add(server, "look-alike", plain(LOOK_ALIKE))
    result_of(server.stop())

    again, _worker = serve(tmp_path, model)  # from the snapshot written at stop
    assert search(again, crop, k=1) == [("corner", pytest.approx(VIEW_WEIGHT))]
    assert result_of(again.service.delete("corner")) is True
    assert [item for item, _s in search(again, crop)] == ["look-alike"]
    described = result_of(again.service.index_info())
    assert described.size == 1 and described.vectors_per_item == 1 + CROP_VIEWS


def test_a_greyscale_copy_meets_its_item_by_the_grey_view(tmp_path: Path) -> None:
    """The fake model sees only mean colour, so every grey image looks alike to it: the
    test checks the score a grey copy gets against its item, with and without the view."""
    red = np.broadcast_to(np.asarray(RED, dtype=np.uint8), (40, 40, 3)).copy()
    query = png(np.asarray(Image.fromarray(red).convert("L").convert("RGB")))
    found = {}
    for grey in (False, True):
        model = FakeModel(grey_view=grey)
        server, worker = serve(tmp_path / str(grey), model)
        add(server, "red", png(red))
        assert sum(worker.batch_sizes) == (2 if grey else 1)
        found[grey] = search(server, query)
    assert found[False] == [("red", pytest.approx(0.559, abs=1e-3))]  # colour against grey
    assert found[True] == [("red", pytest.approx(VIEW_WEIGHT))]

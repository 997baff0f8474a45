"""Visual search on the real server with the real model: the demo photos, near-duplicates,
filters, and durability across SIGKILL."""

from __future__ import annotations

import http.client
import io
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from batchserve.demo import sample_photos
from batchserve.testing import encode_multipart
from tests.integration.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("demo"))
    yield server
    stop_server(server)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def edited_copies(data: bytes) -> dict[str, bytes]:
    """Edited copies of a photo, as JPEG: geometric edits and recompression, which leave
    its colours as they were, and photometric ones, which do not."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    red, green, blue = image.split()
    warm = Image.merge(
        "RGB", (red.point(lambda v: min(255, v * 5 // 4)), green, blue.point(lambda v: v * 3 // 4))
    )
    return {
        "crop": jpeg(image.crop((w // 10, h // 10, w - w // 10, h - h // 10))),
        "flip": jpeg(ImageOps.mirror(image)),
        "rescale": jpeg(image.resize((w // 3, h // 3))),
        "jpeg_q10": jpeg(image, quality=10),
        "rotate": jpeg(image.rotate(12, fillcolor=(128, 128, 128))),
        "blur": jpeg(image.filter(ImageFilter.GaussianBlur(2))),
        "grayscale": jpeg(ImageOps.grayscale(image)),
        "brighter": jpeg(ImageEnhance.Brightness(image).enhance(1.5)),
        "darker": jpeg(ImageEnhance.Brightness(image).enhance(0.6)),
        "low_contrast": jpeg(ImageEnhance.Contrast(image).enhance(0.5)),
        "warm_tint": jpeg(warm),
    }


def quarters(data: bytes) -> list[bytes]:
    """The four quarters of a photo (a 2x2 grid, no overlap), as JPEG: the same scene, the
    same colours, and not the photo."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    corners = [(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]
    return [jpeg(image.crop((x, y, x + w // 2, y + h // 2))) for x, y in corners]


def colour_histogram(data: bytes, bins: int = 32) -> npt.NDArray[np.float64]:
    """Per-channel RGB histogram of an image, ``bins`` per channel, float64 [3 * bins],
    summing to 1: the baseline that needs no model."""
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    counts = [
        np.bincount(pixels[..., c].ravel() // (256 // bins), minlength=bins) for c in range(3)
    ]
    histogram = np.concatenate(counts).astype(np.float64)
    return histogram / float(histogram.sum())


def search(server: Server, image: bytes, query: str = "k=5") -> list[dict[str, object]]:
    response = server.request("POST", f"/v1/search?{query}", image, {"Content-Type": "image/jpeg"})
    assert response.status == 200, response.body
    return response.json()["results"][0]["matches"]  # type: ignore[no-any-return]


def add(server: Server, item_id: str, image: bytes, label: str | None = None) -> None:
    fields = {"id": item_id, **({"label": label} if label else {})}
    body, ctype = encode_multipart([("image", "x.jpg", image)], fields=fields)
    response = server.request("POST", "/v1/items", body, {"Content-Type": ctype})
    assert response.status == 200, response.body


def test_first_start_indexes_the_sample_photos(demo_server: Server) -> None:
    info = demo_server.request("GET", "/v1/index").json()
    assert info["size"] == len(sample_photos()) and info["dim"] == 1280
    assert info["kind"] == "flat" and info["device"] == "cpu"


@pytest.fixture(scope="module")
def near_duplicate_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("near-duplicates"), "--no-demo")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def quartered(near_duplicate_server: Server) -> dict[str, bytes]:
    """Each sample photo and, as distractors, its four quarters (same scene, same colours),
    added to the near-duplicate server: {id: JPEG}."""
    catalog: dict[str, bytes] = {}
    for item_id, _label, photo in sample_photos():
        catalog[item_id] = photo
        for i, quarter in enumerate(quarters(photo)):
            catalog[f"{item_id}/quarter-{i}"] = quarter
    for item_id, image in catalog.items():
        add(near_duplicate_server, item_id, image)
    return catalog


def test_near_duplicates_find_their_original_first_where_a_colour_histogram_does_not(
    near_duplicate_server: Server, quartered: dict[str, bytes]
) -> None:
    """The index holds each sample photo and, as distractors, its four quarters: same scene,
    same colours. Edited copies of each photo must find the photo itself first, through the
    server's search, far more often than a colour histogram finds it in the same index."""
    server, catalog = near_duplicate_server, quartered
    size = server.request("GET", "/v1/index").json()["size"]
    assert size == len(catalog) == 5 * len(sample_photos())

    ids = list(catalog)
    histograms = np.stack([colour_histogram(image) for image in catalog.values()])
    queries, model_misses, histogram_hits = 0, [], 0
    for item_id, _label, photo in sample_photos():
        for edit, copy in edited_copies(photo).items():
            queries += 1
            top = search(server, copy, "k=1")[0]["id"]
            if top != item_id:
                model_misses.append((item_id, edit, top))
            intersection = np.minimum(histograms, colour_histogram(copy)).sum(axis=1)
            histogram_hits += ids[int(np.argmax(intersection))] == item_id
    model_top1 = 1 - len(model_misses) / queries
    histogram_top1 = histogram_hits / queries
    # Measured on 88 queries (8 photos x 11 edits) against 40 items (8 photos, 32 quarters):
    # the model 0.977 (86; it misses a crop of the retina, which it puts nearer a quarter,
    # and a rotation of the brick wall); the histogram 0.693 (61: 47 of the 48 geometric and
    # recompressed copies, 14 of the 40 photometric ones). On the 16 photos of the earlier
    # demo set: 0.972 against 0.608. Joint 8x8x8 or 4x4x4 histograms and cosine similarity
    # did worse there (0.47 to 0.58).
    assert model_top1 >= 0.93, model_misses
    assert model_top1 >= histogram_top1 + 0.25, (model_top1, histogram_top1, model_misses)


def hard_copies(data: bytes) -> dict[str, bytes]:
    """Copies the embedding alone finds hard: turned and cropped, zoomed in and greyed, and
    a thumbnail with a text banner over it."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    turned = image.rotate(20, resample=Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
    zoomed = image.crop((w // 5, h // 5, w * 4 // 5, h * 4 // 5)).resize((w, h))
    small = image.resize((160, 160 * h // w), Image.Resampling.LANCZOS)
    banner = ImageDraw.Draw(small)
    banner.rectangle((0, small.height - 22, small.width, small.height), fill=(200, 20, 40))
    banner.text((4, small.height - 18), "SALE -50% TODAY", fill=(255, 255, 255))
    return {
        "rotated crop": jpeg(turned.crop((w // 8, h // 8, w * 7 // 8, h * 7 // 8))),
        "grey zoom": jpeg(ImageOps.grayscale(zoomed)),
        "thumbnail + banner": jpeg(small),
    }


def test_a_verified_search_proves_the_copy_and_answers_no_copy_for_an_unrelated_photo(
    near_duplicate_server: Server, quartered: dict[str, bytes]
) -> None:
    """verify=true on the real server: hard copies of each sample photo find the photo
    first, verified, among the quarters of every photo; a photo of none of them has no
    verified match."""
    from skimage import data

    misses = []
    for item_id, _label, photo in sample_photos():
        for edit, copy in hard_copies(photo).items():
            top = search(near_duplicate_server, copy, "k=5&verify=true")[0]
            if (top["id"], top["verified"]) != (item_id, True):
                misses.append((item_id, edit, top["id"], top["verified"], top["inliers"]))
    # Measured: 23 of 24 (8 photos x 3 edits). The retina zoomed in and greyed is not
    # verified (0 inliers: a smooth fundus has few corners), and a quarter of it ranks first
    # by score, as without verify.
    assert len(misses) <= 1, misses
    for unrelated in (data.hubble_deep_field(), data.immunohistochemistry()):
        matches = search(near_duplicate_server, jpeg(Image.fromarray(unrelated)), "verify=true")
        assert matches and not [m["id"] for m in matches if m["verified"]], matches


def test_label_and_same_class_filters_return_exactly_the_unfiltered_matches_they_keep(
    demo_server: Server,
) -> None:
    size = demo_server.request("GET", "/v1/index").json()["size"]
    for _item_id, label, photo in sample_photos():
        everything = search(demo_server, photo, "k=50")
        assert len(everything) == size  # k is above the size: the whole index, ranked
        assert len({m["label"] for m in everything}) > 1  # so the filter has work to do
        by_label = search(demo_server, photo, f"k=50&label={label}")
        kept = [m for m in everything if m["label"] == label]
        assert by_label and ranking(by_label) == pytest.approx(ranking(kept), abs=1e-5)
        classify = demo_server.request(
            "POST", "/v1/classify?k=1", photo, {"Content-Type": "image/jpeg"}
        ).json()
        predicted = classify["results"][0]["labels"][0]["label"]
        by_class = search(demo_server, photo, "k=50&same_class=true")
        kept = [m for m in everything if m["class"] == predicted]
        assert by_class and ranking(by_class) == pytest.approx(ranking(kept), abs=1e-5)


def ranking(matches: list[dict[str, object]]) -> list[object]:
    """id, score, id, score... of the matches in order (flat, as pytest.approx takes it;
    a filtered search computes its scores on another path, so they agree to rounding)."""
    return [x for m in matches for x in (m["id"], float(m["score"]))]


def test_added_item_is_searchable_at_once_and_similar_excludes_itself(
    demo_server: Server,
) -> None:
    photo = next(data for item_id, _, data in sample_photos() if item_id == "sample/cat")
    copy = edited_copies(photo)["flip"]
    add(demo_server, "flipped-cat", copy, "animals")
    assert search(demo_server, copy, "k=1")[0]["id"] == "flipped-cat"
    similar = demo_server.request("GET", "/v1/items/flipped-cat/similar?k=3").json()
    ids = [m["id"] for m in similar["results"][0]["matches"]]
    assert "flipped-cat" not in ids and ids[0] == "sample/cat"


def distinct_images(n: int) -> list[bytes]:
    from skimage import data

    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        image = Image.fromarray(base[i % 4])
        w, h = image.size
        left, top = (i * 37) % (w // 3), (i * 53) % (h // 3)
        out.append(jpeg(image.crop((left, top, left + w // 2, top + h // 2))))
    return out


def test_acknowledged_adds_and_deletes_survive_sigkill(tmp_path: Path) -> None:
    images = distinct_images(24)
    server = start_server(tmp_path, "--no-demo")
    try:
        for i, image in enumerate(images):
            add(server, f"item-{i}", image, "crops")
        for i in range(4):
            assert server.request("DELETE", f"/v1/items/item-{i}").status == 200
        # SIGKILL alone cannot tell a commit on disk from one in the OS's cache: the live
        # catalog connection says how it commits (WAL, synchronous=FULL: fsync'd before 200).
        catalog = server.request("GET", "/v1/index").json()["catalog"]
        assert catalog == {
            "journal_mode": "wal",
            "synchronous": "full",
            "commits": 28,
            "applied_seq": 28,  # 24 adds and 4 deletes, each in the index
            "behind": 0,
        }
        server.process.send_signal(signal.SIGKILL)  # no snapshot, no clean shutdown
        server.process.wait()
    finally:
        stop_server(server)

    again = start_server(tmp_path, "--no-demo")
    try:
        assert again.request("GET", "/v1/index").json()["size"] == 20
        for i, image in enumerate(images):
            status = again.request("GET", f"/v1/items/item-{i}").status
            if i < 4:
                assert status == 404
                continue
            assert status == 200
            top = search(again, image, "k=1")[0]
            assert top["id"] == f"item-{i}" and float(top["score"]) > 0.999
        assert stop_server(again) == 0
    finally:
        stop_server(again)
    snapshots = list((tmp_path / "data" / "snapshots").glob("*.json"))
    assert snapshots and json.loads(snapshots[-1].read_text())["count"] == 20


def test_sigkill_at_random_moments_during_a_stream_of_adds_loses_no_acknowledged_add(
    tmp_path: Path,
) -> None:
    """Four rounds: 4 clients stream adds, the server is SIGKILLed after a random 0.3-1.5 s
    (snapshots every 0.2 s, so some kills land while one is written), then restarted on
    the same data dir. Every add that was answered 200 must be there at the end."""
    import random
    import threading

    images = distinct_images(16)
    rng = random.Random(7)
    acknowledged: list[str] = []
    for round_ in range(4):
        server = start_server(tmp_path, "--no-demo", "--snapshot-interval-s", "0.2")
        stop = threading.Event()

        def stream(
            client: int,
            server: Server = server,
            round_: int = round_,
            stop: threading.Event = stop,
        ) -> None:
            n = 0
            while not stop.is_set():
                item_id = f"r{round_}-c{client}-{n}"
                body, ctype = encode_multipart(
                    [("image", "x.jpg", images[n % len(images)])], fields={"id": item_id}
                )
                try:
                    response = server.request("POST", "/v1/items", body, {"Content-Type": ctype})
                except (OSError, http.client.HTTPException):
                    return  # killed mid-request: not acknowledged
                if response.status == 200:
                    acknowledged.append(item_id)
                n += 1

        before = len(acknowledged)
        clients = [threading.Thread(target=stream, args=(c,)) for c in range(4)]
        for t in clients:
            t.start()
        time.sleep(rng.uniform(0.3, 1.5))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        stop.set()
        for t in clients:
            t.join(timeout=30)
        stop_server(server)
        assert len(acknowledged) > before, "the kill came before any add was answered"

    final = start_server(tmp_path, "--no-demo")
    try:
        size = final.request("GET", "/v1/index").json()["size"]
        assert len(acknowledged) > 0 and size >= len(acknowledged)
        missing = [i for i in acknowledged if final.request("GET", f"/v1/items/{i}").status != 200]
        assert missing == []
        probe = images[3]
        assert float(search(final, probe, "k=1")[0]["score"]) > 0.999
    finally:
        stop_server(final)


def test_bulk_index_then_serve_the_result(tmp_path: Path) -> None:
    import subprocess
    import sys

    images = tmp_path / "images"
    for i, image in enumerate(distinct_images(12)):
        folder = images / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(image)
    (images / "odd" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    command = [
        sys.executable,
        "-m",
        "batchserve.cli",
        "index",
        str(images),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one file failed, and is reported
    assert "indexed 12 images" in done.stderr and "corrupt.jpg" in done.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "12 already present" in again.stderr

    server = start_server(tmp_path, "--no-demo")
    try:
        assert server.request("GET", "/v1/index").json()["size"] == 12
        top = search(server, distinct_images(12)[5], "k=3&label=odd")
        assert top[0]["id"] == "odd/5.jpg" and {m["label"] for m in top} == {"odd"}
    finally:
        stop_server(server)


def test_item_views_find_a_crop_and_a_grey_copy_of_a_photo_at_the_views_weight(
    tmp_path: Path,
) -> None:
    """``--crop-views --grey-view`` on the real server: the demo photos are added through
    the API with their views, and a crop or a greyscale copy of one finds it first."""
    from batchserve.models.views import VIEW_WEIGHT, crop_boxes

    server = start_server(tmp_path, "--crop-views", "--grey-view")
    try:
        index = server.request("GET", "/v1/index").json()
        assert index["size"] == len(sample_photos()) and index["vectors_per_item"] == 7
        recipe = server.request("GET", "/v1/model").json()["embedding"]
        assert recipe["views"] == {"crops": 5, "side": 0.7, "grey": True}
        for item_id, _label, data in sample_photos()[:3]:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            crop = image.crop(crop_boxes(*image.size)[4])  # the bottom-right view
            for query in (jpeg(crop, quality=95), jpeg(ImageOps.grayscale(image), quality=95)):
                best = search(server, query, "k=2")[0]
                assert best["id"] == item_id
                # Its view matches (a greyscale photo's whole image may match better).
                assert float(best["score"]) >= VIEW_WEIGHT - 0.02
    finally:
        stop_server(server)

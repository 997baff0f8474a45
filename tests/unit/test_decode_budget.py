"""What a request may cost the decode pool: a pixel budget checked from its images' headers
before any is decoded, the per-image limit's default, its deadline and its client's hang-up
checked between images, and one decode per added image (its thumbnail from the same pixels).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock

from batchserve.errors import DeadlineExceeded, PayloadTooLarge
from batchserve.models.images import (
    DecodeLimits,
    check_request_pixels,
    decode_for,
    decode_item_for,
    make_thumbnail,
)
from batchserve.models.keypoints import LocalFeatures
from batchserve.models.spec import ModelInfo
from batchserve.serving.batching import Batcher, BatchPolicy
from batchserve.serving.decoding import HungUp, RequestWatch, decoded_jobs
from batchserve.serving.pipeline import LocalQueue
from batchserve.serving.records import AddTask, EmbedTask, Task
from batchserve.serving.service import ImageService
from batchserve.testing import FakeModel, FakeRunner, encode_image, result_of

EMBED = EmbedTask()


def png(size: tuple[int, int], colour: tuple[int, int, int] = (120, 60, 30)) -> bytes:
    return encode_image(fmt="PNG", size=size, colour=colour)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame is rewritten to declare ``width`` x ``height``."""
    data = bytearray(encode_image(fmt="JPEG", size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The format of every image whose pixels Pillow decodes (``ImageFile.load`` with data
    still to read), in order: opening a header decodes nothing."""
    seen: list[str] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        if self.tile:  # pixels not yet read from the file
            seen.append(str(self.format))
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    yield seen


class Decodes:
    """A DecodeObserver that records each decode and can act on it (as time passing, or
    the client hanging up, while the image decodes)."""

    def __init__(self, each: Callable[[int], None] = lambda _n: None) -> None:
        self.count = 0
        self._each = each

    def decoded(self, seconds: float) -> None:
        self.count += 1
        self._each(self.count)


def embeds(*images: bytes) -> Callable[[], list[tuple[bytes, Task]]]:
    return lambda: [(data, EMBED) for data in images]


# -- the request's pixel budget ------------------------------------------------------------


def test_a_request_over_its_pixel_budget_is_refused_before_any_image_is_decoded(
    loads: list[str],
) -> None:
    limits = DecodeLimits(max_pixels=10_000, max_request_pixels=25_000)
    observer = Decodes()
    images = embeds(png((100, 100)), png((100, 100)), png((100, 100)))  # 30 000 in all
    with pytest.raises(PayloadTooLarge, match="max_request_pixels") as refused:
        decoded_jobs(images, FakeModel().info, limits, observer)
    assert "declare 30000 pixels" in str(refused.value) and "25000" in str(refused.value)
    assert loads == [] and observer.count == 0


def test_a_request_within_its_pixel_budget_to_the_pixel_is_decoded() -> None:
    images = [png((100, 100)), png((100, 100)), png((100, 100))]
    at_budget = DecodeLimits(max_pixels=10_000, max_request_pixels=30_000)
    assert check_request_pixels(images, at_budget) == 30_000
    assert len(decoded_jobs(embeds(*images), FakeModel().info, at_budget, None)) == 3
    with pytest.raises(PayloadTooLarge):
        check_request_pixels(images, DecodeLimits(max_pixels=10_000, max_request_pixels=29_999))


def test_the_budget_counts_declared_pixels_and_stops_reading_headers_once_over() -> None:
    # Headers that declare 24 MP each: nothing behind them is read to count them.
    huge = jpeg_declaring(6000, 4000)
    with pytest.raises(PayloadTooLarge, match="images 0 to 8 of the request declare 216000000"):
        check_request_pixels([huge] * 9 + [b"never opened"], DecodeLimits())
    assert check_request_pixels([huge] * 8, DecodeLimits()) == 192_000_000


def test_pixels_already_decoded_do_not_count_toward_the_budget() -> None:
    limits = DecodeLimits(max_pixels=10_000, max_request_pixels=10_000)
    pixels = np.zeros((200, 200, 3), dtype=np.uint8)  # 40 000: no decoding to bound
    entries: list[tuple[Any, Task]] = [(pixels, EMBED), (png((100, 100)), EMBED)]
    assert len(decoded_jobs(lambda: entries, FakeModel().info, limits, None)) == 2


# -- the default per-image limit -----------------------------------------------------------


def test_the_default_limit_keeps_a_24_mp_camera_photo_and_refuses_past_25_mp() -> None:
    limits = DecodeLimits()
    assert limits.max_pixels == 25_000_000 and limits.max_request_pixels == 200_000_000
    photo = encode_image(fmt="JPEG", size=(6000, 4000), colour=(90, 140, 200))
    assert decode_for(photo, FakeModel(input_size=(160, 160)).info, limits).shape == (160, 160, 3)
    with pytest.raises(PayloadTooLarge, match="5001x5000"):
        check_request_pixels([jpeg_declaring(5001, 5000)], limits)


# -- the deadline and the client, between images -------------------------------------------


def test_decoding_stops_at_the_deadline_and_the_rest_are_not_decoded() -> None:
    clock = Clock()
    observer = Decodes(lambda _n: clock.advance(0.3))  # each image takes 0.3 s
    watch = RequestWatch(clock.seconds, lambda: 0.5)
    images = embeds(*[png((40, 30))] * 5)
    with pytest.raises(DeadlineExceeded, match=r"2 of 5 decoded; the rest were not"):
        decoded_jobs(images, FakeModel().info, DecodeLimits(), observer, watch)
    assert observer.count == 2  # 0.6 s: the deadline passed during the second image
    assert watch.dropped == 3


def test_a_request_read_past_its_deadline_decodes_nothing() -> None:
    clock = Clock()
    clock.advance(1.0)
    observer = Decodes()
    watch = RequestWatch(clock.seconds, lambda: 1.0)
    with pytest.raises(DeadlineExceeded, match="0 of 2 decoded"):
        decoded_jobs(
            embeds(png((4, 4)), png((4, 4))), FakeModel().info, DecodeLimits(), observer, watch
        )
    assert observer.count == 0


class SlowPool:
    """A decode pool that runs its jobs when the test says (``finish``)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Deferred[Any], Callable[[], Any]]] = []

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((d, f))
        return d

    def finish(self) -> None:
        while self.jobs:
            d, f = self.jobs.pop(0)
            maybeDeferred(f).chainDeferred(d)


class Ready:
    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.ready = True


class Rejections:
    """A BatchObserver that keeps the reasons of rejected images."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def queue_size(self, items: int) -> None:
        pass

    def batch_started(self, size: int, waits_s: Sequence[float]) -> None:
        pass

    def item_rejected(self, reason: str) -> None:
        self.reasons.append(reason)


def service_with(
    observer: Decodes, timeout_s: float = 10.0
) -> tuple[ImageService, SlowPool, Clock, FakeRunner[Any], Rejections]:
    clock = Clock()
    runner: FakeRunner[Any] = FakeRunner()
    rejections = Rejections()
    batcher: Batcher[Any, Any] = Batcher(
        runner, BatchPolicy(timeout_s=timeout_s), clock, observer=rejections
    )
    pool = SlowPool()
    info = FakeModel().info
    service = ImageService(
        LocalQueue(batcher), pool, Ready(info), DecodeLimits(), clock, observer=observer
    )
    return service, pool, clock, runner, rejections


def test_a_client_that_hangs_up_stops_its_decoding_before_the_next_image() -> None:
    cancel: list[Deferred[Any]] = []
    observer = Decodes(lambda n: cancel[0].cancel() if n == 1 else None)
    service, pool, _clock, runner, _rejections = service_with(observer)
    d = service.embed(lambda: [png((40, 30))] * 5)
    cancel.append(d)  # the client hangs up while its first image decodes
    pool.finish()
    assert result_of(d).check(CancelledError)
    assert observer.count == 1 and runner.sizes == []
    assert service.reading == 0


def test_the_deadline_passing_mid_request_is_a_504_counting_the_images_not_decoded() -> None:
    clock_box: list[Clock] = []
    observer = Decodes(lambda _n: clock_box[0].advance(0.4))
    service, pool, clock, runner, rejections = service_with(observer, timeout_s=1.0)
    clock_box.append(clock)
    d = service.embed(lambda: [png((40, 30))] * 6)
    pool.finish()
    failure = result_of(d)
    assert failure.check(DeadlineExceeded) and "3 of 6 decoded" in str(failure.value)
    assert observer.count == 3 and runner.sizes == []
    assert rejections.reasons == ["deadline"] * 3


def test_a_hung_up_watch_refuses_the_next_image() -> None:
    watch = RequestWatch(lambda: 0.0, lambda: 10.0)
    watch.check(1, 3)
    watch.hang_up()
    with pytest.raises(HungUp):
        watch.check(1, 3)


# -- one decode per add --------------------------------------------------------------------


def adds(data: bytes) -> Callable[[], list[tuple[bytes, Task]]]:
    return lambda: [(data, AddTask("item"))]


@pytest.mark.parametrize("crop_views", [False, True])
def test_an_added_png_is_decoded_once_for_its_input_views_and_thumbnail(
    loads: list[str], crop_views: bool
) -> None:
    data = png((300, 200))
    info = FakeModel(input_size=(32, 32), crop_views=crop_views).info
    (job,) = decoded_jobs(adds(data), info, DecodeLimits(), None)
    assert loads == ["PNG"]
    assert isinstance(job.task, AddTask) and job.task.thumbnail is not None
    # The same input, views and thumbnail as decoding each of them on its own makes.
    pictures = decode_item_for(data, info, DecodeLimits())
    assert np.array_equal(job.image, pictures[0])
    assert (job.views is None) == (not crop_views)
    if job.views is not None:
        assert np.array_equal(job.views, pictures[1:])
    assert job.task.thumbnail == make_thumbnail(data, DecodeLimits())
    with Image.open(io.BytesIO(job.task.thumbnail)) as thumb:
        assert thumb.size == (256, 171)


def test_an_added_jpeg_whose_input_draft_serves_its_thumbnail_is_decoded_once_for_both(
    loads: list[str],
) -> None:
    """... and once more for its local features, found in a 480-pixel frame: 1/8 of it is
    350x263, too small for them; 1/4 is 700x525."""
    data = encode_image(fmt="JPEG", size=(2800, 2100), colour=(30, 90, 200))
    info = FakeModel(input_size=(32, 32)).info  # 1/8 for both: 350x263 covers 256
    (job,) = decoded_jobs(adds(data), info, DecodeLimits(), None)
    assert loads == ["JPEG", "JPEG"]
    assert isinstance(job.task, AddTask) and job.task.features is not None
    assert LocalFeatures.from_bytes(job.task.features).size == (480, 360)
    assert np.array_equal(job.image, decode_for(data, info, DecodeLimits()))
    assert isinstance(job.task, AddTask) and job.task.thumbnail is not None
    with Image.open(io.BytesIO(job.task.thumbnail)) as thumb:
        assert thumb.size == (256, 192)


def test_an_add_without_local_features_is_decoded_once_and_carries_none(
    loads: list[str],
) -> None:
    data = encode_image(fmt="JPEG", size=(2800, 2100), colour=(30, 90, 200))
    info = FakeModel(input_size=(32, 32)).info
    (job,) = decoded_jobs(adds(data), info, DecodeLimits(local_features=False), None)
    assert loads == ["JPEG"]
    assert isinstance(job.task, AddTask) and job.task.features is None

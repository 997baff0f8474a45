"""What runs on the decode pool for a request: reading its body, checking its images'
pixels against the request's budget, decoding them (an add's item views and thumbnail from
the same decode) to model input, and checking query vectors.

Runs on the decode pool's threads only, never on the reactor: no Twisted here, and nothing
touched that the reactor also touches (the observer must be thread-safe; a ``RequestWatch``
is the one object both sides hold). The service sends whole requests here with
``run_in_pool`` and gets back ``Job`` lists to queue. Between images a request's watch is
checked: past its deadline, or once its client hung up, its remaining images are not decoded.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from batchserve.errors import DeadlineExceeded, InvalidInput
from batchserve.models.images import (
    DecodeLimits,
    check_request_pixels,
    decode_add_for,
    decode_for,
    fit_pixels,
)
from batchserve.models.spec import ModelInfo
from batchserve.serving.pipeline import Job
from batchserve.serving.records import AddTask, SearchRequest, SearchTask, Task
from batchserve.serving.turns import DecodeTurns

T = TypeVar("T")

#: Reads a request's body (on the decode pool): its encoded images, or more.
Reader = Callable[[], T]

#: An image as a request sends it: encoded, or pixels uint8 [H, W, 3].
Picture = bytes | npt.NDArray[np.uint8]


class DecodeObserver(Protocol):
    def decoded(self, seconds: float) -> None:
        """Called on a decode thread (must be thread-safe)."""
        ...


class HungUp(Exception):
    """A request's client hung up, so its decoding stopped. Nobody waits for this error: the
    request's Deferred was cancelled when the client went."""


class RequestWatch:
    """What a request's decoding checks between its images: whether its client hung up
    (``hang_up``, called on the reactor) and whether its deadline passed (``now()`` at or
    past ``deadline_s()``, read on the decode thread: ``now`` must be safe to call from any
    thread, as the reactor's ``seconds``, which is ``time.time``, is)."""

    def __init__(
        self,
        now: Callable[[], float],
        deadline_s: Callable[[], float],
        turns: DecodeTurns | None = None,
    ) -> None:
        self._now = now
        self._deadline_s = deadline_s
        self._turns = turns
        self._hung_up = threading.Event()
        #: Images of the request not decoded because it stopped (read once it failed).
        self.dropped = 0

    def hang_up(self) -> None:
        """The client is gone: decode none of the request's images from now on."""
        self._hung_up.set()

    def turn(self, decoded: int, total: int) -> AbstractContextManager[None]:
        """Wait for the request's turn to decode its next image (see turns.py), given up
        once its client hangs up or its deadline passes (``check``); at once without
        turns."""
        if self._turns is None:
            return nullcontext()
        return self._turns.turn(lambda: self.check(decoded, total))

    def check(self, decoded: int, total: int) -> None:
        """Before the request's next image, ``decoded`` of its ``total`` done: HungUp once
        its client hung up, DeadlineExceeded once its deadline passed."""
        self.dropped = total - decoded
        if self._hung_up.is_set():
            raise HungUp(f"the client hung up; {decoded} of {total} images decoded")
        if self._now() >= self._deadline_s():
            raise DeadlineExceeded(
                f"deadline passed while the images were decoded ({decoded} of {total} "
                "decoded; the rest were not)"
            )


@dataclass(frozen=True)
class VectorSearch:
    """A search by query vectors, checked and L2-normalised: [N, dim] float32."""

    queries: npt.NDArray[np.float32]
    task: SearchTask


def decoded_jobs(
    read: Reader[Sequence[tuple[Picture, Task]]],
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
    watch: RequestWatch | None = None,
) -> list[Job]:
    """Read the request, check its images' headers (each image's limits, and the pixels
    they declare in all against ``limits.max_request_pixels``), then decode every image,
    checking ``watch`` between them: one bad image fails the request before the model sees
    (or the catalog stores) any of its images. An add of an encoded image carries its
    thumbnail and, for a model whose recipe has item views, its views [views, H, W, 3],
    all from one decode."""
    entries = read()
    if not entries:
        raise InvalidInput("no image in the request")
    if watch is not None:
        watch.check(0, len(entries))  # it may have waited in the pool, or been slow to read
    check_request_pixels([data for data, _ in entries if isinstance(data, bytes)], limits)
    jobs = []
    for index, (data, task) in enumerate(entries):
        if watch is None:
            jobs.append(_job(data, task, info, limits, observer))
            continue
        with watch.turn(index, len(entries)):
            watch.check(index, len(entries))  # it may have waited for its turn
            jobs.append(_job(data, task, info, limits, observer))
    return jobs


def search_jobs(
    read: Reader[SearchRequest],
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
    watch: RequestWatch | None = None,
) -> list[Job] | VectorSearch:
    """Read a search: its query images decoded as jobs, or its query vectors checked."""
    request = read()
    if request.vectors is not None:
        if request.task.same_class:
            raise InvalidInput("same_class needs an image, not a vector")
        return VectorSearch(unit_vectors(request.vectors, info.dim), request.task)
    if request.task.same_class and not info.classes:
        raise InvalidInput(f"same_class needs a classifier; {info.name} has none")
    entries = [(data, request.task) for data in request.images]
    return decoded_jobs(lambda: entries, info, limits, observer, watch)


def _job(
    data: Picture,
    task: Task,
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
) -> Job:
    """One image as a job: model input [H, W, 3]; an add of an encoded image decoded once
    for its input, its item views (when the model's recipe has them) and its thumbnail.
    Adds never carry pixels."""
    started = time.perf_counter()
    if isinstance(data, np.ndarray):
        job = Job(fit_pixels(data, info.input_size), task)
    elif isinstance(task, AddTask):
        item = decode_add_for(data, info, limits)
        if task.thumbnail is None:
            task = dataclasses.replace(task, thumbnail=item.thumbnail)
        if task.features is None:
            task = dataclasses.replace(task, features=item.features)
        job = Job(item.pictures[0], task, views=item.pictures[1:] if info.views else None)
    else:
        job = Job(decode_for(data, info, limits), task)
    if observer is not None:
        observer.decoded(time.perf_counter() - started)
    return job


def unit_vectors(vectors: Sequence[Sequence[float]], dim: int) -> npt.NDArray[np.float32]:
    """Validate and L2-normalise query vectors: [N, dim], finite, non-zero."""
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidInput("vectors must be a list of lists of numbers") from e
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != dim:
        raise InvalidInput(f"vectors must be a non-empty list of {dim}-number lists")
    if not np.isfinite(array).all():
        raise InvalidInput("vectors must not hold NaN or infinity")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInput("a zero vector has no direction to search")
    unit: npt.NDArray[np.float32] = (array / norms).astype(np.float32)
    return unit

"""What runs on the decode pool for a request: reading its body, decoding its images (and an
add's item views) to model input, making thumbnails, and checking query vectors.

Runs on the decode pool's threads only, never on the reactor: no Twisted here, and nothing
touched that the reactor also touches (the observer must be thread-safe). The service sends
whole requests here with ``run_in_pool`` and gets back ``Job`` lists to queue.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from batchserve.errors import InvalidInput
from batchserve.models.images import (
    DecodeLimits,
    decode_for,
    decode_item_for,
    fit_pixels,
    make_thumbnail,
)
from batchserve.models.spec import ModelInfo
from batchserve.serving.pipeline import Job
from batchserve.serving.records import AddTask, SearchRequest, SearchTask, Task

T = TypeVar("T")

#: Reads a request's body (on the decode pool): its encoded images, or more.
Reader = Callable[[], T]

#: An image as a request sends it: encoded, or pixels uint8 [H, W, 3].
Picture = bytes | npt.NDArray[np.uint8]


class DecodeObserver(Protocol):
    def decoded(self, seconds: float) -> None:
        """Called on a decode thread (must be thread-safe)."""
        ...


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
) -> list[Job]:
    """Read the request, then decode every image: one bad image fails the request before
    the model sees (or the catalog stores) any of its images. An add of an encoded image,
    for a model whose recipe has item views, carries its views [views, H, W, 3]."""
    entries = read()
    if not entries:
        raise InvalidInput("no image in the request")
    jobs = []
    for data, task in entries:
        task = _with_thumbnail(task, data, limits)
        if isinstance(task, AddTask) and info.views and isinstance(data, bytes):
            pictures = _decode(data, info, limits, observer, item_views=True)
            jobs.append(Job(pictures[0], task, views=pictures[1:]))
        else:
            jobs.append(Job(_decode(data, info, limits, observer), task))
    return jobs


def search_jobs(
    read: Reader[SearchRequest],
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
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
    return decoded_jobs(lambda: entries, info, limits, observer)


def _with_thumbnail(task: Task, data: Picture, limits: DecodeLimits) -> Task:
    """An add stores a thumbnail of its image beside the embedding."""
    if isinstance(task, AddTask) and task.thumbnail is None and isinstance(data, bytes):
        return dataclasses.replace(task, thumbnail=make_thumbnail(data, limits))
    return task


def _decode(
    data: Picture,
    info: ModelInfo,
    limits: DecodeLimits,
    observer: DecodeObserver | None,
    item_views: bool = False,
) -> npt.NDArray[np.uint8]:
    """The image as model input [H, W, 3]; with ``item_views``, it and its crop views
    [1 + views, H, W, 3] (encoded images only: adds never carry pixels)."""
    started = time.perf_counter()
    if isinstance(data, np.ndarray):
        array = fit_pixels(data, info.input_size)
    elif item_views:
        array = decode_item_for(data, info, limits)
    else:
        array = decode_for(data, info, limits)
    if observer is not None:
        observer.decoded(time.perf_counter() - started)
    return array


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

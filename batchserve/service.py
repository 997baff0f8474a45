"""Composes the pipeline for a request: decode each image on the decode pool, submit each
to the Batcher as its own item, and gather the results in request order.

Returns Deferreds; knows nothing of HTTP. Cancelling a returned Deferred (the client hung
up) cancels every image of the request still queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from batchserve.batching import Batcher
from batchserve.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from batchserve.images import DecodeLimits, decode_image
from batchserve.inference import Prediction
from batchserve.models import ModelInfo

T = TypeVar("T")

#: Runs a blocking function on the decode thread pool: ``run(f, *args) -> Deferred``.
PoolRunner = Callable[..., Deferred[Any]]


class DecodeObserver(Protocol):
    def decoded(self, seconds: float) -> None:
        """Called on a decode thread (must be thread-safe)."""
        ...


class ModelStatus(Protocol):
    """What the service needs to know of the inference worker."""

    @property
    def info(self) -> ModelInfo | None: ...


@dataclass(frozen=True)
class Label:
    label: str
    score: float


def gather(deferreds: Sequence[Deferred[T]]) -> Deferred[list[T]]:
    """Results of all ``deferreds`` in order; fails with the first failure and cancels the
    rest; cancelling the result cancels them all."""
    results: list[Any] = [None] * len(deferreds)
    remaining = [len(deferreds)]

    def cancel_all(_d: object = None) -> None:
        for d in deferreds:
            d.cancel()

    out: Deferred[list[T]] = Deferred(cancel_all)
    if not deferreds:
        out.callback([])
        return out

    def ok(result: T, i: int) -> None:
        results[i] = result
        remaining[0] -= 1
        if remaining[0] == 0 and not out.called:
            out.callback(results)

    def bad(failure: Failure, i: int) -> None:
        if not out.called:
            out.errback(failure)
            cancel_all()

    for i, d in enumerate(deferreds):
        d.addCallbacks(ok, bad, callbackArgs=(i,), errbackArgs=(i,))
    return out


class ImageService:
    """Embeds and classifies images through the Batcher."""

    def __init__(
        self,
        batcher: Batcher[npt.NDArray[np.uint8], Prediction],
        run_in_pool: PoolRunner,
        model: ModelStatus,
        limits: DecodeLimits,
        clock: IReactorTime,
        observer: DecodeObserver | None = None,
    ) -> None:
        self._batcher = batcher
        self._clock = clock
        self._run_in_pool = run_in_pool
        self._model = model
        self._limits = limits
        self._observer = observer
        self._decoding = 0

    @property
    def info(self) -> ModelInfo | None:
        """The loaded model, or None while it loads."""
        return self._model.info

    @property
    def decoding(self) -> int:
        """Images accepted and still being decoded."""
        return self._decoding

    def embed(self, images: Sequence[bytes]) -> Deferred[list[Prediction]]:
        """One Prediction per image, in order."""
        info = self._model.info
        if info is None:
            return fail(NotReady("the model is loading; retry shortly"))
        if not images:
            return fail(InvalidInput("no image in the request"))
        try:
            self._batcher.check_room(len(images), pending=self._decoding)
        except Overloaded as e:
            return fail(e)
        # The deadline runs from now: time spent decoding counts against it.
        deadline_s = self._clock.seconds() + self._batcher.policy.timeout_s
        return gather([self._embed_one(data, info.input_size, deadline_s) for data in images])

    def classify(self, images: Sequence[bytes], top_k: int) -> Deferred[list[list[Label]]]:
        """The ``top_k`` most likely labels of each image, best first."""
        info = self._model.info
        if info is not None and not info.classes:
            return fail(InvalidInput(f"model {info.name} has no classifier head"))
        classes = info.classes if info is not None else []

        def labels(predictions: list[Prediction]) -> list[list[Label]]:
            return [top_labels(p, classes or [], top_k) for p in predictions]

        return self.embed(images).addCallback(labels)

    def _embed_one(
        self, data: bytes, size: tuple[int, int], deadline_s: float
    ) -> Deferred[Prediction]:
        self._decoding += 1

        def decoded(result: object) -> object:
            self._decoding -= 1
            return result

        def submit(array: npt.NDArray[np.uint8]) -> Deferred[Prediction]:
            left_s = deadline_s - self._clock.seconds()
            if left_s <= 0:
                self._batcher.count_rejection("deadline")
                return fail(DeadlineExceeded("deadline passed while the image was decoded"))
            return self._batcher.submit(array, timeout_s=left_s)

        d: Deferred[Any] = self._run_in_pool(self._decode, data, size)
        d.addBoth(decoded)
        d.addCallback(submit)
        return d

    def _decode(self, data: bytes, size: tuple[int, int]) -> npt.NDArray[np.uint8]:
        started = time.perf_counter()
        array = decode_image(data, size, self._limits)
        if self._observer is not None:
            self._observer.decoded(time.perf_counter() - started)
        return array


def top_labels(prediction: Prediction, classes: Sequence[str], top_k: int) -> list[Label]:
    """The ``top_k`` classes of ``prediction`` by probability, best first."""
    probabilities = prediction.probabilities
    if probabilities is None:
        raise InvalidInput("the model has no classifier head")
    k = min(top_k, len(probabilities))
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [Label(classes[i], float(probabilities[i])) for i in order]

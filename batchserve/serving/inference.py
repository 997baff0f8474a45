"""The inference thread: one long-lived thread that owns the model and runs whole batches.

The thread loads the model (so TensorFlow's state lives on it), warms up every padded batch
size it compiles (the powers of two for a model that takes any size), then takes batches
from its queue. Each batch is stacked and padded up to the next allowed size, so the
compiled function sees only a few shapes and never retraces. Results and failures go back
to the reactor with ``reactor.callFromThread``; no Deferred is fired from this thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from batchserve.errors import InferenceFailed, NotReady
from batchserve.models.batches import Prediction, pad_batch, padded_size, split_outputs
from batchserve.models.spec import EmbeddingModel, ModelInfo
from batchserve.serving.batching import Batch
from batchserve.serving.threads import KernelNamedThread

log = Logger()


class InferenceObserver(Protocol):
    def inference_done(self, padded_size: int, seconds: float) -> None:
        """Called on the inference thread after each batch (must be thread-safe)."""
        ...


def run_batch(
    model: EmbeddingModel,
    batch: Batch[npt.NDArray[np.uint8]],
    sizes: Sequence[int],
    observer: InferenceObserver | None = None,
) -> list[Prediction | None]:
    """Run the live items of ``batch`` through ``model``, padded to an allowed size.

    Items no longer wanted when the batch starts are skipped (their result is None). More
    live items than ``sizes[-1]`` are run in several chunks.
    """
    live = batch.live_indices()
    results: list[Prediction | None] = [None] * len(batch)
    largest = sizes[-1]
    for start in range(0, len(live), largest):
        chunk = live[start : start + largest]
        size = padded_size(len(chunk), sizes)
        started = time.perf_counter()
        outputs = model.predict(pad_batch([batch.payloads[i] for i in chunk], size))
        if observer is not None:
            observer.inference_done(size, time.perf_counter() - started)
        for i, prediction in zip(chunk, split_outputs(outputs, len(chunk)), strict=True):
            results[i] = prediction
    return results


_Job = tuple[Batch[npt.NDArray[np.uint8]], Deferred[Sequence[Prediction | None]]]


class InferenceWorker:
    """Runs batches of uint8 images on one thread; implements the Batcher's runner.

    ``load`` is called on the thread and returns the model. ``sizes`` are the padded batch
    sizes; ``warm_sizes`` those run once before ``start()`` fires with the ModelInfo
    (default: every padded size).
    """

    def __init__(
        self,
        load: Callable[[], EmbeddingModel],
        reactor: IReactorFromThreads,
        sizes: Sequence[int],
        warmup: bool = True,
        observer: InferenceObserver | None = None,
        warm_sizes: Sequence[int] | None = None,
    ) -> None:
        self._load = load
        self._reactor = reactor
        self._sizes = sorted(sizes)
        self._warmup = warmup
        self._warm_sizes = sorted(warm_sizes) if warm_sizes is not None else self._sizes
        self._observer = observer
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: Deferred[ModelInfo] = Deferred()
        self._serving = False
        self._stopping = False
        self.restarts = 0
        self.info: ModelInfo | None = None

    @property
    def ready(self) -> bool:
        """True while the model is loaded and warm and its thread is running."""
        return self.info is not None and self._serving

    @property
    def sizes(self) -> list[int]:
        return list(self._sizes)

    @property
    def warm_sizes(self) -> list[int]:
        return list(self._warm_sizes)

    def start(self) -> Deferred[ModelInfo]:
        """Start the thread; the Deferred fires on the reactor when the model is warm, or
        fails with the load error."""
        self._spawn(self._main)
        return self._ready

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the thread to finish its queued batches and exit; wait up to ``timeout_s``."""
        self._stopping = True
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]:
        """Queue ``batch`` for the thread; the Deferred fires on the reactor."""
        if not self._serving or self._thread is None or not self._thread.is_alive():
            return fail(NotReady("the inference thread is not running"))
        d: Deferred[Sequence[Prediction | None]] = Deferred()
        self._jobs.put((batch.frozen(), d))
        return d

    def _spawn(self, target: Callable[[], None]) -> None:
        self._thread = KernelNamedThread(target=target, name="batchserve-inference", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            model = self._load()
            if self._warmup:
                self._warm(model)
        except BaseException:
            self._reactor.callFromThread(self._ready.errback, Failure())
            return
        self._reactor.callFromThread(self._became_ready, model.info)
        self._serve(model)

    def _serve(self, model: EmbeddingModel) -> None:
        """The thread's loop. Whatever kills it (a BaseException out of the model or the
        runtime) is reported to the reactor with the batch it was running."""
        job: _Job | None = None
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                batch, d = job
                try:
                    results = run_batch(model, batch, self._sizes, self._observer)
                except Exception as e:
                    failure = Failure(InferenceFailed(f"model failed on a batch: {e!r}"))
                    log.error("model failed on a batch of {n}: {e!r}", n=len(batch), e=e)
                    self._reactor.callFromThread(d.errback, failure)
                else:
                    self._reactor.callFromThread(d.callback, results)
                job = None
        except BaseException as e:
            self._serving = False  # /readyz and new batches see it at once
            self._reactor.callFromThread(self._died, model, job, repr(e))

    def _died(self, model: EmbeddingModel, job: _Job | None, why: str) -> None:
        """On the reactor: the thread is gone. Not ready until a new one runs; the batch it
        was running fails (500), batches queued behind it fail fast (503), and a new thread
        takes over the loaded model."""
        self.restarts += 1
        log.error("the inference thread died ({why}); restarting it", why=why)
        if job is not None:
            job[1].errback(Failure(InferenceFailed(f"the inference thread died: {why}")))
        stop = self._stopping
        while True:
            try:
                queued = self._jobs.get_nowait()
            except queue.Empty:
                break
            if queued is None:
                stop = True
                continue
            queued[1].errback(Failure(NotReady("the inference thread is restarting")))
        if not stop:
            self._spawn(lambda: self._resume(model))

    def _resume(self, model: EmbeddingModel) -> None:
        self._reactor.callFromThread(self._resumed)
        self._serve(model)

    def _resumed(self) -> None:
        if not self._stopping:
            self._serving = True
            log.info("the inference thread is running again")

    def _became_ready(self, info: ModelInfo) -> None:
        self.info = info
        self._serving = True
        self._ready.callback(info)

    def _warm(self, model: EmbeddingModel) -> None:
        height, width = model.info.input_size
        for size in self._warm_sizes:
            started = time.perf_counter()
            model.predict(np.zeros((size, height, width, 3), dtype=np.uint8))
            log.info(
                "warmed up batch size {size} in {s:.2f} s",
                size=size,
                s=time.perf_counter() - started,
            )

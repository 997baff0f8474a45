"""The inference thread's batch handling: padding to allowed sizes, skipping dropped items,
splitting results, and handing every result back through callFromThread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from batchserve.errors import InferenceFailed, NotReady
from batchserve.models.batches import Prediction, pad_batch, padded_size
from batchserve.serving.batching import Batch, Batcher, BatchPolicy
from batchserve.serving.inference import InferenceWorker, run_batch
from batchserve.testing import FakeModel, FakeRunner

SIZES = [1, 2, 4, 8]


def image(value: int) -> np.ndarray:
    return np.full((32, 32, 3), value, dtype=np.uint8)


def embeddings_of(*values: int) -> np.ndarray:
    """The fake model's embeddings of ``image(v)`` for each value, computed directly."""
    return FakeModel().predict(np.stack([image(v) for v in values])).embeddings


def embeddings(results: Any) -> np.ndarray:
    """The embeddings of a list of Predictions (none may be missing)."""
    assert all(r is not None for r in results)
    return np.stack([r.embedding for r in results])


def items(*values: int) -> tuple[Batcher[np.ndarray, Prediction], Batch[np.ndarray], list[Any]]:
    """A real Batch of the given images, as the Batcher hands it to a runner."""
    runner: FakeRunner[np.ndarray] = FakeRunner()
    batcher: Batcher[np.ndarray, Prediction] = Batcher(
        runner, BatchPolicy(max_batch_size=64), Clock()
    )
    batcher.submit(image(0))  # occupies the runner, so the rest queue up together
    ds = [batcher.submit(image(v)) for v in values]
    runner.complete()  # the first finishes; the rest are handed over as one batch
    return batcher, runner.batches[-1], ds


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8)])
def test_padded_size_is_the_next_allowed_size(n: int, expected: int) -> None:
    assert padded_size(n, SIZES) == expected


def test_pad_batch_stacks_and_zero_pads() -> None:
    out = pad_batch([image(7), image(9), image(11)], 4)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    assert out[2].min() == 11 and out[3].max() == 0


def test_batch_is_padded_and_results_match_items_in_order() -> None:
    model = FakeModel()
    _b, batch, _ds = items(10, 20, 30)
    results = run_batch(model, batch, SIZES)
    assert model.batch_shapes == [(4, 32, 32, 3)]
    alone = [run_batch(FakeModel(), items(v)[1], SIZES)[0] for v in (10, 20, 30)]
    for got, want in zip(results, alone, strict=True):
        assert got is not None and want is not None
        np.testing.assert_allclose(got.embedding, want.embedding, atol=1e-6)


def test_items_dropped_before_the_batch_starts_are_not_computed() -> None:
    model = FakeModel()
    _b, batch, ds = items(10, 20, 30)
    ds[1].cancel()
    results = run_batch(model, batch, SIZES)
    assert model.batch_shapes == [(2, 32, 32, 3)]
    assert results[1] is None
    np.testing.assert_allclose(
        embeddings([results[0], results[2]]), embeddings_of(10, 30), atol=1e-6
    )


def test_batch_larger_than_the_largest_size_runs_in_chunks() -> None:
    model = FakeModel()
    _b, batch, _ds = items(*range(11))
    results = run_batch(model, batch, SIZES)
    assert model.batch_shapes == [(8, 32, 32, 3), (4, 32, 32, 3)]
    np.testing.assert_allclose(embeddings(results), embeddings_of(*range(11)), atol=1e-6)


class ThreadReactor:
    """Collects callFromThread calls; the test runs them on its own thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.event = threading.Event()
        self.threads: set[str] = set()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:  # noqa: N802
        self.threads.add(threading.current_thread().name)
        self.calls.append((f, args))
        self.event.set()

    def run_next(self, timeout_s: float = 30.0) -> None:
        assert self.event.wait(timeout_s), "the worker thread never called back"
        self.event.clear()
        f, args = self.calls.pop(0)
        f(*args)


def test_worker_warms_every_size_then_answers_through_call_from_thread() -> None:
    model = FakeModel()
    reactor = ThreadReactor()
    worker = InferenceWorker(lambda: model, reactor, SIZES)  # type: ignore[arg-type]
    ready = worker.start()
    reactor.run_next()
    assert ready.called and worker.ready
    assert [shape[0] for shape in model.batch_shapes] == SIZES

    _b, batch, _ds = items(5, 6, 7)
    d = worker.run(batch)
    reactor.run_next()
    out: list[Any] = []
    d.addBoth(out.append)
    np.testing.assert_allclose(embeddings(out[0]), embeddings_of(5, 6, 7), atol=1e-6)
    assert reactor.threads == {"batchserve-inference"}
    worker.stop()


def test_worker_warms_only_the_sizes_it_is_told_to() -> None:
    model = FakeModel()
    reactor = ThreadReactor()
    worker = InferenceWorker(lambda: model, reactor, SIZES, warm_sizes=[SIZES[-1], 1])  # type: ignore[arg-type]
    worker.start()
    reactor.run_next()
    assert worker.ready and [shape[0] for shape in model.batch_shapes] == [1, SIZES[-1]]
    worker.stop()


def test_model_error_fails_only_that_batch_and_the_worker_goes_on() -> None:
    model = FakeModel()
    reactor = ThreadReactor()
    worker = InferenceWorker(lambda: model, reactor, SIZES, warmup=False)  # type: ignore[arg-type]
    worker.start()
    reactor.run_next()
    model.fail_next = RuntimeError("out of memory")
    failed = worker.run(items(1)[1])
    reactor.run_next()
    out: list[Any] = []
    failed.addErrback(out.append)
    assert isinstance(out[0], Failure) and out[0].check(InferenceFailed)
    assert "out of memory" in out[0].getErrorMessage()

    ok = worker.run(items(2)[1])
    reactor.run_next()
    answered: list[Any] = []
    ok.addBoth(answered.append)
    np.testing.assert_allclose(embeddings(answered[0]), embeddings_of(2), atol=1e-6)
    worker.stop()


def test_load_failure_fails_start() -> None:
    def broken() -> FakeModel:
        raise OSError("no such model file")

    reactor = ThreadReactor()
    worker = InferenceWorker(broken, reactor, SIZES)  # type: ignore[arg-type]
    started = worker.start()
    reactor.run_next()
    out: list[Any] = []
    started.addErrback(out.append)
    assert out[0].check(OSError) and not worker.ready


class ThreadKilled(BaseException):
    """What no ``except Exception`` catches: the inference thread dies of it."""


def test_a_dead_inference_thread_fails_its_batch_turns_not_ready_and_is_restarted() -> None:
    model = FakeModel()
    reactor = ThreadReactor()
    worker = InferenceWorker(lambda: model, reactor, SIZES, warmup=False)  # type: ignore[arg-type]
    worker.start()
    reactor.run_next()
    assert worker.ready
    model.fail_next = ThreadKilled()
    running = worker.run(items(1)[1])
    reactor.run_next()  # _died, on the reactor
    assert not worker.ready and worker.restarts == 1
    out: list[Any] = []
    running.addErrback(out.append)
    assert out[0].check(InferenceFailed) and "ThreadKilled" in out[0].getErrorMessage()
    refused: list[Any] = []
    worker.run(items(1)[1]).addErrback(refused.append)  # fails fast while restarting
    assert refused[0].check(NotReady)

    reactor.run_next()  # the new thread reports in
    assert worker.ready
    again = worker.run(items(2)[1])
    reactor.run_next()
    answered: list[Any] = []
    again.addBoth(answered.append)
    np.testing.assert_allclose(embeddings(answered[0]), embeddings_of(2), atol=1e-6)
    assert len(model.batch_shapes) == 2
    worker.stop()

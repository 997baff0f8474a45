"""An edge's service through the core, in one process: the edge's ImageService on an
EdgeQueue, the core's EdgeChannel on a real Batcher, pipeline and store, the control
channel between them in memory (twisted.test.iosim), a shared slot ring, and a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.test import iosim

from batchserve.errors import DeadlineExceeded, NotFound, NotReady, Overloaded
from batchserve.models.images import DecodeLimits, decode_for
from batchserve.serving.batching import Batcher, BatchPolicy, QueueState
from batchserve.serving.metrics import Metrics
from batchserve.serving.pipeline import Job, PipelineRunner, StoreWorker
from batchserve.serving.records import AddTask, EmbedTask, SearchRequest, SearchTask
from batchserve.serving.service import ImageService
from batchserve.serving.slots import Partition, RingShape, SlotRing, make_ring_file
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.store import ItemStore
from batchserve.testing import (
    FakeModel,
    FakeRunner,
    SyncModelRunner,
    encode_image,
    result_of,
    run_now,
)
from batchserve.workers import frames
from batchserve.workers.core import Core, EdgeChannel, EdgeChannels
from batchserve.workers.edge import CoreLink, CoreModel, CoreStore, EdgeQueue, MetricsRelay

DIM = 8


class Harness:
    """One edge and the core, joined by an in-memory channel."""

    def __init__(self, tmp: Path, held: bool = False, max_queue: int = 16) -> None:
        self.clock = Clock()
        self.model = FakeModel(dim=DIM)
        self.metrics = Metrics()
        self.store = StoreWorker(
            lambda: ItemStore(tmp, VectorIndex(DIM, IndexParams()), {"name": "fake", "dim": DIM}),
            run_now,
        )
        self.store.start()
        self.held: FakeRunner[Any] = FakeRunner()
        runner: Any = (
            self.held
            if held
            else PipelineRunner(
                SyncModelRunner(self.model),
                self.store,
                lambda: self.model.info.classes,
                self.metrics,
            )
        )
        self.policy = BatchPolicy(timeout_s=0.5, max_queue=max_queue, max_batch_size=8)
        self.batcher: Batcher[Any, Any] = Batcher(runner, self.policy, self.clock, self.metrics)
        shape = RingShape((32, 32, 3), 8, 2)
        fd = make_ring_file(shape)
        self.core = Core(self.batcher, self.store, _CoreService(self.model), self.metrics, None)
        self.core.ring = SlotRing(fd, shape)
        self.channels = EdgeChannels(self.core, self.clock)
        self.server: EdgeChannel = self.channels.buildProtocol(None)
        self.lost: list[bool] = []
        self.link = CoreLink(lambda: self.lost.append(True))
        self.pump = iosim.connect(
            self.server, iosim.makeFakeServer(self.server),
            self.link, iosim.makeFakeClient(self.link),
        )  # fmt: skip
        self.slots = Partition(SlotRing(fd, shape), 1)
        self.rejected: list[str] = []
        self.queue = EdgeQueue(self.link, self.slots, self.policy, self.rejected.append)
        self.relay = MetricsRelay(self.link, self.clock)
        self.service = ImageService(
            self.queue, run_now, CoreModel(self.link), DecodeLimits(), self.clock,
            store=CoreStore(self.link), observer=self.relay,
        )  # fmt: skip
        self.service.mark_started()
        result_of(self.flushed(self.link.hello(1)))
        self.link.tell("serving")  # as an edge does once its port is open
        self.pump.flush()

    def flushed(self, d: Deferred[Any]) -> Deferred[Any]:
        self.pump.flush()
        return d


class _CoreService:
    def __init__(self, model: FakeModel) -> None:
        self.info = model.info
        self.ready = True


def test_an_edge_embeds_through_the_core_and_its_slots_come_back(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    data = encode_image(colour=(10, 200, 30))
    embedding = result_of(h.flushed(h.service.embed(lambda: [data])))[0]
    own = h.model.predict(decode_for(data, h.model.info, DecodeLimits())[None]).embeddings[0]
    assert np.allclose(embedding, own)
    assert h.slots.free == 4
    assert h.server.edge == 1 and h.channels.channels == {h.server}


def test_the_edges_each_batch_held_are_counted(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    images = [encode_image(colour=(i * 40, 10, 10)) for i in range(3)]
    assert len(result_of(h.flushed(h.service.embed(lambda: images)))) == 3
    page = h.metrics.render().decode()
    # The model was idle for each: three batches, each of this one edge's images.
    assert "batchserve_batch_edges_count 3.0" in page and "batchserve_batch_edges_sum 3.0" in page


def test_adds_searches_and_reads_by_id_run_on_the_cores_store(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    data = encode_image(colour=(10, 200, 30))
    added = h.service.add(lambda: [(data, AddTask("a", "green"))])
    assert result_of(h.flushed(added)) == ["a"]
    found = h.service.search(lambda: SearchRequest(SearchTask(k=1), images=[data]))
    [[match]] = result_of(h.flushed(found))
    assert match.id == "a" and match.label == "green"
    assert result_of(h.flushed(h.service.get("a"))).label == "green"
    assert result_of(h.flushed(h.service.get("nobody"))).check(NotFound)
    assert h.slots.free == 4


def test_an_edge_refuses_from_the_cores_status_before_reading_a_body(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.link.status is not None
    full = QueueState(queued=16, inflight_batches=1, inflight_items=8, image_s=0.01, batch_s=0.08)
    h.link.status = h.link.status.__class__(**{**h.link.status.__dict__, "queue": full})
    try:
        h.service.admit()
    except Overloaded as e:
        assert e.retry_after_s == 1 and "queue full (16 images)" in str(e)
    else:
        raise AssertionError("admitted into a full queue")
    assert h.rejected == ["queue_full"]


def test_the_core_refuses_what_does_not_fit_whatever_the_edge_last_heard(tmp_path: Path) -> None:
    h = Harness(tmp_path, held=True, max_queue=2)
    h.flushed(h.service.embed(lambda: [encode_image()]))  # the model is busy with it
    h.flushed(h.service.embed(lambda: [encode_image(), encode_image()]))  # the queue is full
    assert h.held.sizes == [1] and h.batcher.queued == 2
    assert h.link.status is not None and h.link.status.queue.queued == 0  # heard nothing yet
    refused = result_of(h.flushed(h.service.embed(lambda: [encode_image()])))
    assert refused.check(Overloaded) and refused.value.retry_after_s >= 1
    assert h.slots.free == 1  # the refused request's slot came back at once


def test_a_cancelled_request_is_dropped_by_the_core_and_its_slots_wait_for_its_answer(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, held=True)
    busy = h.flushed(h.service.embed(lambda: [encode_image()]))
    waiting = h.service.embed(lambda: [encode_image(colour=(1, 2, 3))])
    assert h.batcher.queued == 0  # not yet at the core
    h.pump.flush()
    assert h.batcher.queued == 1 and h.slots.free == 2
    waiting.cancel()
    assert h.slots.free == 2  # the core may still read it until it answers
    h.pump.flush()
    assert h.batcher.queued == 0 and h.slots.free == 3
    assert 'batchserve_rejected_total{reason="cancelled"} 1.0' in h.metrics.render().decode()
    assert h.held.sizes == [1] and busy is not waiting


def test_a_requests_deadline_runs_out_at_the_core(tmp_path: Path) -> None:
    h = Harness(tmp_path, held=True)
    running = h.flushed(h.service.embed(lambda: [encode_image()]))
    late = h.flushed(h.service.embed(lambda: [encode_image(colour=(1, 2, 3))]))
    assert h.batcher.queued == 1
    h.clock.advance(0.6)
    assert result_of(h.flushed(late)).check(DeadlineExceeded)
    assert result_of(running).check(DeadlineExceeded)  # its batch still with the model
    assert h.batcher.queued == 0 and h.slots.free == 4
    assert 'batchserve_rejected_total{reason="deadline"} 2.0' in h.metrics.render().decode()


def test_an_edges_channel_closing_cancels_all_it_sent_and_frees_nothing_twice(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, held=True)
    sent = h.flushed(h.service.embed(lambda: [encode_image()]))
    queued = h.flushed(h.service.embed(lambda: [encode_image(colour=(1, 2, 3))]))
    assert h.batcher.queued == 1
    h.server.transport.loseConnection()
    h.pump.flush()
    assert h.batcher.queued == 0  # the dead edge's queued image is dropped
    assert result_of(sent).check(NotReady) and result_of(queued).check(NotReady)
    assert h.lost == [True] and h.slots.free == 4
    assert h.service.ready is False
    assert result_of(h.service.embed(lambda: [encode_image()])).check(NotReady)


def test_what_an_edge_counts_is_in_the_cores_metrics_page(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.relay.request_done("/v1/embed", 200, 0.01)
    h.relay.refusal_held()
    page = result_of(h.flushed(h.relay.render())).decode()
    assert 'batchserve_requests_total{code="200",route="/v1/embed"} 1.0' in page
    assert "batchserve_refusals_held_total 1.0" in page


def test_edges_are_told_the_cores_status_when_it_changes(tmp_path: Path) -> None:
    h = Harness(tmp_path, held=True)
    h.channels.start()
    h.flushed(h.service.embed(lambda: [encode_image()]))
    h.flushed(h.service.embed(lambda: [encode_image()]))
    h.clock.advance(0.05)
    h.pump.flush()
    assert h.link.status is not None and h.link.status.queue.queued == 1
    h.channels.stop()


def test_a_request_whose_images_do_not_all_fit_this_edges_slots_takes_none(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    image = np.zeros((32, 32, 3), np.uint8)
    jobs = [Job(image, EmbedTask()) for _ in range(5)]  # this edge has 4 slots
    try:
        h.queue.stage(jobs)
    except Overloaded as e:
        assert "4 shared slots" in str(e)
    else:
        raise AssertionError("staged more images than there are slots")
    assert h.slots.free == 4


def test_the_core_is_ready_only_once_every_edge_serves(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    assert h.channels.status().ready and h.channels.all_greeted.called
    late = EdgeChannels(h.core, h.clock, edges=2)
    second = late.buildProtocol(None)
    second.makeConnection(iosim.FakeTransport(second, isServer=True))
    second.stringReceived(frames.dumps(("call", 1, "hello", 0)))
    assert not late.status().ready  # greeted, but its port is not open yet
    second.stringReceived(frames.dumps(("tell", 0, "serving", None)))
    assert not late.status().ready  # one of two edges serves


def test_each_edge_holds_its_share_of_the_connections_the_port_may_hold() -> None:
    from batchserve.config import ServerSettings, ServeSettings
    from batchserve.workers.edge_main import per_edge

    settings = ServeSettings(server=ServerSettings(max_connections=1000))
    assert per_edge(settings, 3).server.max_connections == 334
    assert per_edge(settings, 1).server.max_connections == 1000
    assert per_edge(settings, 3).limits == settings.limits  # the rest as the core's

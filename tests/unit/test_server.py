"""The builder: settings reach the objects it wires. The lifecycle: the API's port opens
only once the server is ready; stopping closes idle connections and answers, with
``Connection: close``, a request that was still arriving."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from batchserve.config import ServerSettings, ServeSettings
from batchserve.errors import ConfigError
from batchserve.http.ports import check_free
from batchserve.models.spec import ModelInfo
from batchserve.server import Server, Threads, build, default_model
from batchserve.storage.data_dir import StoreSettings, lock_data_dir, remove_if_untouched
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.store import ItemStore
from batchserve.testing import FakeModel, SyncModelRunner, result_of, run_now
from tests.unit.test_api import RED, Harness


def test_the_decode_pool_gets_its_size_and_priority_from_the_settings() -> None:
    settings = ServeSettings(server=ServerSettings(decode_threads=3, decode_nice=7, workers="0"))
    server = build(settings, MemoryReactorClock(), model=SyncModelRunner(FakeModel()))
    decode, index = server.threads.pools
    # A thread per request being decoded, as many images decoding at once as decode threads.
    assert (decode.min, decode.max, decode.threadFactory.nice) == (3, 3 * 8, 7)  # type: ignore[attr-defined]
    assert server.threads.turns is not None and server.threads.turns.slots == 3
    assert (index.min, index.max, index.threadFactory.nice) == (1, 1, 0)  # type: ignore[attr-defined]
    assert server.batcher.policy is settings.batching


POWERS = [1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize(
    ("flags", "sizes"),
    [
        (["--backend", "tensorflow"], POWERS),  # a traced graph per size
        (["--backend", "openvino"], list(range(1, 33))),  # any size: batches unpadded
        (["--backend", "torch"], list(range(1, 33))),  # eager: any size
        (["--backend", "torch", "--jit-compile"], POWERS),  # a program per size
        (["--backend", "jax"], POWERS),  # jax.jit: a program per size
        (["--backend", "openvino", "--batch-sizes", "8,32"], [8, 32]),  # as told
    ],
)
def test_the_model_runs_batches_padded_only_where_its_backend_needs_it(
    flags: list[str], sizes: list[int]
) -> None:
    """Whatever sizes it runs, it warms up the powers of two (or the sizes it is told):
    a model that takes any size compiles nothing for each."""
    from batchserve.serving.metrics import Metrics
    from tests.unit.test_config import serve

    worker = default_model(serve(flags), MemoryReactorClock(), Metrics())
    assert worker.sizes == sizes  # type: ignore[attr-defined]
    assert worker.warm_sizes == (sizes if "--batch-sizes" in flags else POWERS)  # type: ignore[attr-defined]


class SlowToLoad(SyncModelRunner):
    """A model whose loading ends when the test says."""

    def __init__(self) -> None:
        super().__init__(FakeModel(), loaded=False)
        self.loaded: Deferred[None] = Deferred()

    def start(self) -> Deferred[ModelInfo]:
        return self.loaded.addCallback(lambda _: result_of(super(SlowToLoad, self).start()))


def loading_server(
    settings: ServeSettings, reactor: MemoryReactorClock, model: SlowToLoad, data_dir: Path
) -> Server:
    """The server for ``settings`` on ``reactor``, its model ``model``, inline threads."""
    return build(
        settings,
        reactor,
        model=model,
        threads=Threads(decode=run_now, store=run_now),
        store=lambda info: ItemStore(
            data_dir, VectorIndex(info.dim, IndexParams()), info.fingerprint()
        ),
    )


def test_the_api_port_opens_only_once_the_server_is_ready(tmp_path: Path) -> None:
    reactor, model = MemoryReactorClock(), SlowToLoad()
    settings = ServeSettings(
        server=ServerSettings(port=8123, metrics_address="127.0.0.1:9123", workers="0"),
        store=StoreSettings(demo=False),
    )
    server = loading_server(settings, reactor, model, tmp_path)
    started = server.start()
    # Loading: only the metrics port; a connection to the API's would be refused.
    assert [port for port, *_ in reactor.tcpServers] == [9123]
    model.loaded.callback(None)
    assert result_of(started) is None
    assert [port for port, *_ in reactor.tcpServers] == [9123, 8123]
    assert reactor.tcpServers[1][1] is server.connections


def test_the_api_port_holds_a_backlog_of_max_connections(tmp_path: Path) -> None:
    # Twisted's default backlog, 50, resets clients that connect in a burst.
    reactor, model = MemoryReactorClock(), SlowToLoad()
    settings = ServeSettings(
        server=ServerSettings(port=8123, max_connections=1500, workers="0"),
        store=StoreSettings(demo=False),
    )
    server = loading_server(settings, reactor, model, tmp_path)
    started = server.start()
    model.loaded.callback(None)
    assert result_of(started) is None
    [(port, _factory, backlog, _interface)] = reactor.tcpServers
    assert (port, backlog) == (8123, 1500)


def connect(h: Harness) -> tuple[Any, StringTransport]:
    protocol = h.server.connections.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_stopping_closes_idle_connections_and_answers_a_request_still_arriving() -> None:
    h = Harness()
    idle, idle_transport = connect(h)
    arriving, arriving_transport = connect(h)
    head = (
        b"POST /v1/embed HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(RED)}\r\n\r\n".encode()
    )
    arriving.dataReceived(head + RED[:100])

    stopped = h.server.stop()
    assert idle_transport.disconnecting and not arriving_transport.disconnecting
    assert h.request("GET", "/readyz")[0] == 503
    arriving.dataReceived(RED[100:])
    answer = arriving_transport.value()
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    assert arriving_transport.disconnecting
    assert not stopped.called  # until both connections are gone
    for protocol in (idle, arriving):
        protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(stopped) is None


def test_a_server_told_to_stop_while_loading_never_opens_the_api(tmp_path: Path) -> None:
    reactor, model = MemoryReactorClock(), SlowToLoad()
    settings = ServeSettings(
        server=ServerSettings(port=8123, workers="0"), store=StoreSettings(demo=False)
    )
    server = loading_server(settings, reactor, model, tmp_path)
    started = server.start()
    stopped = server.stop()
    model.loaded.callback(None)
    assert result_of(started) is None and result_of(stopped) is None
    assert reactor.tcpServers == []


def test_a_port_in_use_is_named_with_the_way_out() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            check_free("127.0.0.1", port)
        assert str(raised.value) == (
            f"127.0.0.1:{port} is in use: pass --port N, or --port 0 for any free port"
        )
        with pytest.raises(ConfigError, match="pass another --metrics-address"):
            check_free("127.0.0.1", port, flag="--metrics-address")
    check_free("127.0.0.1", port)  # free again
    check_free("127.0.0.1", 0)  # the kernel picks one


def test_a_data_dir_holding_only_its_lock_is_removed_and_any_other_kept(tmp_path: Path) -> None:
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    lock_data_dir(fresh)
    lock_data_dir(used)
    (used / "catalog.sqlite3").write_bytes(b"")
    assert remove_if_untouched(fresh) and not fresh.exists()
    assert not remove_if_untouched(used) and (used / "lock").exists()

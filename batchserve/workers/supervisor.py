"""The core process's edges (``--workers N``): it opens the API's listening socket, the
shared slot ring and the control socket, starts N edge processes that inherit the first
two, restarts an edge that dies, and on shutdown drains them all before the core itself.

Shape: every edge accepts connections on the one listening socket (the kernel hands each
new connection to whichever edge accepts first, so a busy edge takes fewer), parses,
admits and decodes requests, and sends decoded images to the core through shared memory
(``serving/slots.py``), small messages over a Unix socket (``frames.py``). The core alone
owns the Batcher, the model thread, the store thread and the catalog, so a batch mixes
every edge's images and still makes one search.

Faults. An edge that dies is started again (after 0.5 s, doubling to 10 s while it keeps
dying within 10 s of starting): its in-flight requests fail (their connections close),
nobody else's do, and the core drops what it had sent. A core that dies takes the server
with it: its edges answer what they hold with 503, stop accepting, and exit, so the port
closes and the load balancer sends clients to another replica at once (as during a rolling
restart), while the process supervisor (systemd, Docker, Kubernetes) starts the server
again. An edge left answering 503 for a core that may never come back would hold the port
and its clients instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IListeningPort, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from batchserve.config import ServeSettings
from batchserve.models.spec import ModelInfo
from batchserve.serving.slots import RingShape, SlotRing, make_ring_file
from batchserve.workers.core import Core, EdgeChannels

log = Logger(namespace="batchserve.workers")

#: Backoff before starting an edge again, doubling while it keeps dying young.
FIRST_RESTART_S = 0.5
LONGEST_RESTART_S = 10.0
YOUNG_S = 10.0
#: Edges that may die before they ever serve before the server gives up starting.
FAILED_STARTS = 3
#: Exit status of an edge whose core went away.
CORE_GONE = 3


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` that child processes inherit."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class EdgeProcess(ProcessProtocol):
    """One edge process, as its supervisor watches it."""

    def __init__(self, supervisor: EdgeSupervisor, edge: int, started_s: float) -> None:
        self._supervisor = supervisor
        self.edge = edge
        self.started_s = started_s
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        self.ended.callback(None)
        self._supervisor.ended(self, reason)


class EdgeSupervisor:
    """Starts, restarts and stops the edges of one core (see the module's docstring)."""

    def __init__(
        self,
        reactor: Any,
        edges: int,
        listening: socket.socket,
        ring_fd: int,
        ring: RingShape,
        log_args: Sequence[str] = (),
        drain_timeout_s: float = 30.0,
        channels: EdgeChannels | None = None,
    ) -> None:
        self._channels = channels
        self._reactor: IReactorProcess = reactor
        self._clock: IReactorTime = reactor
        self.edges = edges
        self._listening = listening
        host, port = listening.getsockname()[:2]
        self._address = (str(host), int(port))
        self._ring_fd = ring_fd
        self._ring = ring
        self._log_args = list(log_args)
        self._drain_timeout_s = drain_timeout_s
        self._folder = Path(tempfile.mkdtemp(prefix="batchserve-core-"))  # mode 0700
        self.control_path = str(self._folder / "control")
        self._running: dict[int, EdgeProcess] = {}
        self._restart_s: dict[int, float] = {}
        self._control: IListeningPort | None = None
        self._stopping = False
        self._failed_starts = 0

    def _listen_control(self, factory: Any) -> None:
        """Take the edges' control channels (``core.EdgeChannels``) on a Unix socket in a
        folder only this user can open."""
        self._control = self._reactor.listenUNIX(self.control_path, factory, mode=0o600)  # type: ignore[attr-defined]

    def start(self) -> None:
        if self._channels is not None:
            self._listen_control(self._channels)
            self._channels.start()
        for edge in range(self.edges):
            self._spawn(edge)

    def serving(self) -> Deferred[None]:
        """Fires once every edge has connected to the core (each then serves at once)."""
        assert self._channels is not None
        return self._channels.all_greeted

    def address(self) -> tuple[str, int]:
        """The API's listening address (host, port)."""
        return self._address

    def _spawn(self, edge: int) -> None:
        if self._stopping:
            return
        args = [
            sys.executable, "-m", "batchserve.workers.edge_main",
            "--edge", str(edge), "--edges", str(self.edges),
            "--control", self.control_path,
            "--listen-fd", "3", "--family", str(int(self._listening.family)),
            "--ring-fd", "4", "--ring", _ring_arg(self._ring),
            *self._log_args,
        ]  # fmt: skip
        process = EdgeProcess(self, edge, self._clock.seconds())
        # Its log goes where the core's own lines go (the core's stderr is a pipe it reads
        # native code's output from: sys.stderr is the original).
        fds: dict[int, int | str] = {
            0: "w", 1: sys.stdout.fileno(), 2: sys.stderr.fileno(),
            3: self._listening.fileno(), 4: self._ring_fd,
        }  # fmt: skip
        env = dict(os.environ)
        self._reactor.spawnProcess(process, sys.executable, args, env=env, childFDs=fds)
        self._running[edge] = process

    def ended(self, process: EdgeProcess, reason: Failure) -> None:
        if self._running.get(process.edge) is process:
            del self._running[process.edge]
        if self._stopping:
            return
        lived_s = self._clock.seconds() - process.started_s
        channels = self._channels
        if channels is not None and not channels.has_greeted(process.edge):
            # It died before it ever served: a broken install or settings, not bad luck.
            self._failed_starts += 1
            if self._failed_starts >= FAILED_STARTS:
                channels.never_served(
                    RuntimeError(
                        f"edge {process.edge} {_how_it_ended(reason)} before it served, "
                        f"{self._failed_starts} times (its lines above say why)"
                    )
                )
                return
        wait_s = self._restart_s.get(process.edge, FIRST_RESTART_S)
        self._restart_s[process.edge] = (
            min(wait_s * 2, LONGEST_RESTART_S) if lived_s < YOUNG_S else FIRST_RESTART_S
        )
        how = _how_it_ended(reason)
        log.warn(
            "edge {edge} {how} after {s:.1f} s; starting it again in {wait:g} s",
            edge=process.edge,
            how=how,
            s=lived_s,
            wait=wait_s,
        )
        self._clock.callLater(wait_s, self._spawn, process.edge)

    def stop(self) -> Deferred[None]:
        """Drain every edge (SIGTERM: each stops accepting and answers what it took), wait
        for them to exit (up to the drain timeout and 5 s more, then SIGKILL), then close the
        listening socket and the control socket."""
        self._stopping = True
        # The core's copy closes now: once the edges stop listening, a new connection is
        # refused at once (which a load balancer retries elsewhere), not left in the backlog.
        self._listening.close()
        if self._channels is not None:
            self._channels.stop()
        running = list(self._running.values())
        for process in running:
            _signal(process, signal.SIGTERM)
        killer = self._clock.callLater(self._drain_timeout_s + 5.0, self._kill, running)
        ended: Deferred[Any] = DeferredList([p.ended for p in running]) if running else succeed([])

        def closed(_: object) -> object:
            if killer.active():
                killer.cancel()
            self._listening.close()
            control, self._control = self._control, None
            return control.stopListening() if control is not None else None

        ended.addCallback(closed)
        return ended.addBoth(self._clean)

    def _kill(self, running: list[EdgeProcess]) -> None:
        for process in running:
            if not process.ended.called:
                log.warn("edge {edge} did not drain in time; killing it", edge=process.edge)
                _signal(process, signal.SIGKILL)

    def _clean(self, result: object) -> object:
        for leftover in self._folder.iterdir():
            leftover.unlink(missing_ok=True)
        self._folder.rmdir()
        return result


def _how_it_ended(reason: Failure) -> str:
    error = reason.value
    if reason.check(ProcessDone):
        return "exited"
    if isinstance(error, ProcessTerminated) and error.signal is not None:
        return f"was killed by signal {error.signal}"
    if isinstance(error, ProcessTerminated):
        return f"exited with status {error.exitCode}"
    return f"ended ({reason.getErrorMessage()})"


def _signal(process: EdgeProcess, sig: int) -> None:
    transport = process.transport
    if transport is not None and not process.ended.called:
        with contextlib.suppress(OSError):
            transport.signalProcess(sig)


def _ring_arg(ring: RingShape) -> str:
    h, w, c = ring.image_shape
    return f"{h},{w},{c},{ring.slots},{ring.partitions}"


def ring_from_arg(text: str) -> RingShape:
    h, w, c, slots, partitions = (int(part) for part in text.split(","))
    return RingShape((h, w, c), slots, partitions)


def start_edges(
    settings: ServeSettings, reactor: Any, core: Core, info: ModelInfo
) -> EdgeSupervisor:
    """The core's side of ``--workers N``, started: the slot ring (sized for the queue's
    bound and the batches in flight, at the model's input size), the listening socket, the
    control socket, and N edge processes."""
    server, policy = settings.server, settings.batching
    count = server.edge_count()
    h, w = info.input_size
    in_flight = policy.max_queue + policy.max_batch_size * (policy.max_inflight + 1)
    shape = RingShape.for_edges((h, w, 3), in_flight, count)
    ring_fd = make_ring_file(shape)
    core.ring = SlotRing(ring_fd, shape)
    listening = listening_socket(server.host, server.port, server.max_connections)
    log_args = ["--log-level", server.log_level, "--log-format", server.log_format]
    edges = EdgeSupervisor(
        reactor,
        count,
        listening,
        ring_fd,
        shape,
        log_args,
        server.drain_timeout_s,
        EdgeChannels(core, reactor, count),
    )
    edges.start()
    return edges

"""An edge process: ``python -m batchserve.workers.edge_main``, started by the core's
``EdgeSupervisor`` (never by hand). It connects to the core's control socket, gets the
server's settings and model from it, maps the shared slot ring (inherited descriptor 4),
and serves the HTTP API on the inherited listening socket (descriptor 3) with its own
reactor and decode pool, until SIGTERM (drain, exit 0) or until the core goes away (answer
what it holds with 503, exit 3).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from batchserve.config import ServeSettings, usable_cores
from batchserve.http.drain import Connections
from batchserve.serving import logs
from batchserve.serving.service import ImageService
from batchserve.serving.slots import Partition, SlotRing
from batchserve.serving.threads import Threads, name_this_thread
from batchserve.workers.edge import CoreLink, CoreModel, CoreStore, EdgeQueue, MetricsRelay
from batchserve.workers.front import api_and_site
from batchserve.workers.supervisor import CORE_GONE, ring_from_arg

log = Logger(namespace="batchserve.workers")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="batchserve-edge")
    parser.add_argument("--edge", type=int, required=True)
    parser.add_argument("--edges", type=int, required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--family", type=int, required=True)
    parser.add_argument("--ring-fd", type=int, required=True)
    parser.add_argument("--ring", required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text")
    return parser.parse_args(argv)


class Edge:
    """One edge's objects and lifecycle."""

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self._reactor = reactor
        self._args = args
        self.link = CoreLink(self._core_lost)
        self.port: IListeningPort | None = None
        self._stopping = False
        self.exit_code = 0

    def start(self) -> Deferred[Any]:
        endpoint = UNIXClientEndpoint(self._reactor, self._args.control)
        d: Deferred[Any] = connectProtocol(endpoint, self.link)
        d.addCallback(lambda _: self.link.hello(self._args.edge))
        return d.addCallback(self._serve)

    def _serve(self, hello: dict[str, Any]) -> None:
        args = self._args
        settings = per_edge(hello["settings"], args.edges)
        ring = SlotRing(args.ring_fd, ring_from_arg(args.ring))
        relay = MetricsRelay(self.link, self._reactor)
        self.relay = relay
        server = settings.server
        # The cores are shared among the edges: each decodes on its part of them.
        decode_threads = server.decode_threads or max(1, usable_cores() // args.edges)
        threads = Threads.decode_only(self._reactor, decode_threads, server.decode_nice)
        self.threads = threads
        threads.start()
        queue = EdgeQueue(
            self.link, Partition(ring, args.edge), settings.batching, relay.item_rejected
        )
        service = ImageService(
            queue,
            threads.decode,
            CoreModel(self.link),
            settings.images,
            self._reactor,
            store=CoreStore(self.link),
            observer=relay,
            turns=threads.turns,
            verify=settings.verify,
        )
        service.mark_started()
        self.api, site = api_and_site(settings, service, relay, self._reactor, queue.images_per_s)
        self.settings = settings
        self.connections = Connections(site)
        relay.start()
        self.port = self._reactor.adoptStreamPort(args.listen_fd, args.family, self.connections)
        os.close(args.listen_fd)  # the port holds its own copy
        self.link.tell("serving")
        log.info("edge {edge} serving (pid {pid})", edge=args.edge, pid=os.getpid())

    def stop(self) -> Deferred[Any] | None:
        """On SIGTERM: stop accepting, answer the requests taken, send the last counts."""
        self._stopping = True
        if self.port is None:
            return None
        drain_s = self.settings.server.drain_timeout_s
        log.info(
            "edge {edge} draining: {n} requests in flight, waiting up to {s:g} s",
            edge=self._args.edge,
            n=self.api.in_flight.count,
            s=drain_s,
        )
        stopped: Deferred[Any] = maybeDeferred(self.port.stopListening)
        drained = self.api.in_flight.drain(drain_s, self._reactor, self.connections)

        def done(_: object) -> None:
            self.relay.stop()
            self.threads.stop()
            if self.link.transport is not None:
                self.link.transport.loseConnection()

        both: Deferred[Any] = gatherResults([stopped, drained])
        return both.addBoth(done)

    def _core_lost(self) -> None:
        if self._stopping or self.port is None:  # not serving yet: start() fails instead
            return
        log.error("the model core went away; this edge stops (exit {code})", code=CORE_GONE)
        self.exit_code = CORE_GONE
        self._reactor.stop()


def per_edge(settings: ServeSettings, edges: int) -> ServeSettings:
    """The server's settings as one of ``edges`` edges applies them: its share of the
    connections the API port may hold open."""
    server = settings.server
    share = max(1, -(-server.max_connections // edges))
    return replace(settings, server=replace(server, max_connections=share))


def main(argv: Sequence[str] | None = None) -> int:
    from twisted.internet import reactor as installed

    args = parse(sys.argv[1:] if argv is None else argv)
    name_this_thread(f"batchserve-edge{args.edge}")
    logs.start_logging(args.log_level, args.log_format, process=f"edge-{args.edge}")
    reactor: Any = installed
    edge = Edge(reactor, args)
    reactor.addSystemEventTrigger("before", "shutdown", edge.stop)

    def cannot_start(failure: Any) -> None:
        log.critical("edge cannot start: {e}", e=failure.getErrorMessage())
        edge.exit_code = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: edge.start().addErrback(cannot_start))
    # Ctrl-C in a terminal reaches the whole process group: the core stops its edges itself
    # (SIGTERM, after which they drain), so an edge must not stop first and be restarted.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.run()
    return edge.exit_code


if __name__ == "__main__":
    sys.exit(main())

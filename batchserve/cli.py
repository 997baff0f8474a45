"""The ``batchserve`` command. The one place where objects are built and wired together.

Heavy modules (TensorFlow, Twisted's reactor, Klein) are imported inside the sub-commands,
so ``batchserve --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batchserve import __version__, config
from batchserve.errors import BatchserveError

if TYPE_CHECKING:
    from batchserve.config import Settings
    from batchserve.models import ModelSpec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchserve",
        description="Image-embedding server that batches requests onto one model thread.",
    )
    parser.add_argument("--version", action="version", version=f"batchserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve the HTTP API",
        description="Serve the HTTP API. Every flag can also be set with a BATCHSERVE_<NAME> "
        "environment variable or in a TOML file (--config).",
    )
    config.add_arguments(serve)
    return parser


def model_spec(settings: Settings) -> ModelSpec:
    from batchserve.models import ModelSpec

    return ModelSpec(
        source=settings.model,
        weights=settings.weights,
        input_size=settings.input_size,
        preprocess=settings.preprocess,
        signature=settings.signature,
        embedding_output=settings.embedding_output,
        classifier_output=settings.classifier_output,
        labels_file=settings.labels_file,
        device=settings.device,
        jit_compile=settings.jit_compile,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )


def _start_logging(level_name: str) -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level_name))
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def serve(settings: Settings) -> int:
    """Run the server until SIGINT/SIGTERM; return the exit status."""
    # TensorFlow's C++ start-up chatter hides the server's own log lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from functools import partial

    from twisted.internet import reactor as installed_reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.logger import Logger
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Site

    from batchserve.api import BatchserveAPI, configure_site
    from batchserve.batching import Batcher, BatchPolicy
    from batchserve.bodies import RequestLimits
    from batchserve.images import DecodeLimits
    from batchserve.inference import InferenceWorker
    from batchserve.metrics import Metrics
    from batchserve.models import ModelInfo, load_model
    from batchserve.service import ImageService

    reactor: Any = installed_reactor  # the interfaces it provides are not declared to mypy
    _start_logging(settings.log_level)
    log = Logger(namespace="batchserve")
    started = time.monotonic()
    os.makedirs(settings.data_dir, mode=0o700, exist_ok=True)

    metrics = Metrics()
    spec = model_spec(settings)
    worker = InferenceWorker(
        lambda: load_model(spec),
        reactor,
        settings.padded_batch_sizes(),
        warmup=settings.warmup,
        observer=metrics,
    )
    policy = BatchPolicy(
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_s,
        max_queue=settings.max_queue,
        max_inflight=settings.max_inflight,
        timeout_s=settings.timeout_s,
    )
    batcher = Batcher(worker, policy, reactor, observer=metrics)
    decode_pool = ThreadPool(
        minthreads=settings.decode_thread_count(),
        maxthreads=settings.decode_thread_count(),
        name="batchserve-decode",
    )
    decode_pool.start()
    service = ImageService(
        batcher,
        partial(deferToThreadPool, reactor, decode_pool),
        worker,
        DecodeLimits(max_pixels=settings.max_image_pixels),
        reactor,
        observer=metrics,
    )
    api = BatchserveAPI(
        service,
        metrics,
        RequestLimits(
            max_body_bytes=settings.max_body_bytes, max_images=settings.max_images_per_request
        ),
    )
    site = configure_site(Site(api.resource()), settings.max_body_bytes, settings.access_log)
    port = reactor.listenTCP(settings.port, site, interface=settings.host)
    address = port.getHost()
    log.info(
        "batchserve {version} listening on http://{host}:{port}",
        version=__version__,
        host=address.host,
        port=address.port,
    )

    status = {"code": 0}

    def ready(info: ModelInfo) -> None:
        metrics.set_model(info.name, info.source, info.dim, info.pretrained)
        log.info(
            "ready in {s:.1f} s: model {name} ({dim}-d, input {size}, {device}), "
            "batch sizes {sizes}",
            s=time.monotonic() - started,
            name=info.name,
            dim=info.dim,
            size="x".join(map(str, info.input_size)),
            device=info.device,
            sizes=worker.sizes,
        )

    def load_failed(failure: Failure) -> None:
        log.critical("cannot load the model: {error}", error=failure.getErrorMessage())
        status["code"] = 1
        reactor.stop()

    worker.start().addCallbacks(ready, load_failed)

    def shutdown() -> None:
        log.info("shutting down")
        decode_pool.stop()
        worker.stop()

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    return status["code"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = config.load(args, os.environ)
    except BatchserveError as e:
        print(f"batchserve: {e}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve(settings)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

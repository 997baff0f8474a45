"""The ``batchserve`` command. The one place where objects are built and wired together.

Heavy modules (TensorFlow, Twisted's reactor, Klein) are imported inside the sub-commands,
so ``batchserve --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchserve import __version__, config
from batchserve.errors import BatchserveError

if TYPE_CHECKING:
    from batchserve.config import Settings
    from batchserve.index import IndexParams
    from batchserve.models import ModelInfo, ModelSpec
    from batchserve.pipeline import IndexWorker
    from batchserve.service import ImageService
    from batchserve.store import ItemStore


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
    index = commands.add_parser(
        "index",
        help="bulk-index a directory of images or a manifest into the data dir",
        description="Index PATH into --data-dir with the model the server uses: a directory "
        "tree (each top-level sub-folder is a label) or a manifest (.csv with a header "
        "path,id,label,metadata, or .jsonl). Ids already present are skipped, so an "
        "interrupted run resumes. Stop the server that uses the data dir first.",
    )
    index.add_argument("path", metavar="PATH", help="directory or manifest file")
    config.add_arguments(index)
    add_train_arguments(
        commands.add_parser(
            "train",
            help="fine-tune a model on class folders, for serve and index --model",
            description="Transfer learning: train a new embedding layer and classifier on "
            "top of a pretrained backbone, on DATA_DIR's class folders (one sub-folder per "
            "class, or train/ and val/ each with class folders). Writes MODEL_DIR, which "
            "`batchserve serve --model MODEL_DIR` and `batchserve index --model MODEL_DIR` "
            "load as is.",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
    )
    return parser


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", metavar="DATA_DIR", help="class folders of images")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="new directory to write")
    p.add_argument(
        "--model",
        default="builtin",
        help="the base: builtin, keras:<Application>, a .keras/.h5 file or a trained MODEL_DIR",
    )
    p.add_argument("--weights", default="imagenet", help="weights of a keras:<Application>")
    p.add_argument("--input-size", type=int, default=0, help="input size of a keras: base")
    p.add_argument("--preprocess", default="auto", help="pixel normalisation: auto, tf, ...")
    p.add_argument("--name", default="", help="model name (default: MODEL_DIR's name)")
    p.add_argument("--embedding-dim", type=int, default=256, help="size of the new embedding")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout after the embedding")
    p.add_argument("--epochs", type=int, default=10, help="epochs with the backbone frozen")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--val-split", type=float, default=0.1, help="share of each class held out")
    p.add_argument(
        "--unfreeze-top",
        type=int,
        default=0,
        metavar="N",
        help="then fine-tune the top N backbone layers (batch norm stays frozen); 0: no",
    )
    p.add_argument("--fine-tune-epochs", type=int, default=0, help="0: as many as --epochs")
    p.add_argument(
        "--fine-tune-learning-rate", type=float, default=0.0, help="0: --learning-rate / 10"
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="random flip, rotation, zoom and contrast while training",
    )
    p.add_argument("--patience", type=int, default=3, help="early stopping: epochs without gain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-file", default="", help="cache decoded images in this file (default: memory)"
    )
    p.add_argument("--intra-op-threads", type=int, default=0, help="TensorFlow threads; 0: all")


def train_command(args: argparse.Namespace) -> int:
    """``batchserve train DATA_DIR --out MODEL_DIR``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchserve.models import ModelSpec
    from batchserve.train import TrainSettings, train

    settings = TrainSettings(
        data_dir=Path(args.data_dir),
        out=Path(args.out),
        model=ModelSpec(
            source=args.model,
            weights=args.weights,
            input_size=args.input_size,
            preprocess=args.preprocess,
            intra_op_threads=args.intra_op_threads,
        ),
        name=args.name,
        embedding_dim=args.embedding_dim,
        dropout=args.dropout,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        val_split=args.val_split,
        unfreeze_top=args.unfreeze_top,
        fine_tune_epochs=args.fine_tune_epochs,
        fine_tune_learning_rate=args.fine_tune_learning_rate,
        augment=args.augment,
        patience=args.patience,
        seed=args.seed,
        cache_file=args.cache_file,
    )
    train(settings)
    return 0


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


def index_params(settings: Settings) -> IndexParams:
    from batchserve.index import IndexParams

    return IndexParams(
        kind=settings.index_kind,
        nlist=settings.ivf_nlist,
        nprobe=settings.ivf_nprobe,
        train_min=settings.index_train_min,
        hnsw_m=settings.hnsw_m,
        ef_construction=settings.hnsw_ef_construction,
        ef_search=settings.hnsw_ef_search,
        pq_m=settings.pq_m,
        refine_factor=settings.pq_refine_factor,
        device=settings.index_device,
    )


def open_store(settings: Settings, info: ModelInfo) -> ItemStore:
    """The item store for ``info``'s embeddings under the data dir (refuses another model's)."""
    from batchserve.index import VectorIndex
    from batchserve.store import ItemStore

    index = VectorIndex(info.dim, index_params(settings))
    return ItemStore(Path(settings.data_dir), index, info.fingerprint())


def serve(settings: Settings) -> int:
    """Run the server until SIGINT/SIGTERM; return the exit status."""
    # TensorFlow's C++ start-up chatter hides the server's own log lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from functools import partial

    from twisted.internet import reactor as installed_reactor
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.task import LoopingCall
    from twisted.internet.threads import deferToThreadPool
    from twisted.logger import Logger
    from twisted.python.failure import Failure
    from twisted.python.threadpool import ThreadPool
    from twisted.web.server import Site

    from batchserve.api import BatchserveAPI
    from batchserve.auth import Tokens
    from batchserve.batching import Batcher, BatchPolicy
    from batchserve.bodies import RequestLimits
    from batchserve.images import DecodeLimits
    from batchserve.inference import InferenceWorker
    from batchserve.metrics import Metrics, MetricsPage
    from batchserve.models import load_model
    from batchserve.pipeline import IndexWorker, PipelineRunner
    from batchserve.service import ImageService
    from batchserve.site import configure_site
    from batchserve.store import OpenReport, lock_data_dir

    reactor: Any = installed_reactor  # the interfaces it provides are not declared to mypy
    _start_logging(settings.log_level)
    log = Logger(namespace="batchserve")
    started = time.monotonic()
    os.umask(0o077)  # every file the server creates is readable by its own user only
    lock_data_dir(Path(settings.data_dir))

    metrics = Metrics()
    spec = model_spec(settings)
    worker = InferenceWorker(
        lambda: load_model(spec),
        reactor,
        settings.padded_batch_sizes(),
        warmup=settings.warmup,
        observer=metrics,
    )
    index_pool = ThreadPool(minthreads=1, maxthreads=1, name="batchserve-index")
    index_pool.start()
    index = IndexWorker(
        lambda: open_store(settings, _loaded(worker.info)),
        partial(deferToThreadPool, reactor, index_pool),
        observer=metrics,
    )
    policy = BatchPolicy(
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_delay_s,
        max_queue=settings.max_queue,
        max_inflight=settings.max_inflight,
        timeout_s=settings.timeout_s,
    )
    pipeline = PipelineRunner(
        worker, index, lambda: worker.info.classes if worker.info else None, observer=metrics
    )
    batcher = Batcher(pipeline, policy, reactor, observer=metrics)
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
        index=index,
        observer=metrics,
    )
    api = BatchserveAPI(
        service,
        metrics,
        RequestLimits(
            max_body_bytes=settings.max_body_bytes, max_images=settings.max_images_per_request
        ),
        Tokens(api=settings.api_token, write=settings.write_token),
        metrics_here=not settings.metrics_address,
    )
    site = configure_site(
        Site(api.resource()), settings.max_body_bytes, settings.access_log, api.refuse_early
    )
    port = reactor.listenTCP(settings.port, site, interface=settings.host)
    address = port.getHost()
    log.info(
        "batchserve {version} listening on http://{host}:{port}{auth}",
        version=__version__,
        host=address.host,
        port=address.port,
        auth=" (bearer tokens required)" if settings.api_token or settings.write_token else "",
    )
    if settings.metrics_address:
        metrics_host, metrics_port = settings.metrics_host_port()
        metrics_site = Site(MetricsPage(metrics))
        metrics_site.noisy = False
        listening = reactor.listenTCP(metrics_port, metrics_site, interface=metrics_host)
        log.info(
            "metrics on http://{host}:{port}/metrics",
            host=listening.getHost().host,
            port=listening.getHost().port,
        )

    status = {"code": 0}
    snapshots = LoopingCall(lambda: index.call(_snapshot).addErrback(snapshot_failed))

    def snapshot_failed(failure: Failure) -> None:
        log.error(
            "index snapshot failed (the previous one is intact): {e}", e=failure.getErrorMessage()
        )

    def model_ready(info: ModelInfo) -> Any:
        metrics.set_model(info.name, info.source, info.dim, info.pretrained)
        log.info(
            "model {name} loaded in {s:.1f} s ({dim}-d, input {size}, {device}), "
            "batch sizes {sizes}",
            s=time.monotonic() - started,
            name=info.name,
            dim=info.dim,
            size="x".join(map(str, info.input_size)),
            device=info.device,
            sizes=worker.sizes,
        )
        return index.start()

    def index_ready(report: OpenReport) -> Any:
        how = (
            "rebuilt from the catalog"
            if report.rebuilt
            else f"snapshot {report.snapshot_seq} + {report.replayed} changes replayed"
        )
        for skipped in report.skipped_snapshots:
            log.warn("skipped snapshot {s}", s=skipped)
        snapshots.start(settings.snapshot_interval_s, now=False)
        d = index.call(lambda store: store.describe())

        def announce(described: dict[str, Any]) -> Any:
            log.info(
                "index open: {size} items in a {kind} index ({how}, {t:.2f} s)",
                size=described["size"],
                kind=described["kind_in_use"],
                how=how,
                t=report.seconds,
            )
            if settings.demo and described["size"] == 0:
                return seed_demo(service, index, log)
            return None

        def ready(_: object) -> None:
            service.mark_started()
            log.info("ready in {s:.1f} s", s=time.monotonic() - started)

        return d.addCallback(announce).addCallback(ready)

    def start_failed(failure: Failure) -> None:
        log.critical("cannot start: {error}", error=failure.getErrorMessage())
        status["code"] = 1
        reactor.stop()

    worker.start().addCallback(model_ready).addCallback(index_ready).addErrback(start_failed)

    def shutdown() -> Any:
        """Stop listening, answer what is in flight (up to drain_timeout_s), stop the
        model thread, write the final snapshot. Twisted waits for the returned Deferred."""
        log.info(
            "shutting down: {n} requests in flight, waiting up to {s:g} s",
            n=api.in_flight.count,
            s=settings.drain_timeout_s,
        )
        if snapshots.running:
            snapshots.stop()
        d = maybeDeferred(port.stopListening)
        d.addCallback(lambda _: api.in_flight.drain(settings.drain_timeout_s, reactor))

        def drained(all_answered: bool) -> Any:
            if not all_answered:
                log.warn(
                    "{n} requests still in flight after {s:g} s; stopping anyway",
                    n=api.in_flight.count,
                    s=settings.drain_timeout_s,
                )
            decode_pool.stop()
            worker.stop(timeout_s=5.0)
            return index.close()

        def closed(result: Any) -> Any:
            if isinstance(result, Failure):
                log.error("final snapshot failed: {e}", e=result.getErrorMessage())
            index_pool.stop()
            log.info("stopped")
            return None

        return d.addCallback(drained).addBoth(closed)

    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    return status["code"]


def index_command(settings: Settings, path: Path) -> int:
    """``batchserve index PATH``: embed and store every image, then snapshot the index."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from batchserve.images import DecodeLimits
    from batchserve.ingest import Progress, ingest, print_summary, sources_for
    from batchserve.models import load_model
    from batchserve.store import lock_data_dir

    os.umask(0o077)
    sources = list(sources_for(path))
    lock_data_dir(Path(settings.data_dir))
    model = load_model(model_spec(settings))
    store = open_store(settings, model.info)
    store.open()
    print(
        f"indexing {len(sources)} images from {path} into {settings.data_dir} "
        f"({store.index.size} items there already)",
        file=sys.stderr,
    )
    progress = Progress(sys.stderr, len(sources))
    try:
        report = ingest(
            sources,
            store,
            model,
            settings.padded_batch_sizes(),
            settings.decode_thread_count() + 1,
            DecodeLimits(settings.max_image_pixels),
            progress=progress.update,
        )
        store.maintain()
        store.snapshot()
    finally:
        store.close()
    print_summary(report)
    return 1 if report.failed else 0


def _loaded(info: ModelInfo | None) -> ModelInfo:
    assert info is not None, "the store opens only after the model is loaded"
    return info


def _snapshot(store: ItemStore) -> Path | None:
    return store.snapshot()


def seed_demo(service: ImageService, index: IndexWorker, log: Any) -> Any:
    """Index the sample photos on a first start, once (an empty data dir stays seeded)."""
    from batchserve.demo import sample_photos
    from batchserve.pipeline import AddTask

    def seeded(store: ItemStore) -> bool:
        return bool(store.catalog.get_meta("demo_seeded"))

    def add_samples(done: bool) -> Any:
        if done:
            return None
        photos = sample_photos()
        entries = [
            (data, AddTask(item_id, label, {"source": "scikit-image sample data"}))
            for item_id, label, data in photos
        ]
        d = service.add(entries)
        d.addCallback(lambda ids: index.call(_mark_seeded, len(ids)))
        d.addCallback(lambda n: log.info("indexed {n} sample photos to search", n=n))
        return d

    return index.call(seeded).addCallback(add_samples)


def _mark_seeded(store: ItemStore, count: int) -> int:
    store.catalog.set_meta("demo_seeded", "1")
    return count


def quiet_openmp(environ: MutableMapping[str, str]) -> None:
    """Make idle OpenMP threads (FAISS, its BLAS) sleep at once instead of spinning.

    GNU OpenMP spins after each parallel region by default; beside TensorFlow's own pool on
    the same cores that spinning is taken from the model (a single-query search added 4 ms
    to a request instead of 1.5 ms on 2 cores). Read once, when FAISS loads, so this runs
    before any sub-command imports it; a value already set by the user is kept.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_openmp(os.environ)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        try:
            return train_command(args)
        except BatchserveError as e:
            print(f"batchserve: {e}", file=sys.stderr)
            return 2
    try:
        settings = config.load(args, os.environ)
    except BatchserveError as e:
        print(f"batchserve: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve(settings)
        if args.command == "index":
            return index_command(settings, Path(args.path))
    except BatchserveError as e:
        print(f"batchserve: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``batchserve`` command: parse the settings of a sub-command and run it.

Each sub-command shows and reads only its own settings (config.py's trees). Heavy modules
(TensorFlow, Twisted's reactor, Klein, FAISS) are imported once a sub-command runs, after
``quiet_openmp``; so is config.py, whose settings trees import the components.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from batchserve import __version__
from batchserve.errors import BatchserveError
from batchserve.models.compiled import quiet_tensorflow

if TYPE_CHECKING:
    from batchserve.bulk.settings import BulkJob
    from batchserve.config import DedupeSettings

SETTINGS_HELP = (
    " Every flag can also be set with a BATCHSERVE_<NAME> environment variable or in a "
    "TOML file (--config)."
)


def build_parser() -> argparse.ArgumentParser:
    from batchserve import config
    from batchserve.train.settings import TrainSettings

    parser = argparse.ArgumentParser(
        prog="batchserve",
        description="Image-embedding server that batches requests onto one model thread.",
    )
    parser.add_argument("--version", action="version", version=f"batchserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="serve the HTTP API", description="Serve the HTTP API." + SETTINGS_HELP
    )
    config.add_arguments(serve, config.ServeSettings)
    index = commands.add_parser(
        "index",
        help="bulk-index a directory of images or a manifest into the data dir",
        description="Index PATH into --data-dir with the model the server uses: a directory "
        "tree (each top-level sub-folder is a label) or a manifest (.csv with a header "
        "path,id,label,metadata, .jsonl or .parquet), local or at a URI pyarrow reads "
        "(s3://, gs://, hdfs://). Files already indexed with the same content are skipped, "
        "so an interrupted run resumes. --engine ray runs the job on Ray Data, on this "
        "machine or a cluster (--ray-address). Stop the server that uses the data dir "
        "first." + SETTINGS_HELP,
    )
    index.add_argument("path", metavar="PATH", help="directory or manifest file, or its URI")
    config.add_arguments(index, config.BulkSettings)
    train = commands.add_parser(
        "train",
        help="fine-tune a model on class folders, for serve and index --model",
        description="Transfer learning: train a new embedding layer and classifier on "
        "top of a pretrained backbone, on DATA_DIR's class folders (one sub-folder per "
        "class, or train/ and val/ each with class folders). Writes MODEL_DIR, which "
        "`batchserve serve --model MODEL_DIR` and `batchserve index --model MODEL_DIR` "
        "load as is." + SETTINGS_HELP,
    )
    train.add_argument("data_dir", metavar="DATA_DIR", help="class folders of images")
    train.add_argument("--out", required=True, metavar="MODEL_DIR", help="new directory to write")
    config.add_arguments(train, TrainSettings)
    dedupe = commands.add_parser(
        "dedupe",
        help="list the groups of copies among the stored items",
        description="Find the copies among the items of --data-dir (or --catalog): each "
        "item's embedding shortlist (--verify-k) verified by the items' local features; "
        "writes each group of copies (CSV: group,id,label, or JSON with the evidence). "
        "Reads the catalog only: a server may go on serving from it." + SETTINGS_HELP,
    )
    config.add_arguments(dedupe, config.DedupeSettings)
    samples = commands.add_parser(
        "samples",
        help="write the sample photos to a folder, to try the API with",
        description="Write the eight sample photos the server indexes on a first start "
        "(shipped with batchserve; nothing is downloaded) into DIR, as JPEG files.",
    )
    samples.add_argument("dir", metavar="DIR", help="folder to write them to (made if missing)")
    return parser


def samples_command(folder: Path) -> int:
    """``batchserve samples DIR``: the demo photos as files, for a first curl."""
    from batchserve.demo import SAMPLES, sample_photos

    folder.mkdir(parents=True, exist_ok=True)
    for (_id, _label, name), (_, _, data) in zip(SAMPLES, sample_photos(), strict=True):
        (folder / name).write_bytes(data)
        print(folder / name)
    return 0


def train_command(args: argparse.Namespace) -> int:
    """``batchserve train DATA_DIR --out MODEL_DIR``; 2 without the ``train`` extra."""
    quiet_tensorflow(os.environ)
    from batchserve import config
    from batchserve.train import TrainSettings, train

    settings = config.load(
        TrainSettings, args, os.environ, data_dir=Path(args.data_dir), out=Path(args.out)
    )
    try:
        train(settings)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "matplotlib":
            raise
        print(
            "batchserve: `batchserve train` needs the train extra (matplotlib is not "
            "installed): pip install 'batchserve[train]'",
            file=sys.stderr,
        )
        return 2
    return 0


def index_command(job: BulkJob, path: str) -> int:
    """``batchserve index PATH``: embed and store every new or changed image, then snapshot
    the index; 1 when some files could not be indexed."""
    quiet_tensorflow(os.environ)
    from batchserve.bulk.command import index_into
    from batchserve.bulk.report import Progress, print_summary
    from batchserve.bulk.sources import sources_for
    from batchserve.storage.data_dir import lock_data_dir

    os.umask(0o077)
    sources = list(sources_for(path))
    data_dir = job.store.data_dir
    if job.bulk.write_data_dir:
        lock_data_dir(Path(data_dir))
    where = data_dir if job.bulk.write_data_dir else job.bulk.output

    def announce(already: int) -> None:
        progress.start()  # the model is loaded: images/s counts from here, as the summary's
        print(
            f"indexing {len(sources)} images from {path} into {where} "
            f"({already} items there already) with the {job.bulk.engine} engine",
            file=sys.stderr,
        )

    progress = Progress(sys.stderr, len(sources))
    report = index_into(job, sources, announce, progress.update)
    print_summary(report)
    if job.bulk.report:
        Path(job.bulk.report).write_text(json.dumps(report.as_json(), indent=2) + "\n")
    return 1 if report.failed else 0


def dedupe_command(settings: DedupeSettings) -> int:
    """``batchserve dedupe``: the groups of copies, to --output or stdout; a summary on
    stderr."""
    from batchserve.bulk.dedupe import dedupe, write

    report = dedupe(settings.store, settings.verify, settings.dedupe)
    print(write(report, settings.dedupe.output), end="")
    grouped = sum(len(group) for group in report.groups)
    print(
        f"{len(report.groups)} groups of copies ({grouped} of {report.items} items) from "
        f"{report.pairs_verified} pairs verified in {report.seconds:.1f} s; "
        f"{report.without_features} items without local features left out",
        file=sys.stderr,
    )
    return 0


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
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BatchserveError as e:
        print(f"batchserve: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Run the parsed sub-command; BatchserveError when its settings or input are bad."""
    from batchserve import config

    if args.command == "train":
        return train_command(args)
    if args.command == "samples":
        return samples_command(Path(args.dir))
    if args.command == "dedupe":
        return dedupe_command(config.load(config.DedupeSettings, args, os.environ))
    if args.command == "index":
        settings = config.load(config.BulkSettings, args, os.environ)
        return index_command(settings.job(), args.path)
    from batchserve.server import serve

    serve(config.load(config.ServeSettings, args, os.environ))  # exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main())

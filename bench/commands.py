"""python -m bench: load-test a batchserve deployment, or measure and render bench/RESULTS.md.
(``device`` is bench/device_command.py: it runs where these commands' packages are not.)

  python -m bench run --url http://127.0.0.1:8080 --mode open --rates 20,50,100 --plot out.png
  python -m bench run --url http://127.0.0.1:8080 --mode closed --concurrency 1,8,32
  python -m bench report            # starts its own servers, measures every scenario
  python -m bench render            # RESULTS.md and the README's numbers from results.json
  python -m bench ab --b-flags "--decode-nice 0"   # two settings side by side

Every measuring command records its section in bench/results.json, then renders RESULTS.md
and the README's benchmark block from that file. Only ever point ``run`` at servers you
run; the scenarios start their own on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import images as bench_images
from bench.harness import load as bench_load
from bench.harness import point
from bench.harness.bodies import ENCODINGS, build_requests
from bench.report import plots, render, results
from bench.scenarios import (
    ab,
    backends,
    bulk,
    bulk_engines,
    ceiling,
    cluster,
    embed,
    frontend,
    kinds,
    offline,
    overload,
    precision,
    replica_start,
    retrieval,
    search,
    verify_cost,
    versus,
    workers,
    writers,
)


def _images(directory: str | None) -> list[bytes]:
    if directory:
        return bench_images.from_directory(Path(directory))
    return bench_images.sample_photos()


def _values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def run_command(args: argparse.Namespace) -> int:
    """Load a running server: one point per rate or client count, printed as JSON lines."""
    base = args.url.rstrip("/")
    requests = build_requests(
        base, args.route, _images(args.images), args.encoding, args.images_per_request
    )
    spec = bench_load.LoadSpec(
        url=base + args.route,
        requests=requests,
        duration_s=args.duration,
        warmup_s=args.warmup,
        poisson=args.poisson,
        rate=1.0 if args.mode == "open" else 0.0,
        concurrency=0 if args.mode == "open" else 1,
    )
    values = _values(args.rates if args.mode == "open" else args.concurrency)
    points = []
    for value in values:
        one = point.sweep(
            base, spec, [value], args.processes, args.slo_ms, args.images_per_request
        )[0]
        print(json.dumps(one), flush=True)
        points.append(one)
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=2))
    if args.plot:
        plots.plot_sweep(points, f"{args.route} ({args.mode} loop)", Path(args.plot))
    return 0


def publish(args: argparse.Namespace, argv: list[str], name: str, numbers: Any) -> None:
    """Record one measured section, then render RESULTS.md, its plots and the README."""
    path = Path(args.results)
    defaults = {
        "default_backend": results.default_backend(),
        "default_edges": results.default_edges(),
    }
    results.record(path, name, argv, {**defaults, **numbers})
    data = results.load(path)
    out = Path(args.out)
    render.draw(data, out.parent, (name,))
    render.write(data, out, Path(args.readme) if args.readme else None)
    print(f"{name}: recorded in {path}, rendered into {out}", flush=True)


def render_command(args: argparse.Namespace) -> int:
    data = results.load(Path(args.results))
    out = Path(args.out)
    if args.plots:
        render.draw(data, out.parent, tuple(data))
    render.write(data, out, Path(args.readme) if args.readme else None)
    print(out.read_text())
    return 0


def report_steps(args: argparse.Namespace) -> list[tuple[str, Callable[[], Any]]]:
    """Each scenario of the report, in order, with what measures it (skipped ones left
    out)."""
    images = _images(args.images)
    plan = embed.Plan(
        args.duration,
        args.warmup,
        args.slo_ms,
        _values(args.rates),
        [int(c) for c in _values(args.clients)],
    )
    steps: list[tuple[str, Callable[[], Any], bool]] = [
        ("limit", lambda: offline.measure(images, args.limit_s), True),
        ("embed", lambda: embed.measure(images, plan), True),
        (
            "low_load",
            lambda: embed.measure_low_load(images, args.low_load_s, args.slo_ms),
            True,
        ),
        ("search", lambda: search.measure(args.search_items, images, plan), args.search_items > 0),
        ("bulk", lambda: bulk.measure(args.bulk_images), args.bulk_images > 0),
        (
            "bulk_engines",
            lambda: bulk_engines.measure(args.engines_images),
            args.engines_images > 0,
        ),
        ("kinds", lambda: kinds.measure_table(args.kinds_items), args.kinds_items > 0),
        ("ceiling", lambda: ceiling.measure(args.duration), True),
        ("overload", lambda: overload.measure(images, args.overload_s), args.overload_s > 0),
        ("frontend", lambda: frontend.measure(images, args.frontend_s), args.frontend_s > 0),
        (
            "workers",
            lambda: workers.measure(args.workers_rounds),
            args.workers_rounds > 0,
        ),
        ("versus", lambda: versus.measure(images, args.versus_rounds), args.versus_rounds > 0),
        (
            "backends",
            lambda: backends.measure(images, args.backends_rounds),
            args.backends_rounds > 0,
        ),
        (
            "replica_start",
            lambda: replica_start.measure(args.replica_items),
            args.replica_items > 0,
        ),
        ("cluster", lambda: cluster.measure(args.cluster_s), args.cluster_s > 0),
        ("writers", lambda: writers.measure(args.writers_s), args.writers_s > 0),
    ]
    only = {name for name in args.only.split(",") if name} if args.only else None
    return [(name, fn) for name, fn, on in steps if on and (only is None or name in only)]


def report_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Measure each scenario in turn, recording each as soon as it is done."""
    for name, measure in report_steps(args):
        print(f"measuring {name} ...", flush=True)
        publish(args, argv, name, measure())
    return 0


def retrieval_command(args: argparse.Namespace, argv: list[str]) -> int:
    """Search quality of each method; then, unless skipped, /v1/embed throughput at 32
    clients with the default embedding against the one before it, in alternating rounds."""
    numbers = retrieval.measure(quick=args.quick)
    if args.throughput_rounds:
        numbers["throughput"] = retrieval.measure_throughput(args.throughput_rounds)
    if args.verify_rounds:
        numbers["verify_cost"] = verify_cost.measure(args.verify_rounds)
    publish(args, argv, "retrieval", numbers)
    return 0


def ab_command(args: argparse.Namespace) -> int:
    """Two batchserve servers side by side; prints what it found, records nothing."""
    a = ab.Side(args.a_flags, args.a_code)
    b = ab.Side(args.b_flags, args.b_code)
    compared = ab.measure(
        _images(args.images), a, b, args.rounds, args.clients, args.duration, args.tiny_model
    )
    print(ab.summary(compared, a, b))
    return 0


def scenario_command(args: argparse.Namespace, argv: list[str]) -> int:
    """One scenario on its own: ceiling, backends, overload, frontend, workers or versus."""
    if args.command == "ceiling":
        numbers = ceiling.measure(args.duration)
    elif args.command == "backends":
        numbers = backends.measure(
            _images(args.images), args.rounds, args.clients, args.duration, args.offline_s
        )
    elif args.command == "overload":
        numbers = overload.measure(_images(args.images), seconds=args.duration)
    elif args.command == "frontend":
        numbers = frontend.measure(_images(args.images), args.duration, args.warmup)
    elif args.command == "workers":
        numbers = workers.measure(args.rounds, args.duration, args.model_rounds)
    else:
        numbers = versus.measure(_images(args.images), args.rounds, args.clients, args.duration)
    publish(args, argv, args.command, numbers)
    return 0 if numbers.get("server_alive", True) else 1


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=str(results.RESULTS_JSON), help="results.json to update")
    p.add_argument("--out", default=str(render.RESULTS_MD), help="RESULTS.md to render")
    p.add_argument(
        "--readme", default=str(render.README), help="README to render into ('' for none)"
    )


def _run_parser(commands: Any) -> None:
    r = commands.add_parser("run", help="load a running server: open or closed loop, a sweep")
    r.add_argument("--url", default="http://127.0.0.1:8080")
    r.add_argument(
        "--route", default="/v1/embed", help="/v1/embed, /v1/classify, /v1/search?k=10 or /v1/items"
    )
    r.add_argument("--mode", choices=("open", "closed"), default="closed")
    r.add_argument("--rates", default="10,50,100", help="open loop: requests/s per point")
    r.add_argument("--poisson", action="store_true", help="open loop: Poisson arrivals")
    r.add_argument("--concurrency", default="1,32", help="closed loop: clients per point")
    r.add_argument("--duration", type=float, default=20.0, help="seconds measured per point")
    r.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    r.add_argument("--processes", type=int, default=1, help="load-generator processes")
    r.add_argument("--slo-ms", type=float, default=1000.0, help="latency SLO for goodput")
    r.add_argument("--encoding", choices=ENCODINGS, default="raw")
    r.add_argument("--images-per-request", type=int, default=1)
    r.add_argument("--images", help="directory of images to send (default: sample photos)")
    r.add_argument("--json", help="write the points to this JSON file")
    r.add_argument("--plot", help="write a PNG plot of the sweep")


def _report_parser(commands: Any) -> None:
    rep = commands.add_parser("report", help="start servers, measure every scenario, render")
    rep.add_argument("--duration", type=float, default=10.0)
    rep.add_argument("--warmup", type=float, default=3.0)
    rep.add_argument("--slo-ms", type=float, default=1000.0)
    rep.add_argument("--rates", default="5,20,50,100,150,200,250")
    rep.add_argument("--clients", default="1,8,32,64")
    rep.add_argument("--images")
    rep.add_argument("--only", help="comma-separated sections to measure (default: all)")
    rep.add_argument("--limit-s", type=float, default=10.0, help="seconds of the limit loop")
    rep.add_argument("--low-load-s", type=float, default=20.0, help="seconds at 1 request/s")
    skips = (
        ("--search-items", int, 100_000, "index size for the search benchmark"),
        ("--bulk-images", int, 2000, "images for the bulk-indexing benchmark"),
        ("--engines-images", int, 2000, "images indexed by the local engine and by Ray"),
        ("--kinds-items", int, 100_000, "vectors for the index-kinds comparison"),
        ("--overload-s", float, 60.0, "seconds of 3x overload, over all its rounds"),
        ("--frontend-s", float, 20.0, "seconds per phase of the front-end scenario"),
        ("--workers-rounds", int, 4, "rounds per server of --workers 0, 1 and 2 side by side"),
        ("--versus-rounds", int, 5, "rounds per side of batchserve against (b)"),
        ("--backends-rounds", int, 5, "rounds per server of the backends side by side"),
        ("--replica-items", int, 100_000, "items of the shared catalog a new replica opens"),
        ("--cluster-s", float, 15.0, "seconds of search through nginx per replica count"),
        ("--writers-s", float, 5.0, "seconds per run of the catalog writers (1 and 2)"),
    )
    for flag, kind, default, text in skips:
        rep.add_argument(flag, type=kind, default=default, help=f"{text} (0: skip)")
    _outputs(rep)


def _scenario_parsers(commands: Any) -> None:
    c = commands.add_parser("ceiling", help="the generator against wrk")
    c.add_argument("--duration", type=float, default=10.0)
    o = commands.add_parser("overload", help="3x the saturation rate")
    o.add_argument("--duration", type=float, default=60.0)
    f = commands.add_parser("frontend", help="the HTTP front end with a near-zero-cost model")
    f.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    f.add_argument("--warmup", type=float, default=3.0)
    v = commands.add_parser("versus", help="batchserve and baseline (b) in alternating rounds")
    v.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    v.add_argument("--rounds", type=int, default=5, help="rounds per server")
    v.add_argument("--clients", type=int, default=32)
    b = commands.add_parser("backends", help="the model on each backend, and (b), side by side")
    b.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    b.add_argument("--rounds", type=int, default=5, help="rounds per server")
    b.add_argument("--clients", type=int, default=32)
    b.add_argument("--offline-s", type=float, default=10.0, help="seconds of each limit loop")
    for p in (c, o, f, v, b):
        p.add_argument("--images", help="directory of images to send (default: sample photos)")
        _outputs(p)
    w = commands.add_parser(
        "workers", help="--workers 2 against 1 and against one process, side by side"
    )
    w.add_argument("--rounds", type=int, default=4, help="rounds per server and phase")
    w.add_argument("--duration", type=float, default=6.0, help="seconds per round")
    w.add_argument(
        "--model-rounds", type=int, default=4, help="rounds with the built-in model (0: skip)"
    )
    _outputs(w)
    a = commands.add_parser("ab", help="two batchserve settings or checkouts side by side")
    a.add_argument("--a-flags", default="", help="serve flags of server A")
    a.add_argument("--b-flags", default="", help="serve flags of server B")
    a.add_argument("--a-code", help="checkout whose batchserve A runs (default: this one)")
    a.add_argument("--b-code", help="checkout whose batchserve B runs (default: this one)")
    a.add_argument("--rounds", type=int, default=4, help="rounds per server")
    a.add_argument("--clients", type=int, default=32)
    a.add_argument("--duration", type=float, default=8.0, help="seconds per round")
    a.add_argument("--tiny-model", action="store_true", help="the front end's near-zero-cost model")
    a.add_argument("--images", help="directory of images to send (default: sample photos)")
    q = commands.add_parser("retrieval", help="search quality: edited photos, hard distractors")
    q.add_argument("--quick", action="store_true", help="the small version the tests run")
    q.add_argument(
        "--throughput-rounds",
        type=int,
        default=4,
        help="rounds per embedding of /v1/embed (0: skip)",
    )
    q.add_argument(
        "--verify-rounds",
        type=int,
        default=3,
        help="rounds of verified and unverified searches on one server (0: skip)",
    )
    _outputs(q)
    precise = commands.add_parser("precision", help="OpenVINO in bfloat16 against float32")
    precise.add_argument("--quick", action="store_true", help="the retrieval test's small set")
    _outputs(precise)
    commands.add_parser("device", help="the GPU path end to end (python -m bench device -h)")
    rendering = commands.add_parser("render", help="RESULTS.md and the README from results.json")
    rendering.add_argument("--plots", action="store_true", help="redraw the plots too")
    _outputs(rendering)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _run_parser(commands)
    _report_parser(commands)
    _scenario_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run_command(args)
    if args.command == "render":
        return render_command(args)
    if args.command == "report":
        return report_command(args, argv)
    if args.command == "ab":
        return ab_command(args)
    if args.command == "retrieval":
        return retrieval_command(args, argv)
    if args.command == "precision":
        publish(args, argv, "precision", precision.measure(quick=args.quick))
        return 0
    return scenario_command(args, argv)

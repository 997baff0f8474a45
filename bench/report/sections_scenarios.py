"""Sections of RESULTS.md for what is measured on its own: transfer learning (recorded by
hand), overload, the HTTP front end, and batchserve against baseline (b) side by side."""

from __future__ import annotations

from typing import Any

from bench.report.sections import POOLING_MODEL, errors_text

Section = dict[str, Any]
Lines = list[str]


def train(s: Section) -> Lines:
    low, high = s["frozen_images_per_s"]
    accuracy = " / ".join(f"{v:.3f}" for v in s["val_accuracy"].values())
    return [
        "## Transfer learning (`batchserve train`)",
        "",
        f"- Date: {s['date']}; machine: {s['machine']}.",
        f"- Data: `{s['data_command']}`: {s['classes']} classes (crops of the brick, grass and "
        "gravel photos scikit-image ships; random stripes; random checkers) of "
        f"{s['per_class']} images each, plus one unreadable file; held-out set: the same with "
        f"{s['held_out_per_class']} per class and seed {s['held_out_seed']}.",
        f"- Train: `{s['command']}` (base: the built-in model, 160x160).",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| decode of {s['decode_images']} images (first pass, cached) | {s['decode_s']} s |",
        f"| epoch 1 (frozen; also builds the graph) | {s['epoch1_s']} s, "
        f"{s['epoch1_images_per_s']} images/s |",
        f"| later frozen epochs | {s['frozen_epoch_s']} s, {low}-{high} images/s |",
        f"| fine-tuning epochs (top {s['fine_tune_layers']} weighted layers, batch norm "
        f"frozen) | {s['fine_tune_first_s']} s first, then {s['fine_tune_later_s']} s |",
        f"| validation accuracy ({s['val_images']} images) after epoch "
        f"{' / '.join(s['val_accuracy'])} | {accuracy} |",
        f"| held-out accuracy through `POST /v1/classify` ({s['held_out_images']} images) | "
        f"{s['held_out_correct']} / {s['held_out_images']} |",
        f"| skipped unreadable files | {s['skipped']} of {s['unreadable']} |",
        "",
        "Serving the exported model against the built-in one, each alone on the machine:",
        f"`{s['serve_command']}`.",
        "",
        "| model | images/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *[
            f"| {m['model']} | {m['images_per_s']} | {m['p50_ms']} | {m['p99_ms']} |"
            for m in s["serving"]
        ],
        "",
    ]


def _overload_method(f: Section, x: str, rounds: list[dict[str, Any]]) -> str:
    """How the overload figures were taken: each round against the peaks on either side of
    it (its rounds carry both), or, as first measured, against the peak before it."""
    count = len(rounds) or 1
    seconds = f"{f['seconds'] / count:g}"
    flood = (
        f"a flood: {f.get('flood_clients', 0)} clients that send again the moment they are "
        f"answered, 503 or not ({f.get('flood_tool', '-')}), for half as long"
    )
    limits = (
        f"Request deadline {f['deadline_ms']:.0f} ms (`--timeout-s`), `max_queue` 512 (default)."
    )
    if any("peaks_per_s" in r for r in rounds):
        return (
            f"The peak (closed loop, 64 clients), then {count} rounds on one server, each: an "
            f"open loop offering {x} the last peak for {seconds} s from 1 generator process "
            f"on the same cores, {flood}, and the peak again. {limits} Each round is taken "
            "against the mean of the peaks on either side of it (this machine's speed drifts "
            "by tens of percent within a minute); the median ratio is quoted, and the rest of "
            "the table is the round with the median overload ratio."
        )
    return (
        f"{count} rounds on one server, each: the peak (closed loop, 64 clients), then an "
        f"open loop offering {x} that peak for {seconds} s from 1 generator process on the "
        f"same cores, then {flood}. {limits} Ratios are taken within their round (the "
        "machine's speed drifts); the median is quoted, and the rest of the table is the "
        "round with the median overload ratio."
    )


def overload(f: Section) -> Lines:
    x = f"{f['factor']:g}x"
    rounds = f.get("rounds", [])
    lines = [
        f"## Overload: {x} the saturation rate, then a flood of "
        f"{f.get('flood_clients', 0)} clients",
        "",
        _overload_method(f, x, rounds),
        "",
        "| figure | value |",
        "|---|---:|",
        f"| goodput at {x} (200 within the deadline), median of the rounds | "
        f"**{100 * f['goodput_of_peak']:.0f}% of the peak** |",
    ]
    if "flood_goodput_of_peak" in f:
        lines.append(
            f"| goodput in the flood, median of the rounds | "
            f"**{100 * f['flood_goodput_of_peak']:.0f}% of the peak** |"
        )
    lines += [
        f"| peak / goodput at {x} | {f['peak_per_s']} / {f['goodput_per_s']} images/s |",
        f"| accepted: p50 / p99 / max ms | {f['ok_p50_ms']} / {f['ok_p99_ms']} / "
        f"{f['ok_max_ms']} |",
        f"| rejected (503) per second | {f['rejected_per_s']} |",
        f"| rejected: p50 / p99 ms (from the generator) | {f['rejected_p50_ms']} / "
        f"{f['rejected_p99_ms']} |",
        f"| probe 503s carrying Retry-After | {f['probe_503s_with_retry_after']} of "
        f"{f['probe_503s']} |",
        f"| probe 503s (one client beside the load): p50 / max ms | "
        f"{f.get('probe_503_p50_ms', '-')} / {f.get('probe_503_max_ms', '-')} |",
        f"| other statuses | {f['other_statuses'] or 'none'} |",
        f"| resident memory: start / max / end MiB | {f['rss_start_mib']} / "
        f"{f['rss_max_mib']} / {f['rss_end_mib']} |",
        f"| server alive afterwards | {'yes' if f['server_alive'] else 'NO'} |",
    ]
    if "model_ms_per_image" in f:
        lines += [
            f"| model time per image: at the peak / at {x} ms | "
            f"{f['peak_model_ms_per_image']} / {f['model_ms_per_image']} |",
            f"| model busy: at the peak / at {x} | {100 * f['peak_model_busy']:.0f}% / "
            f"{100 * f['model_busy']:.0f}% |",
        ]
    if "flood_ok_per_s" in f:
        lines += [
            f"| flood: answered 200 / 503 per second (others) | {f['flood_ok_per_s']} / "
            f"{f['flood_refused_per_s']} ({f['flood_other_per_s'] or 'none'}) |",
            f"| flood: 503s held back per second (`--refusals-per-image`) | "
            f"{f['flood_held_per_s']} |",
        ]
    lines.append("")
    if rounds:
        lines += [
            f"| round | peak/s | goodput at {x}/s | ratio | 503 p99 ms | probe 503 max ms | "
            "flood 200/s | flood ratio | 503s held/s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {i} | {r['peak_per_s']} | {r['goodput_per_s']} | {r['goodput_of_peak']} "
                f"| {r['rejected_p99_ms']} | {r.get('probe_503_max_ms', '-')} | "
                f"{r.get('flood_ok_per_s', '-')} | "
                f"{r.get('flood_goodput_of_peak', '-')} | {r.get('flood_held_per_s', '-')} |"
                for i, r in enumerate(rounds, 1)
            ),
            "",
        ]
    return lines


def _phase_row(name: str, p: Section) -> str:
    errors = errors_text(p["errors"])
    return (
        f"| {name} | {p['images_per_s']} | {p['mean_batch_size']} | {p['p50_ms']} | "
        f"{p['p99_ms']} | {p['reactor_cpu_ms_per_request']:.3f} | "
        f"{p['others_cpu_ms_per_request']:.3f} | {errors} |"
    )


def _probe_row(name: str, p: Section) -> str:
    errors = errors_text(p["errors"])
    return f"| {name} | {p['probes']} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} | {errors} |"


def frontend(s: Section) -> Lines:
    h = s["healthz"]
    return [
        "## The HTTP front end (`python -m bench frontend`)",
        "",
        f"A model that costs next to nothing ({s.get('tiny_model', POOLING_MODEL)}, built as a "
        ".keras file and served with `--model`), so that "
        f"reading, parsing and answering requests is what limits. {s['clients']} clients, "
        f"closed loop, {s['seconds']:g} s after {s['warmup_s']:g} s of warm-up, one 640x480 "
        f"JPEG (~{s['image_kib']} KiB) per request. CPU per request from /proc: the main "
        f"thread (the reactor), and {s['raw']['others_are']}.",
        "",
        "| body | images/s | mean batch | p50 ms | p99 ms | reactor CPU ms/request "
        "| other threads' CPU ms/request | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        _phase_row("raw (`image/jpeg`)", s["raw"]),
        _phase_row("multipart (`image` field)", s["multipart"]),
        "",
        f"Multipart against raw: **{s['multipart_of_raw']:.0%}** of the images/s.",
        "",
        f"`GET /healthz` (open loop, 20/s) idle, then while {h['uploaders']} clients upload "
        f"~{h['upload_mib']} MiB multipart bodies of {h['images_per_upload']} images in a loop "
        f"({h['uploads_per_s']} uploads/s done):",
        "",
        "| /healthz | probes | p50 ms | p99 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---|",
        _probe_row("idle", h["idle"]),
        _probe_row("during the uploads", h["during_uploads"]),
        "",
    ]


#: How each side of ``versus`` is named, and the runtime it runs the model on.
VERSUS_SIDES = {
    "batchserve": "batchserve (TensorFlow)",
    "openvino": "batchserve, `--backend openvino`",
    "baseline": "(b) Flask + a compiled `tf.function` (TensorFlow)",
    "bentoml": "(c) BentoML 1.4, batchable API (TensorFlow)",
}


def versus(s: Section) -> Lines:
    if "sides" not in s:
        return versus_two(s)
    return [
        "## batchserve and its peers side by side",
        "",
        f"All servers up at once; {s['clients']} clients, closed loop, on each in turn: "
        f"{s['rounds']} rounds each of {s['seconds']:g} s (after {s['warmup_s']:g} s of "
        "warm-up), the order turned each round so that drift of the machine's speed hits all "
        "alike. The same built-in model everywhere; the runtime in brackets: TensorFlow on "
        "every side shows what batching alone gives, OpenVINO what a user gains by switching.",
        "",
        "| server | images/s per round | median images/s | p50 ms | p99 ms (all rounds) |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {VERSUS_SIDES.get(name, name)} | "
            f"{', '.join(f'{v:g}' for v in side['images_per_s'])} | "
            f"{side['median_images_per_s']} | {side['p50_ms']} | {side['p99_ms']} |"
            for name, side in s["sides"].items()
        ],
        "",
        *[
            f"- {VERSUS_SIDES.get(a, a)} / {VERSUS_SIDES.get(b, b)}, median of the per-round "
            f"ratios: **{s['median_ratios'][pair]:.2f}x** at p99 "
            f"{s['sides'][a]['p99_ms']:.0f} against {s['sides'][b]['p99_ms']:.0f} ms (rounds: "
            f"{', '.join(f'{r:.2f}' for r in s['ratios_by_pair'][pair])})."
            for pair in s["median_ratios"]
            for a, b in [pair.split("/")]
        ],
        "",
    ]


def versus_two(s: Section) -> Lines:
    """A ``versus`` of two sides, as measured before the peers joined."""
    ours, theirs = s["batchserve"], s["baseline"]
    rounds = ", ".join(f"{r:.2f}" for r in s["ratios"])
    return [
        f"## batchserve and {s['baseline_name']} side by side",
        "",
        f"Both servers up at once; {s['clients']} clients, closed loop, on each in turn: "
        f"{s['rounds']} rounds each of {s['seconds']:g} s (after {s['warmup_s']:g} s of "
        "warm-up), alternating A/B so that drift of the machine's speed hits both alike.",
        "",
        "| server | images/s per round | median images/s | p50 ms | p99 ms (all rounds) |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {name} | {', '.join(f'{v:g}' for v in side['images_per_s'])} | "
            f"{side['median_images_per_s']} | {side['p50_ms']} | {side['p99_ms']} |"
            for name, side in (("batchserve", ours), (s["baseline_name"], theirs))
        ],
        "",
        f"batchserve / (b), median of the per-pair ratios: **{s['median_ratio']:.2f}x** "
        f"(pairs: {rounds}).",
        "",
    ]


def replica_start(s: Section) -> Lines:
    return [
        f"## A new replica on a shared PostgreSQL catalog of {s['items']:,} items",
        "",
        "A throwaway PostgreSQL 15 on the same machine; 1280-float vectors (the built-in "
        "model's) written through the catalog in batches of 1,000; the index opened as a "
        "replica does at start (flat index; the model's own load, ~12 s, not counted); "
        "`bench/scenarios/replica_start.py`.",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| write {s['items']:,} items ({s['writes_per_s']:,} items/s) | {s['write_s']} |",
        f"| a new replica: every vector read from PostgreSQL, index built | {s['new_replica_s']} |",
        f"| a restart: its snapshot, then the {s['later_changes']:,} changes made since | "
        f"{s['restart_s']} |",
        "",
    ]


def writers(s: Section) -> Lines:
    rows = []
    for batch in (32, 1):
        b = s[f"batch_{batch}"]
        rows.append(
            f"| {batch} | {b['one_writer_per_s']:,} | {b['two_writers_per_s']:,} | "
            f"{b['two_over_one']} | {b['two_writers_own_locks_per_s']:,} | "
            f"{b['own_locks_over_shared']} |"
        )
    return [
        "## Writes from two replicas at once on a shared PostgreSQL catalog",
        "",
        "A throwaway PostgreSQL on the same machine takes upserts from 1, then 2 writer "
        "processes (each a replica's catalog), each item 1280 floats and a "
        f"{s['thumbnail_bytes'] // 1024} KB thumbnail, {s['seconds']:g} s a run, "
        f"{s['rounds']} alternating rounds, ratios within a round, medians. Each write "
        "transaction holds one global lock from appending to the change log to its commit "
        "(the log's order is commit order); the last columns give each writer a lock of its "
        "own (unsafe, measurement only): what two writers would gain without the shared "
        "lock. `bench/scenarios/writers.py`.",
        "",
        "| items per upsert | 1 writer items/s | 2 writers items/s | 2 / 1 | "
        "2 writers, own locks | own / shared |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def cluster(s: Section) -> Lines:
    one, two = s["search"]["1"], s["search"]["2"]
    return [
        "## Replicas behind nginx on one shared PostgreSQL catalog (`deploy/local-cluster`)",
        "",
        f"Convergence: {s['writes']} writes at {s['write_rate']:g}/s through replica 1, each "
        "then read on replica 2 until found (polled every 2 ms): "
        f"**p50 {s['convergence_p50_ms']} ms, p99 {s['convergence_p99_ms']} ms** (max "
        f"{s['convergence_max_ms']} ms) from the acknowledgement. Replicas follow the "
        "catalog's change log, woken by LISTEN/NOTIFY.",
        "",
        f"`POST /v1/search?k=10` through nginx, {s['clients']} clients, {s['seconds']:g} s. "
        "Both replicas share this machine's 2 cores, so a second replica adds a process "
        "competing for them, not capacity: the figure is what nginx and the replicas cost "
        "together, and on separate machines the second would add its own cores.",
        "",
        "| replicas | images/s | p50 ms | p99 ms | errors |",
        "|---:|---:|---:|---:|---|",
        f"| 1 | {one['images_per_s']} | {one['p50_ms']} | {one['p99_ms']} | "
        f"{errors_text(one['errors'])} |",
        f"| 2 | {two['images_per_s']} | {two['p50_ms']} | {two['p99_ms']} | "
        f"{errors_text(two['errors'])} |",
        "",
        *_restart_lines(s.get("restart")),
    ]


def _restart_lines(r: Section | None) -> Lines:
    if r is None:
        return []
    return [
        f"A rolling restart under load: `deploy/local-cluster restart` ({r['restart_s']} s, "
        f"the two replicas one by one) while 8 clients search through nginx for "
        f"{r['load_s']:g} s: **{r['failed']} of {r['requests']} requests failed** "
        f"(statuses {r['statuses']}).",
        "",
    ]

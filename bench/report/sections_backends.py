"""The section of RESULTS.md for the model's backends side by side (``python -m bench
backends``)."""

from __future__ import annotations

from typing import Any

Section = dict[str, Any]
Lines = list[str]

#: How each side of the comparison is named in the table.
NAMES = {
    "openvino": "batchserve, `--backend openvino`",
    "tensorflow": "batchserve, `--backend tensorflow`",
    "jax": "batchserve, `--backend jax`",
    "torch": "batchserve, `--backend torch`",
    "flask": "(b) Flask + a compiled `tf.function`",
}


def backends(s: Section) -> Lines:
    offline, sides = s["offline"], s["sides"]
    return [
        "## The model's backends side by side",
        "",
        "Each backend with no HTTP: the built-in model alone on random pixels, and the limit "
        "(decoding the sample photos on one or two threads ahead of the model, the better "
        "of the two, batch 32).",
        "",
        "| backend | model, batch 1 (images/s) | model, batch 32 | limit |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {o['batch_images_per_s']['1']} | {o['batch_images_per_s']['32']} | "
            f"{o['limit_per_s']} |"
            for name, o in offline.items()
        ],
        "",
        f"Then a server on each and {s['baseline_name']} (a worker per core), all up at once; "
        f"{s['clients']} clients, closed loop, on each in turn, {s['rounds']} rounds of "
        f"{s['seconds']:g} s (after 2 s of warm-up).",
        "",
        "| server | images/s per round | median images/s | p50 ms | p99 ms (all rounds) |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {NAMES.get(name, name)} | {', '.join(f'{v:g}' for v in side['images_per_s'])} | "
            f"{side['median_images_per_s']} | {side['p50_ms']} | {side['p99_ms']} |"
            for name, side in sides.items()
        ],
        "",
        *[
            f"- {pair.replace('/', ' / ')}, median of the per-round ratios: **{median:.2f}x** "
            f"(rounds: {', '.join(f'{r:.2f}' for r in s['ratios'][pair])})."
            for pair, median in s["median_ratios"].items()
        ],
        "",
    ]


def device(s: Section) -> Lines:
    """The GPU path end to end (``python -m bench device``)."""
    search = s["search"]
    limit = s["limit"]
    return [
        f"## The GPU path end to end: {s['device']}",
        "",
        f"The built-in model on `--backend {s['backend']}`"
        + (" (a quick run: fewer, shorter points)" if s.get("quick") else "")
        + ". The model alone on random pixels (images/s by batch size): "
        + ", ".join(f"{size}: {rate:g}" for size, rate in s["model_images_per_s"].items())
        + f". One decode thread alone: {s['decode_per_s_per_thread']:g} images/s. FAISS, "
        f"flat, {search['items']:,} items of {search['dim']}: "
        + ", ".join(f"{ms:g} ms for {n} queries" for n, ms in search["ms_per_call"].items())
        + ".",
        "",
        f"A server (`{' '.join(s['server']['flags'])}`) under closed-loop load from "
        f"{s['server']['generators']} generator processes, {s['server']['seconds']:g} s a point:",
        "",
        "| images per request | clients | images/s | p50 ms | p99 ms | mean batch | GPU % "
        "| server CPU % | reactor CPU % | generator CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {p['images_per_request']} | {p['clients']} | {p['images_per_s']:g} | "
            f"{p['p50_ms']:g} | {p['p99_ms']:g} | {p['mean_batch']:g} | "
            f"{'n/a' if p['gpu_util_pct'] is None else p['gpu_util_pct']} | "
            f"{p['server_cpu_pct']:g} | {p['reactor_cpu_pct']:g} | {p['generator_cpu_pct']:g} |"
            for p in s["points"]
        ],
        "",
        f"At the best point ({s['best']['images_per_s']:g} images/s) the part nearest its "
        f"limit was **{limit['nearest']}** (share of each part's own limit: "
        + ", ".join(f"{name} {share:.2f}" for name, share in limit["shares"].items())
        + ").",
        "",
        *_device_edges(s.get("edges", [])),
    ]


def _device_edges(edges: list[Section]) -> Lines:
    """The same server with edge processes (``--workers N``), one image per request."""
    if not edges:
        return []
    return [
        "With edge processes (`--workers N`), one image per request at "
        f"{edges[0]['clients']} clients (CPU in % of one core; the edges' reactors are their "
        "main threads):",
        "",
        "| edges | images/s | p99 ms | mean batch | GPU % | core CPU % | edges' CPU % "
        "| edges' reactors CPU % | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *[
            f"| {e['workers']} | {e['images_per_s']:g} | {e['p99_ms']:g} | {e['mean_batch']:g} | "
            f"{'n/a' if e['gpu_util_pct'] is None else e['gpu_util_pct']} | "
            f"{e['core_cpu_pct']:g} | {e['edges_cpu_pct']:g} | {e['edge_reactors_cpu_pct']:g} | "
            f"{', '.join(f'{c}: {n}' for c, n in e['errors'].items()) or 'none'} |"
            for e in edges
        ],
        "",
    ]


def precision(s: Section) -> Lines:
    """OpenVINO in bfloat16 against float32 (``python -m bench precision``)."""
    f32, bf16 = s["precisions"]["f32"], s["precisions"]["bf16"]
    kept = bf16["top1"] >= f32["top1"]
    return [
        "## OpenVINO in bfloat16",
        "",
        f"The built-in model on `--backend openvino`, the server's decoding: {s['queries']:,} "
        f"edited photos searched among {s['catalog']:,} catalog images (the retrieval "
        "benchmark's), embedded at each `--precision`; the model's own images/s, the "
        f"precisions in turn, the median of {s.get('rounds', 1)} rounds.",
        "",
        "| precision | found first | in the top 5 | model, batch 1 (images/s) | batch 32 |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {name} | {p['top1']:.3f} | {p['recall5']:.3f} | {p['images_per_s']['1']} | "
            f"{p['images_per_s']['32']} |"
            for name, p in s["precisions"].items()
        ],
        "",
        f"Embeddings against float32's: min cosine {s['min_cosine']}, mean "
        f"{s['mean_cosine']}. "
        + (
            "bfloat16 finds as many originals first."
            if kept
            else f"bfloat16 finds fewer originals first ({bf16['top1']:.3f} against "
            f"{f32['top1']:.3f}): float32 stays the default."
        ),
        "",
    ]

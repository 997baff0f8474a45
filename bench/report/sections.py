"""The sections of RESULTS.md, each rendered from its results.json section alone (plus, for
ratios, the sections it is compared with). Measuring lives in the scenario modules."""

from __future__ import annotations

from typing import Any

from bench.scenarios.embed import BASELINES

Section = dict[str, Any]
Lines = list[str]

HEADER = [
    "| server | load | achieved/s | goodput/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
    "| mean batch | errors |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
]


def load_text(p: Section) -> str:
    """``20/s`` for an open-loop point, ``32 clients`` for a closed-loop one."""
    if p["offered_per_s"] is not None:
        return f"{p['offered_per_s']:g}/s"
    return f"{p['concurrency']} clients"


def errors_text(errors: dict[str, int]) -> str:
    """A point's errors by status as a table cell: "503: 4, 0: 1", or "none"."""
    return ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"


def row(name: str, p: Section) -> str:
    server = p.get("server", {})
    errors = errors_text(p["errors"])
    return (
        f"| {name} | {load_text(p)} | {p['achieved_per_s']} | {p['goodput_per_s']} | "
        f"{p['p50_ms']} | {p['p90_ms']} | {p['p99_ms']} | {p['p999_ms']} | "
        f"{server.get('mean_batch_size', '-')} | {errors} |"
    )


def ratio(p: Section, q: Section) -> float:
    return float(p["images_per_s"]) / max(float(q["images_per_s"]), 1e-9)


def saturation(servers: Section) -> Section:
    """batchserve's best closed-loop point: the most images/s any client count sustained
    (closed loop keeps the server busy without piling up an unbounded queue)."""
    closed = [p for p in servers["batchserve"]["points"] if p["concurrency"]]
    return dict(max(closed, key=lambda p: p["images_per_s"]))


def at_clients(server: Section, clients: int = 32) -> Section:
    """The closed-loop point of ``server`` at ``clients`` clients."""
    return dict(next(p for p in server["points"] if p["concurrency"] == clients))


def limit(s: Section) -> Lines:
    return [
        "## 1. The limit (no HTTP)",
        "",
        "The model alone on pre-decoded uint8 batches:",
        "",
        "| batch size | images/s |",
        "|---:|---:|",
        *[f"| {size} | {rate:.0f} |" for size, rate in s["batch_images_per_s"].items()],
        "",
        f"JPEG decode + resize to 160x160 (draft mode), one thread: {s['decode_per_s']:.0f} "
        "images/s.",
        "",
        "**The limit**: decoding (one thread, ahead of the model) and embedding the same "
        f"JPEGs at batch 32 in one loop: **{s['limit_per_s']:.0f} images/s**.",
        "",
    ]


def saturation_section(s: Section, limit_s: Section | None) -> Lines:
    servers = s["servers"]
    best = saturation(servers)
    share = ""
    if limit_s:
        share = f" (**{best['images_per_s'] / limit_s['limit_per_s']:.0%} of the limit**)"
    return [
        "## 2. batchserve at saturation",
        "",
        f"Best point: {best['images_per_s']} images/s{share}, p50 "
        f"{best['p50_ms']} ms, p99 {best['p99_ms']} ms ({load_text(best)}). Start to ready: "
        f"{servers['batchserve']['ready_s']:.1f} s.",
        "",
        *HEADER,
        *[row("batchserve", p) for p in servers["batchserve"]["points"]],
        "",
        "![latency against throughput](embed_sweep.png)",
        "",
        "![batch sizes per point](embed_batches.png)",
        "",
    ]


def batching_off(s: Section) -> Lines:
    return [
        "## 3. Batching off (`--max-batch-size 1`) against on",
        "",
        *HEADER,
        *[row("batching off", p) for p in s["servers"]["batching off"]["points"]],
        "",
    ]


def alternatives(s: Section) -> Lines:
    servers = s["servers"]
    at32 = {name: at_clients(server) for name, server in servers.items()}
    on, a, b = (at32[name] for name in ("batchserve", *BASELINES))
    return [
        "## 4. The usual alternatives, same model, gunicorn with one worker per core",
        "",
        *HEADER,
        *[row(name, p) for name in BASELINES for p in servers[name]["points"]],
        "",
        "At 32 concurrent clients (closed loop):",
        "",
        "| server | images/s | p99 ms | resident memory |",
        "|---|---:|---:|---:|",
        *[
            f"| {name} | {p['images_per_s']} | {p['p99_ms']} | {servers[name]['rss_mib']} MiB |"
            for name, p in at32.items()
        ],
        "",
        f"batchserve / (a): {ratio(on, a):.1f}x; batchserve / (b): {ratio(on, b):.1f}x.",
        "",
    ]


def low_load_section(low: Section, single_ms: float, paced_ms: float, seconds: float) -> Lines:
    """Section 5: p50 at 1 request/s against the model's own time, and where the rest goes."""
    server = low.get("server", {})
    inside = server.get("mean_request_ms", 0.0)
    stages = (
        server.get("mean_decode_ms", 0.0)
        + server.get("mean_queue_wait_ms", 0.0)
        + server.get("mean_inference_ms", 0.0)
    )
    return [
        "## 5. Low load",
        "",
        f"Open loop at 1 request/s for {seconds:g} s: p50 {low['p50_ms']} ms, p99 "
        f"{low['p99_ms']} ms. The model alone at batch 1: {single_ms:.1f} ms called back to "
        f"back, {paced_ms:.1f} ms (p50) called once a second as here. p50 minus the paced "
        f"model: **{low['p50_ms'] - paced_ms:.1f} ms**; minus the back-to-back model: "
        f"{low['p50_ms'] - single_ms:.1f} ms.",
        "",
        "Where a request's time goes (means, from the server's /metrics):",
        "",
        "| stage | ms |",
        "|---|---:|",
        f"| decode (decode pool) | {server.get('mean_decode_ms', 0.0):.2f} |",
        f"| queue wait (Batcher) | {server.get('mean_queue_wait_ms', 0.0):.2f} |",
        f"| inference (batch of 1) | {server.get('mean_inference_ms', 0.0):.2f} |",
        f"| rest inside the handler (thread hand-offs, parsing, JSON) | {inside - stages:.2f} |",
        f"| handler total | {inside:.2f} |",
        f"| outside the handler (TCP, HTTP framing, the generator), p50 minus total | "
        f"{low['p50_ms'] - inside:.2f} |",
        "",
    ]


def index_open(o: Section) -> str:
    """How an index opened: ``1.9 s (100000 items, flat, snapshot 100000 + 0 changes
    replayed)``."""
    how = (
        "rebuilt from the catalog"
        if o["rebuilt"]
        else f"snapshot {o['snapshot_seq']} + {o['replayed']} changes replayed"
    )
    return f"{o['seconds']:.1f} s ({o['size']} items, {o['kind']}, {how})"


def search(s: Section) -> Lines:
    n = s["items"]
    kinds = (("flat", s["flat"]), ("hnsw", s["hnsw"]))
    adds = s["adds"]
    return [
        f"## 6. `POST /v1/search` (k=10) on {n} items, flat and hnsw",
        "",
        f"The index holds {n} synthetic clustered unit vectors stored as the built-in "
        f"model's embeddings (filled in {s['fill_s']:.0f} s by `bench/harness/fill.py`); "
        "queries are the photos above, embedded by the model.",
        "",
        *HEADER,
        *[row(kind, p) for kind, points in kinds for p in points],
        "",
        "| index | load | mean inference ms/batch | mean search ms/batch |",
        "|---|---|---:|---:|",
        *[
            f"| {kind} | {load_text(p)} | {p.get('server', {}).get('mean_inference_ms')} | "
            f"{p.get('server', {}).get('mean_search_ms')} |"
            for kind, points in kinds
            for p in points
        ],
        "",
        "The HNSW index (M=32, efSearch=256) was built from the catalog at start in "
        f"{index_open(s['hnsw_build'])}.",
        "",
        "What search adds to a request (hnsw, 1 client, closed loop, /v1/embed and "
        "/v1/search?k=10 alternated on the same server, 3 rounds each): p50 "
        f"{adds['embed_p50_ms']:.1f} ms for embed, {adds['search_p50_ms']:.1f} ms for "
        f"search: **search adds {adds['adds_ms']:.1f} ms** (the index stage alone: "
        f"{adds['search_stage_ms']:.2f} ms per single-query batch).",
        "",
        "![search latency](search_sweep.png)",
        "",
        f"Restart with {n} items: index open from the snapshot in "
        f"{index_open(s['snapshot_open'])}; whole start to ready {s['restart_ready_s']:.1f} s "
        "(model load and warm-up included). Without a snapshot (rebuilt from the catalog): "
        f"{index_open(s['rebuild_open'])}.",
        "",
    ]


def bulk(s: Section) -> Lines:
    failed = f", {s['failed']} failed" if s["failed"] else ""
    return [
        "## Bulk indexing (`batchserve index DIR`)",
        "",
        f"{s['images']} camera-sized JPEGs (640x480) in 8 class folders, decoded on a "
        "thread pool while the model embeds, one catalog transaction per batch of 32: "
        f"{s['indexed']} images in {s['seconds']:.1f} s{failed}: "
        f"**{s['images_per_s']:.0f} images/s** (model load excluded).",
        "",
    ]


def kinds(s: Section) -> Lines:
    return [
        f"## Index kinds against flat ({s['items']} x {s['dim']}, default parameters)",
        "",
        "Synthetic clustered unit vectors (100 points per cluster, isotropic noise: a hard "
        "case, where neighbours within a cluster are nearly equidistant); 256 queries from "
        "the same clusters; `bench/scenarios/kinds.py`.",
        "",
        "| kind | build s | ms/query alone | ms/query in batches of 32 | recall@10 |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {r['kind']} | {r['build_s']:.1f} | {r['ms_per_query_alone']:.2f} | "
            f"{r['ms_per_query_batch32']:.2f} | {r['recall_at_10']:.3f} |"
            for r in s["rows"]
        ],
        "",
    ]


def ceiling(s: Section) -> Lines:
    duration, connections = s["duration_s"], s["connections"]
    wrk = (
        f"| `wrk -t1 -c{connections} -d{duration:g}s` | {s['wrk_per_s']:,.0f} | - | - |"
        if s["wrk_per_s"] is not None
        else "| wrk (not installed: `apt-get install wrk`) | - | - | - |"
    )
    ours = [
        f"| `python -m bench run --route /healthz --mode closed --concurrency {connections} "
        f"--processes {g['processes']}` | {g['achieved_per_s']:,.0f} | {g['p50_ms']} | "
        f"{g['p99_ms']} |"
        for g in s["generator"]
    ]
    return [
        "## 7. The load generator's own ceiling",
        "",
        f"A trivial endpoint of the same server, {connections} connections; server and "
        "generator share the machine's cores, so the generator's own CPU is taken from the "
        "server.",
        "",
        "| generator | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        wrk,
        *ours,
        "",
    ]


#: The front end's near-zero-cost model before its results named it (bench/scenarios/
#: frontend.py: ``MODEL``, now one that reads 8x8 pixels and costs less).
POOLING_MODEL = "uint8 160x160x3 -> Rescaling -> global average pooling -> Dense(32)"

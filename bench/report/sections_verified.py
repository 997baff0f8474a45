"""The verified-search part of the retrieval section (``python -m bench retrieval``): the
default embedding's shortlist re-ranked by local features, per edit, and copy detection
with and without verification, at each inlier threshold."""

from __future__ import annotations

from typing import Any

Section = dict[str, Any]
Lines = list[str]


def verified(s: Section, default: str) -> Lines:
    v = s.get("verified")
    if not v:
        return []
    lists = v["shortlists"]
    first = next(iter(lists))
    before = s["methods"][default]["per_edit"]
    per_edit = [
        f"| {edit} | {before[edit]['top1']:.2f} | "
        + " | ".join(f"{lists[k]['per_edit_top1'][edit]:.2f}" for k in lists)
        + " |"
        for edit in s["edits"]
    ]
    b = v["bytes_per_item"]
    return [
        "### Verified by local features",
        "",
        f"Each query's top {first} by the default embedding re-ranked by geometric "
        "verification (`batchserve/models/verification.py`): ORB keypoints of each image in "
        "a 480-pixel frame, matched one to one, a similarity transform fitted by RANSAC; a "
        f"candidate is verified with {v['min_inliers']} distinct inliers or more, and verified "
        "candidates come first, those that hold more of the query first, then by inliers. "
        f"Local features: {b['mean'] / 1024:.1f} KiB an item on average, "
        f"{b['max'] / 1024:.1f} KiB at most; {v['extract_ms_per_item']:.1f} ms to find an "
        f"item's, {v['extract_ms_per_query']:.1f} ms a query's, {v['verify_ms_per_candidate']:.2f} "
        "ms to verify one candidate (one thread). `bench/scenarios/verified.py`.",
        "",
        "| edit | unverified | " + " | ".join(f"verified, top {k}" for k in lists) + " |",
        "|---|---:" + "|---:" * len(lists) + "|",
        f"| **all** | {s['methods'][default]['overall']['top1']:.3f} | "
        + " | ".join(f"{lists[k]['top1']:.3f}" for k in lists)
        + " |",
        *per_edit,
        "",
        *_copies(v, first),
        *_cost(s.get("verify_cost")),
    ]


def _cost(c: Section | None) -> Lines:
    """What a verified search costs on the real server, against an unverified one."""
    if not c:
        return []
    plain, checked = c["unverified"], c["verified"]
    return [
        f"On the real server (default settings, {c['items']} items with their local features, "
        f"the embedding's top {c['verify_k']} verified; median of {c['rounds']} alternating "
        "rounds; `bench/scenarios/verify_cost.py`):",
        "",
        "| `POST /v1/search?k=10` | p50 at 1 client (ms) | p99 at 1 client (ms) | images/s at 32 "
        "clients |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {f['p50_ms']} | {f['p99_ms']} | {f['images_per_s']} |"
            for name, f in (("unverified", plain), ("`verify=true`", checked))
        ),
        f"| verified / unverified | {c['p50_ratio']}x | | {c['throughput_ratio']}x |",
        "",
    ]


def _copies(v: Section, first: str) -> Lines:
    u = v["unverified"]
    rows = [
        f"| unverified | {u['top1']:.3f} | {u['micro_ap']:.3f} | {u['recall_at_1pct_fp']:.3f} | | |"
    ]
    rows.append(_row(f"top {first}, verified first by inliers alone", v["by_inliers_alone"], v))
    rows += [_row(f"top {first}, {t} inliers to verify", f, v) for t, f in v["thresholds"].items()]
    return [
        f"Copy detection: the {v['non_copy_queries']} copy queries and as many non-copy queries "
        "(generated scenes that are not in the catalog), each answered by its first match; "
        "confidence 1 + inliers for a verified match, else the embedding's score. µAP: every "
        "answer in one list by confidence, right when it is the query's original; recall at 1% "
        "false positives: the copy queries answered right above the confidence that 1% of the "
        "non-copy queries reach.",
        "",
        "| search | top-1 | µAP | recall at 1% FP | non-copies verified | copies verified to "
        "the wrong item |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def _row(name: str, f: Section, v: Section) -> str:
    share = f["non_copies_verified"] / max(1, v["non_copy_queries"])
    return (
        f"| {name} | {f['top1']:.3f} | {f['micro_ap']:.3f} | {f['recall_at_1pct_fp']:.3f} | "
        f"{f['non_copies_verified']} ({share:.1%}) | {f['copies_verified_wrong']} |"
    )

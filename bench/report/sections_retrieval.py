"""The RESULTS.md section of ``python -m bench retrieval``: each method's top-1, recall@5
and mAP, its embedding cost and index memory, and the per-edit top-1 of today's method
against the new default and the best measured; and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import sections_verified
from bench.scenarios.retrieval import LEGACY

Section = dict[str, Any]
Lines = list[str]

BEFORE = "average pool (before 0.2)"
DEFAULT = "GeM + trim borders (new default)"
CROPS, BOTH = "GeM + trim + crop views", "GeM + trim + crop views + grey view"
#: The methods the server offers as options, with their flags.
OPTIONS = {
    CROPS: "--crop-views",
    "GeM + trim + grey view": "--grey-view",
    BOTH: "--crop-views --grey-view",
}


def best(s: Section) -> str:
    methods: dict[str, Any] = s["methods"]
    return str(
        max(methods, key=lambda n: (methods[n]["overall"]["top1"], methods[n]["overall"]["map"]))
    )


def retrieval(s: Section) -> Lines:
    methods = s["methods"]
    top = best(s)
    rows = [
        f"| {name} | {m['overall']['top1']:.3f} | {m['overall']['recall5']:.3f} | "
        f"{m['overall']['map']:.3f} | {min(e['top1'] for e in m['per_edit'].values()):.2f} | "
        f"{m['query_ms']:.1f} | {m['item_ms']:.1f} | {m['bytes_per_item'] / 1024:.1f} |"
        for name, m in methods.items()
    ]
    columns = (BEFORE, DEFAULT, top) if top not in (BEFORE, DEFAULT) else (BEFORE, DEFAULT)
    per_edit = [
        f"| {edit} | "
        + " | ".join(f"{methods[c]['per_edit'][edit]['top1']:.2f}" for c in columns)
        + " |"
        for edit in s["edits"]
    ]
    return [
        "## Search quality: edited photos against hard distractors (`python -m bench retrieval`)",
        "",
        f"A catalog of {s['originals']} originals (every real photo the installed packages "
        "ship: scikit-image's and matplotlib's, and generated product-like scenes) and "
        f"{s['distractors']} distractors (quarters and off-centre crops of each photo, other "
        f"scenes of the same kind); {s['queries']} queries, each original edited "
        f"{len(s['edits'])} ways (below). A query succeeds at top-1 when its original ranks "
        "first among all catalog items; mAP has one relevant item per query (1 / rank). "
        "Embedding ms per image (preparing it and the model, batch 32, on this machine) for "
        "a query and for an added item; index memory per item (flat float32). "
        "`bench/scenarios/retrieval.py`, `bench/scenarios/retrieval_data.py`.",
        "",
        "| method | top-1 | recall@5 | mAP | worst edit top-1 | query ms | item ms | KiB/item |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *_choice(s),
        *_throughput(s),
        "![top-1 per method](retrieval.png)",
        "",
        "Top-1 per edit:",
        "",
        "| edit | " + " | ".join(columns) + " |",
        "|---" + "|---:" * len(columns) + "|",
        *per_edit,
        "",
        *sections_verified.verified(s, DEFAULT),
    ]


def _choice(s: Section) -> Lines:
    """Why the default is the default, from the numbers."""
    methods = s["methods"]
    new, old, top = methods[DEFAULT], methods[BEFORE], best(s)
    weakest = sorted(new["per_edit"].items(), key=lambda kv: kv[1]["top1"])[:4]
    lines = [
        f"The default embedding is **{DEFAULT.removesuffix(' (new default)')}**: the best top-1 "
        "of the methods that need nothing learned from the catalog and store one vector per item: "
        f"{new['overall']['top1']:.3f} against {old['overall']['top1']:.3f} before (mAP "
        f"{new['overall']['map']:.3f} against {old['overall']['map']:.3f}), {new['query_ms']:.1f} "
        f"ms a query against {old['query_ms']:.1f}."
    ]
    if top != DEFAULT:
        t = methods[top]
        option = f" It is the server's `{OPTIONS[top]}` option:" if top in OPTIONS else ""
        lines.append(
            f" {top} finds more ({t['overall']['top1']:.3f}, mAP {t['overall']['map']:.3f})."
            f"{option} it costs {t['item_ms'] / new['item_ms']:.1f}x the time per added item "
            f"and {t['bytes_per_item'] / new['bytes_per_item']:.0f}x the memory per item, so it "
            "is not the default."
        )
    lines.append(
        " The weakest edits for the default: "
        + ", ".join(f"{edit} ({r['top1']:.2f})" for edit, r in weakest)
        + "."
    )
    return ["".join(lines), ""]


def _throughput(s: Section) -> Lines:
    t = s.get("throughput")
    if not t:
        return []
    return [
        f"Serving cost of the new default: `POST /v1/embed` at {t['clients']} clients, the new "
        f"default and the old embedding (`{LEGACY}`) up together, {t['rounds']} rounds each in "
        f"turn: **{t['new_images_per_s']} against {t['old_images_per_s']} images/s** (median "
        f"ratio {t['median_ratio']:.2f}).",
        "",
    ]


def plot(s: Section, path: Path) -> Path:
    """Top-1 and recall@5 of each method, as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["methods"])
    top1 = [s["methods"][n]["overall"]["top1"] for n in names]
    recall = [s["methods"][n]["overall"]["recall5"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(names) + 1.2))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], recall, height=0.4, label="recall@5", color="#9ecae1")
    ax.barh([i - 0.2 for i in y], top1, height=0.4, label="top-1", color="#3182bd")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(top1) - 0.05, 1.0)
    ax.set_xlabel("share of queries")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Search quality: {s['queries']} edited queries, {s['distractors']} distractors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

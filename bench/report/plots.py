"""PNG plots of a sweep: latency percentiles against throughput, and the batch-size
distribution at each point."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_sweep(points: list[dict[str, Any]], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [p["achieved_per_s"] for p in points]
    for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^-."), ("p999_ms", "v:")):
        left.plot(x, [p[key] for p in points], style, label=key.removesuffix("_ms"))
    left.set_xlabel("achieved requests/s")
    left.set_ylabel("latency ms (from scheduled send)")
    left.set_yscale("log")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    left.set_title(title)

    sizes = sorted({int(s) for p in points for s in p.get("server", {}).get("batch_sizes", {})})
    width = 0.8 / max(1, len(points))
    for i, p in enumerate(points):
        dist = p.get("server", {}).get("batch_sizes", {})
        total = sum(dist.values()) or 1
        label = f"{p['offered_per_s']:g}/s" if p["offered_per_s"] else f"{p['concurrency']} clients"
        right.bar(
            [j + i * width for j in range(len(sizes))],
            [dist.get(str(s), 0) / total for s in sizes],
            width,
            label=label,
        )
    right.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))])
    right.set_xticklabels([f"<= {s}" for s in sizes])
    right.set_xlabel("batch size handed to the model")
    right.set_ylabel("share of batches")
    right.legend(fontsize="small")
    right.set_title("batch sizes per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(configs: dict[str, list[dict[str, Any]]], title: str, path: Path) -> Path:
    """p50 and p99 against achieved throughput, one line per server configuration (open-loop
    points only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in configs.items():
        open_points = sorted(
            (p for p in points if p["offered_per_s"]), key=lambda p: p["offered_per_s"]
        )
        x = [p["achieved_per_s"] for p in open_points]
        line = ax.plot(x, [p["p99_ms"] for p in open_points], "o-", label=f"{name} p99")[0]
        ax.plot(
            x, [p["p50_ms"] for p in open_points], "o:", color=line.get_color(), label=f"{name} p50"
        )
    ax.set_xlabel("achieved requests/s (open loop, offered rate rising)")
    ax.set_ylabel("latency ms (from scheduled send)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

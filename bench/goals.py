"""The README's performance goals against results.json: the table of goals, what was
measured and whether each was met, and why the misses happen. Rendered, never typed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.sections import at_clients, ratio, saturation

Data = dict[str, dict[str, Any]]
Lines = list[str]


def verdict(checks: dict[str, bool]) -> str:
    """``yes``, ``no``, or which parts were met and which not: ``throughput no; p99 and
    memory yes``."""
    met = [name for name, ok in checks.items() if ok]
    missed = [name for name, ok in checks.items() if not ok]
    if not missed:
        return "yes"
    if not met:
        return "no"
    return f"{' and '.join(missed)} no; {' and '.join(met)} yes"


def saturation_goal(d: Data) -> tuple[str, str, str]:
    best, limit = saturation(d["embed"]["servers"]), d["limit"]["limit_per_s"]
    share = best["images_per_s"] / limit
    measured = f"{best['images_per_s']:.0f} of {limit:.0f} images/s = {share:.0%}"
    return "saturation ≥ 90% of the offline limit", measured, verdict({"": share >= 0.9})


def baseline_a_goal(d: Data) -> tuple[str, str, str]:
    servers = d["embed"]["servers"]
    times = ratio(
        at_clients(servers["batchserve"]), at_clients(servers["(a) Flask + model.predict"])
    )
    return "32 clients: ≥ 5x baseline (a)", f"{times:.1f}x", verdict({"": times >= 5})


def baseline_b_goal(d: Data) -> tuple[str, str, str]:
    servers = d["embed"]["servers"]
    ours, b = servers["batchserve"], servers["(b) Flask + tf.function"]
    on, off = at_clients(ours), at_clients(b)
    times = ratio(on, off)
    measured = (
        f"{times:.1f}x; p99 {on['p99_ms']:.0f} vs {off['p99_ms']:.0f} ms; "
        f"{ours['rss_mib']} vs {b['rss_mib']} MiB"
    )
    checks = {
        "throughput": times >= 2,
        "p99": on["p99_ms"] <= off["p99_ms"],
        "memory": ours["rss_mib"] < b["rss_mib"],
    }
    goal = "32 clients: ≥ 2x baseline (b), equal or lower p99, less memory"
    return goal, measured, verdict(checks)


def low_load_goal(d: Data) -> tuple[str, str, str]:
    p50, limit = d["low_load"]["point"]["p50_ms"], d["limit"]
    over, over_single = p50 - limit["paced_ms"], p50 - limit["single_ms"]
    measured = (
        f"{over:.1f} ms over the model called once a second ({over_single:.1f} ms over "
        "back-to-back calls)"
    )
    met = "yes" if over <= 3.0 else f"no (by {over - 3.0:.1f} ms)"
    return "low load: p50 within 3 ms of single-image inference", measured, met


def search_goal(d: Data) -> tuple[str, str, str]:
    search = d["search"]
    adds = search["adds"]["adds_ms"]
    recall = next(
        (r["recall_at_10"] for r in d.get("kinds", {}).get("rows", []) if r["kind"] == "hnsw"), None
    )
    detail = f", recall@10 {recall:.3f}" if recall is not None else ""
    items = f"{search['items'] // 1000}k"
    return (
        f"search adds < 2 ms at p50 on {items} items",
        f"{adds:.1f} ms (hnsw{detail})",
        verdict({"": adds < 2}),
    )


def overload_goal(d: Data) -> tuple[str, str, str]:
    f = d["overload"]
    retry = f["probe_503s_with_retry_after"]
    answered = "all" if retry == f["probe_503s"] else f"{retry} of {f['probe_503s']}"
    measured = (
        f"{100 * f['goodput_of_peak']:.0f}%; {'no crash' if f['server_alive'] else 'CRASHED'}, "
        f"503s in {f['rejected_p50_ms']} ms p50, {answered} with Retry-After, memory ≤ "
        f"{f['rss_max_mib']} MiB"
    )
    checks = {"goodput": f["goodput_of_peak"] >= 0.9, "no crash": f["server_alive"]}
    met = (
        "yes"
        if all(checks.values())
        else " and ".join(k for k, ok in checks.items() if not ok) + " no"
    )
    return f"overload at {f['factor']:g}x: goodput ≥ 90% of peak", measured, met


#: Each goal and the results.json sections it needs.
GOALS: list[tuple[tuple[str, ...], Callable[[Data], tuple[str, str, str]]]] = [
    (("embed", "limit"), saturation_goal),
    (("embed",), baseline_a_goal),
    (("embed",), baseline_b_goal),
    (("low_load", "limit"), low_load_goal),
    (("search",), search_goal),
    (("overload",), overload_goal),
]


def rows(data: Data) -> list[tuple[str, str, str]]:
    """(goal, measured, met) of every goal whose sections were measured."""
    return [goal(data) for needs, goal in GOALS if all(n in data for n in needs)]


def table(data: Data) -> Lines:
    measured = rows(data)
    if not measured:
        return []
    return [
        "Against the performance goals, on the machine below (the generator shares its cores):",
        "",
        "| goal | measured | met |",
        "|---|---|---|",
        *[f"| {goal} | {figures} | {met} |" for goal, figures, met in measured],
        "",
    ]


def why_missed(data: Data) -> Lines:
    """Where the CPU goes instead of the model, from the low-load breakdown, the (b)
    comparison and the overload run."""
    if not all(n in data for n in ("low_load", "limit", "embed", "overload")):
        return []
    if all(met == "yes" for _, _, met in rows(data)):
        return []
    server = data["low_load"]["point"]["server"]
    stages = server["mean_decode_ms"] + server["mean_queue_wait_ms"] + server["mean_inference_ms"]
    rest = server["mean_request_ms"] - stages
    b = at_clients(data["embed"]["servers"]["(b) Flask + tf.function"])["images_per_s"]
    limit = data["limit"]["limit_per_s"]
    f = data["overload"]
    return [
        "Why the misses: on a CPU the model and everything around it share the same cores. "
        f"Per image the server also decodes the JPEG ({server['mean_decode_ms']:.2f} ms) and "
        f"handles HTTP and JSON ({rest:.2f} ms), the low-load breakdown in section 5, and each "
        "of those milliseconds is taken from the model. 2x (b) at 32 clients would need "
        f"{2 * b:.0f} images/s, {2 * b / limit:.0%} of the offline limit (decode and model with "
        "no HTTP at all). On a GPU the model leaves the CPU to decoding and HTTP, and this "
        f"trade-off goes away. Under {f['factor']:g}x overload the same holds: the model is busy "
        f"{f['model_busy']:.0%} of the time, but each image takes {f['model_ms_per_image']} ms "
        f"instead of {f['peak_model_ms_per_image']} ms at the peak, because reading and "
        f"refusing ~{round(f['rejected_per_s'], -1):.0f} requests/s, and the load generator "
        "itself, take CPU from it (refusals are already answered from the headers alone, "
        "without parsing the body). The profiling behind this is in the closing notes of the "
        "issues.",
        "",
    ]

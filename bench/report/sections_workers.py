"""RESULTS.md's section on edge processes (``python -m bench workers``)."""

from __future__ import annotations

from bench.report.sections import POOLING_MODEL, Lines, Section, errors_text

#: The phases, as the section names them.
PHASES = {
    "small": "64x64 JPEGs, near-zero-cost model (the reactors are the limit)",
    "photo": "640x480 JPEGs, near-zero-cost model (decoding weighs in)",
    "model": "640x480 JPEGs, the built-in model",
}


def _side_row(name: str, side: Section) -> str:
    errors = errors_text(side["errors"])
    return (
        f"| {name} | {', '.join(f'{v:g}' for v in side['images_per_s'])} | "
        f"{side['median_images_per_s']:g} | {side['p99_ms']:g} | "
        f"{side['front_reactor_cpu_ms_per_request']:.2f} | {side['edges_cpu_ms_per_request']:.2f} "
        f"| {side['core_cpu_ms_per_request']:.2f} | {errors} |"
    )


def _phase(name: str, phase: Section) -> Lines:
    ratios = "; ".join(
        f"{pair.replace('/', ' / ')}: **{median:.2f}x** "
        f"({', '.join(f'{r:.2f}' for r in phase['ratios'][pair])})"
        for pair, median in phase["median_ratios"].items()
    )
    return [
        f"### {PHASES.get(name, name)}",
        "",
        f"{phase['clients']} clients, closed loop, {phase['rounds']} rounds of "
        f"{phase['seconds']:g} s on each server in turn.",
        "",
        "| server | images/s per round | median images/s | p99 ms (median) | front reactor "
        "CPU ms/request | edges' CPU ms/request | core's CPU ms/request | errors |",
        "|---|---|---:|---:|---:|---:|---:|---|",
        *[_side_row(side, figures) for side, figures in phase["sides"].items()],
        "",
        f"Median of the per-round ratios of images/s: {ratios}.",
        "",
    ]


def workers(s: Section) -> Lines:
    t = s["transport"]
    lines = [
        "## Edge processes (`python -m bench workers`)",
        "",
        "Three servers up at once: one process (`--workers 0`), one edge process in front of "
        "the model core (`--workers 1`), and two (`--workers 2`), loaded in turn round after "
        "round. The near-zero-cost model is the front end's (`python -m bench frontend`: "
        f"{s.get('tiny_model', POOLING_MODEL)}), run on one thread (`--intra-op-threads 1`) "
        "so that it takes as little of the machine as "
        f"it can; this machine has {s['cores']} cores for the servers and the load generator "
        "together. CPU per request from /proc: the front reactor is each edge's main thread "
        "(with one process: its reactor), the edges' and the core's columns are all their "
        "threads.",
        "",
    ]
    for name in ("small", "photo", "model"):
        if name in s:
            lines += _phase(name, s[name])
    lines += [
        "### The hand-off alone",
        "",
        f"An image into a shared slot: {t['slot_copy_us_per_image']:g} µs. A request's frames "
        "to the core and back (pickled, one embedding per image): "
        f"{t['frames_us_per_request_of_1']:g} µs for 1 image, "
        f"{t['frames_us_per_request_of_32']:g} µs for 32. Decoding the same "
        f"640x480 JPEG to the model's input: {t['decode_us_per_image']:g} µs.",
        "",
    ]
    return lines

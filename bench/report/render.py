"""Rendering bench/results.json: RESULTS.md, the README's headline and benchmark lines, and
the plots. Nothing here measures, and nothing is read back from markdown.

``python -m bench render`` rewrites RESULTS.md, the README's headline between
``<!-- headline:start -->`` and ``<!-- headline:end -->`` and its five benchmark lines between
``<!-- bench:start -->`` and ``<!-- bench:end -->``; every measuring command does too.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import (
    plots,
    sections,
    sections_backends,
    sections_bulk,
    sections_retrieval,
    sections_scenarios,
    sections_workers,
)

BENCH = Path(__file__).parents[1]
RESULTS_MD = BENCH / "RESULTS.md"
README = BENCH.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

Data = dict[str, dict[str, Any]]
Lines = list[str]


def header(data: Data) -> Lines:
    """Date, machine, model, images and command of the report (its /v1/embed sweep)."""
    embed, limit = data.get("embed"), data.get("limit")
    first = embed or next(iter(data.values()), None)
    if first is None:
        return []
    lines = [f"- Date: {first['date']}", f"- Machine: {first['machine']}"]
    if limit:
        lines.append(f"- Model: built-in `{limit['model']}` (160x160, 1280-d), TensorFlow CPU")
    if embed:
        lines += [
            f"- Images: {embed['images']} camera-sized JPEGs (640x480) made from scikit-image's "
            "photos, one per request, raw body",
            f"- Command: `{embed['command']}` (points of {embed['duration_s']:g} s after "
            f"{embed['warmup_s']:g} s of warm-up; latency SLO for goodput {embed['slo_ms']:g} "
            "ms; the load generator runs on the same cores as the server)",
        ]
    return [*lines, ""]


def provenance(section: dict[str, Any], reference: dict[str, Any] | None) -> Lines:
    """A line saying when, where and how a section was measured, where that differs from
    the report's header."""
    if reference is None or section is reference:
        return []
    differs = [k for k in ("date", "machine", "command") if section[k] != reference[k]]
    if not differs:
        return []
    parts = [f"on {section[k]}" for k in ("date", "machine") if k in differs]
    parts.append(f"with `{section['command']}`")
    return [f"_Measured {', '.join(parts)}._", ""]


def _embed_sections(data: Data) -> Lines:
    embed = data["embed"]
    return [
        *sections.saturation_section(embed, data.get("limit")),
        *sections.batching_off(embed),
        *sections.alternatives(embed),
    ]


def _low_load(data: Data) -> Lines:
    low, limit = data["low_load"], data.get("limit", {})
    return sections.low_load_section(
        low["point"],
        limit.get("single_ms", float("nan")),
        limit.get("paced_ms", float("nan")),
        low["seconds"],
    )


#: Each results.json section and how it renders (given every section, for comparisons).
RENDERERS: dict[str, Callable[[Data], Lines]] = {
    "limit": lambda d: sections.limit(d["limit"]),
    "embed": _embed_sections,
    "low_load": _low_load,
    "search": lambda d: sections.search(d["search"]),
    "bulk": lambda d: sections.bulk(d["bulk"]),
    "bulk_engines": lambda d: sections_bulk.bulk_engines(d["bulk_engines"]),
    "retrieval": lambda d: sections_retrieval.retrieval(d["retrieval"]),
    "kinds": lambda d: sections.kinds(d["kinds"]),
    "ceiling": lambda d: sections.ceiling(d["ceiling"]),
    "train": lambda d: sections_scenarios.train(d["train"]),
    "overload": lambda d: sections_scenarios.overload(d["overload"]),
    "frontend": lambda d: sections_scenarios.frontend(d["frontend"]),
    "workers": lambda d: sections_workers.workers(d["workers"]),
    "versus": lambda d: sections_scenarios.versus(d["versus"]),
    "backends": lambda d: sections_backends.backends(d["backends"]),
    "precision": lambda d: sections_backends.precision(d["precision"]),
    "device": lambda d: sections_backends.device(d["device"]),
    "replica_start": lambda d: sections_scenarios.replica_start(d["replica_start"]),
    "cluster": lambda d: sections_scenarios.cluster(d["cluster"]),
    "writers": lambda d: sections_scenarios.writers(d["writers"]),
}


def body(data: Data, leave_out: tuple[str, ...] = ()) -> Lines:
    """Every measured section in the report's order, each with its provenance where it
    differs from the header's."""
    reference = data.get("embed") or next(iter(data.values()), None)
    lines: Lines = []
    for name, render in RENDERERS.items():
        if name not in data or name in leave_out:
            continue
        rendered = render(data)
        if name != "train":  # its own lines say where it was measured
            rendered[2:2] = provenance(data[name], reference)
        lines += rendered
    return lines


def results_markdown(data: Data) -> str:
    lines = ["# batchserve benchmark results", "", *header(data), *body(data)]
    return "\n".join(lines).rstrip("\n") + "\n"


def _on(section: dict[str, Any]) -> str:
    return f"measured {section['date']} on {section['machine']}"


#: How the README names what a default server ran on.
RUNTIMES = {"tensorflow": "TensorFlow", "openvino": "OpenVINO"}


def _runtime(section: dict[str, Any]) -> str:
    """What the default server ran on when ``section`` was measured (TensorFlow before
    ``--backend auto``, which did not record it), and in what shape."""
    backend = str(section.get("default_backend", "tensorflow"))
    return f"batchserve on {RUNTIMES.get(backend, backend)}, {_shape(section)}"


def _shape(section: dict[str, Any]) -> str:
    """The default server's processes when ``section`` was measured (one before
    ``--workers``, which did not record it)."""
    edges = int(section.get("default_edges", 0))
    return f"{edges} edge processes" if edges else "one process"


def _against_predict(data: Data) -> str:
    servers = data["embed"]["servers"]
    ours = sections.at_clients(servers["batchserve"])
    a = sections.at_clients(servers["(a) Flask + model.predict"])
    return (
        f"- **{sections.ratio(ours, a):.1f}x the images/s of Flask + `model.predict`** at 32 "
        f"concurrent clients ({ours['images_per_s']} against {a['images_per_s']} images/s, "
        f"p99 {ours['p99_ms']:.0f} against {a['p99_ms']:.0f} ms; the same model, gunicorn with "
        f"one worker per core; {_runtime(data['embed'])}); {_on(data['embed'])}."
    )


def _against_tf_function(data: Data) -> str:
    if "backends" in data:
        return _backends_against_tf_function(data["backends"])
    v = data["versus"]
    ours, theirs = v["batchserve"], v["baseline"]
    return (
        f"- **{v['median_ratio']:.2f}x the images/s of Flask + a compiled `tf.function`**, the "
        f"strongest per-request setup: median of {v['rounds']} rounds at {v['clients']} "
        f"clients, both servers up and measured in turn ({ours['median_images_per_s']} against "
        f"{theirs['median_images_per_s']} images/s, p99 {ours['p99_ms']:.0f} against "
        f"{theirs['p99_ms']:.0f} ms); {_on(v)}."
    )


def _backends_against_tf_function(b: dict[str, Any]) -> str:
    sides, ratios = b["sides"], b["median_ratios"]
    ov, tf, flask = sides["openvino"], sides["tensorflow"], sides["flask"]
    return (
        f"- **{ratios['openvino/flask']:.2f}x the images/s of Flask + a compiled `tf.function`** "
        f"on OpenVINO, the default on CPUs ({ratios['tensorflow/flask']:.2f}x with `--backend "
        "tensorflow`), the "
        f"strongest per-request setup: median of {b['rounds']} rounds at {b['clients']} "
        f"clients, the servers up at once and measured in turn ({ov['median_images_per_s']} "
        f"and {tf['median_images_per_s']} against {flask['median_images_per_s']} images/s, p99 "
        f"{ov['p99_ms']:.0f} and {tf['p99_ms']:.0f} against {flask['p99_ms']:.0f} ms; "
        f"{_shape(b)}); {_on(b)}."
    )


def _against_limit(data: Data) -> str:
    best = sections.saturation(data["embed"]["servers"])
    limit = data["limit"]
    return (
        f"- **{best['images_per_s'] / limit['limit_per_s']:.0%} of the offline limit** at "
        f"saturation: {best['images_per_s']} images/s over HTTP ({sections.load_text(best)}) "
        f"against {limit['limit_per_s']:.0f} images/s for decoding and embedding the same JPEGs "
        f"in one loop, with no HTTP ({_runtime(data['embed'])}); {_on(data['embed'])}."
    )


def _search_cost(data: Data) -> str:
    s = data["search"]
    adds = s["adds"]
    return (
        f"- **search adds {adds['adds_ms']:.1f} ms** at p50 on "
        f"{s['items']:,} items (hnsw index, 1 client: {adds['embed_p50_ms']} ms for "
        f"`/v1/embed`, {adds['search_p50_ms']} ms for `/v1/search?k=10` on the same server); "
        f"{_on(s)}."
    )


def _overload(data: Data) -> str:
    f = data["overload"]
    flood = (
        f", and {f['flood_goodput_of_peak']:.0%} of the peak with {f['flood_clients']} "
        "clients retrying at once"
        if "flood_goodput_of_peak" in f
        else ""
    )
    return (
        f"- **{f['goodput_of_peak']:.0%} of the peak goodput at {f['factor']:g}x overload** "
        f"(median of {len(f.get('rounds', [])) or 1} rounds): offered {f['offered_per_s']:.0f} "
        f"requests/s against a peak of {f['peak_per_s']:g} images/s, it answered "
        f"{f['goodput_per_s']:g} requests/s within the deadline (in {f['ok_p50_ms'] / 1000:.1f} "
        "s at p50, the queue's depth) and refused the rest with "
        f"503 and Retry-After in {f['rejected_p50_ms']} ms (p50), in at most "
        f"{f['rss_max_mib']} MiB{flood} ({_runtime(f)}); {_on(f)}."
    )


def _search_quality(data: Data) -> str:
    r = data["retrieval"]
    m = r["methods"]
    new, old = m[sections_retrieval.DEFAULT], m[sections_retrieval.BEFORE]
    crops, both = m[sections_retrieval.CROPS], m[sections_retrieval.BOTH]
    verified = ""
    if v := r.get("verified"):
        k, shortlist = next(iter(v["shortlists"].items()))
        verified = f"; {shortlist['top1']:.0%} with `verify=true`, its top {k} verified"
    return (
        f"- **the original of an edited photo found first {new['overall']['top1']:.0%} of the "
        f"time** ({old['overall']['top1']:.0%} with the embedding before 0.2; "
        f"{crops['overall']['top1']:.0%} with `--crop-views`, {both['overall']['top1']:.0%} "
        f"adding `--grey-view`{verified}): {r['queries']:,} queries, "
        f"each an original edited one of {len(r['edits'])} ways, against "
        f"{r['originals'] + r['distractors']:,} images with hard distractors; {_on(r)}."
    )


#: The README's benchmark lines, each with the results.json sections it needs.
README_LINES: tuple[tuple[tuple[str, ...], Callable[[Data], str]], ...] = (
    (("embed",), _against_predict),
    (("versus",), _against_tf_function),
    (("embed", "limit"), _against_limit),
    (("search",), _search_cost),
    (("overload",), _overload),
    (("retrieval",), _search_quality),
)


def readme_block(data: Data) -> str:
    """The README's benchmark lines: one per claim, each with its numbers, what they were
    compared with and the machine they were measured on (those whose sections exist)."""
    return "\n".join(line(data) for needs, line in README_LINES if set(needs) <= set(data))


def put_block(text: str, block: str) -> str:
    """``text`` with what lies between the bench markers replaced by ``block``."""
    start, end = text.find(START), text.find(END)
    if start == -1 or end < start:
        raise ValueError(f"no {START} ... {END} block")
    return text[: start + len(START)] + "\n" + block + "\n\n" + text[end:]


def readme_numbers(text: str) -> str:
    """What the README holds between the bench markers."""
    start, end = text.find(START), text.find(END)
    if start == -1 or end < start:
        raise ValueError(f"no {START} ... {END} block")
    return text[start + len(START) : end].strip("\n")


def draw(data: Data, out_dir: Path, names: tuple[str, ...]) -> None:
    """The plots of the sections ``names`` (those just measured), next to RESULTS.md."""
    if "embed" in names and "embed" in data:
        servers = data["embed"]["servers"]
        plots.plot_compare(
            {
                "batchserve": servers["batchserve"]["points"],
                "batching off": servers["batching off"]["points"],
                "(a) Flask+predict": servers["(a) Flask + model.predict"]["points"],
                "(b) Flask+tf.function": servers["(b) Flask + tf.function"]["points"],
            },
            "POST /v1/embed, open loop",
            out_dir / "embed_sweep.png",
        )
        opened = [p for p in servers["batchserve"]["points"] if p["offered_per_s"]]
        plots.plot_sweep(opened, "batchserve /v1/embed", out_dir / "embed_batches.png")
    if "retrieval" in names and "retrieval" in data:
        sections_retrieval.plot(data["retrieval"], out_dir / "retrieval.png")
    if "search" in names and "search" in data:
        opened = [p for p in data["search"]["flat"] if p["offered_per_s"]]
        title = f"/v1/search, {data['search']['items'] // 1000}k flat"
        plots.plot_sweep(opened, title, out_dir / "search_sweep.png")


def write(data: Data, out: Path, readme: Path | None) -> None:
    """RESULTS.md at ``out``, and the README's block when ``readme`` is given."""
    out.write_text(results_markdown(data))
    if readme is not None:
        text = put_block(readme.read_text(), readme_block(data))
        has_b = "versus" in data or "backends" in data
        readme.write_text(put_headline(text, data) if has_b and "embed" in data else text)


HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def headline(data: Data) -> str:
    """The README's opening claim, from the embed section (against (a)) and the side-by-side
    comparison (against (b): the backends side by side where measured, else ``versus``),
    with the p99 and memory clauses the numbers support."""
    servers = data["embed"]["servers"]
    ours = sections.at_clients(servers["batchserve"])
    a = sections.at_clients(servers["(a) Flask + model.predict"])
    side_by_side = _against_b(data)
    memory = servers["batchserve"]["rss_mib"] < servers["(b) Flask + tf.function"]["rss_mib"]
    clauses = [f"at a {'lower' if side_by_side['lower_p99'] else 'higher'} p99"]
    clauses.append(f"in {'less' if memory else 'more'} memory")
    return textwrap.fill(
        f"Measured {side_by_side['date']} on {side_by_side['machine']}, with "
        f"{side_by_side['clients']} concurrent clients, batchserve serves "
        f"{sections.ratio(ours, a):.1f}x the images/s of Flask + `model.predict` "
        f"({_runtime(data['embed'])}) and "
        f"{side_by_side['ratio']:.2f}x the strongest per-request setup (Flask + a compiled "
        f"`tf.function`; the median of {side_by_side['rounds']} rounds run in turn with the "
        f"servers up{side_by_side['more']}), {' and '.join(clauses)} (see "
        "[Benchmarks](#benchmarks)).",
        width=90,
        break_on_hyphens=False,
    )


def _against_b(data: Data) -> dict[str, Any]:
    """The default server against (b): from the backends side by side when measured (with
    OpenVINO's ratio beside it), else from ``versus``."""
    if "backends" in data:
        b = data["backends"]
        ours, theirs = b["sides"]["openvino"], b["sides"]["flask"]
        ratio = b["median_ratios"]["openvino/flask"]
        more = (
            f"; on OpenVINO, the default on CPUs; {b['median_ratios']['tensorflow/flask']:.2f}x "
            "with `--backend tensorflow`"
        )
    else:
        b = data["versus"]
        ours, theirs, ratio, more = b["batchserve"], b["baseline"], b["median_ratio"], ""
    return {
        "date": b["date"],
        "machine": b["machine"],
        "clients": b["clients"],
        "rounds": b["rounds"],
        "ratio": ratio,
        "lower_p99": ours["p99_ms"] < theirs["p99_ms"],
        "more": more,
    }


def put_headline(text: str, data: Data) -> str:
    """``text`` with its headline between the headline markers rewritten."""
    start, end = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if start == -1 or end < start:
        raise ValueError(f"no {HEADLINE_START} ... {HEADLINE_END} block")
    return text[: start + len(HEADLINE_START)] + "\n" + headline(data) + "\n" + text[end:]

"""The benchmark report's arithmetic and rendering: the server's view of a run from two
/metrics scrapes, the sections rendered from results.json, and the README's lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.harness.load import LoadResult, LoadSpec, Sample
from bench.harness.procs import ThreadCpu
from bench.harness.scrape import ServerView, difference
from bench.report import render, results, sections_scenarios
from bench.report.sections import low_load_section
from bench.scenarios import frontend, versus
from bench.scenarios.overload import Watch, model_figures, summarise

BENCH = Path(results.__file__).parents[1]

BEFORE = {
    "batchserve_decode_seconds_count": 10.0,
    "batchserve_decode_seconds_sum": 0.02,
    'batchserve_request_seconds_count{route="/v1/embed"}': 10.0,
    'batchserve_request_seconds_sum{route="/v1/embed"}': 0.15,
}
AFTER = {
    "batchserve_decode_seconds_count": 30.0,
    "batchserve_decode_seconds_sum": 0.06,
    'batchserve_request_seconds_count{route="/v1/embed"}': 25.0,
    'batchserve_request_seconds_sum{route="/v1/embed"}': 0.375,
    'batchserve_request_seconds_count{route="/v1/search"}': 5.0,
    'batchserve_request_seconds_sum{route="/v1/search"}': 0.1,
}
SPEC = LoadSpec(url="http://127.0.0.1:1/v1/embed", requests=[], duration_s=10, warmup_s=0)


def test_decode_and_request_means_come_from_the_difference_of_two_scrapes() -> None:
    view = difference(BEFORE, AFTER)
    assert abs(view.mean_decode_ms - 2.0) < 1e-9  # 0.04 s over 20 images
    assert view.requests == 20.0  # both routes, new labels counted from zero
    assert abs(view.mean_request_ms - 16.25) < 1e-9  # 0.325 s over 20 requests


def test_an_idle_window_has_zero_means_not_a_division_error() -> None:
    view = difference(AFTER, AFTER)
    assert view.mean_decode_ms == 0.0 and view.mean_request_ms == 0.0


def test_low_load_section_splits_the_p50_into_stages() -> None:
    low = {
        "p50_ms": 16.0,
        "p99_ms": 20.0,
        "server": {
            "mean_decode_ms": 2.0,
            "mean_queue_wait_ms": 0.5,
            "mean_inference_ms": 11.0,
            "mean_request_ms": 14.5,
        },
    }
    text = "\n".join(low_load_section(low, single_ms=8.0, paced_ms=12.0, seconds=20))
    assert "p50 minus the paced model: **4.0 ms**" in text
    assert "minus the back-to-back model: 8.0 ms" in text
    assert "| rest inside the handler (thread hand-offs, parsing, JSON) | 1.00 |" in text
    assert "p50 minus total | 1.50 |" in text


def test_overload_figures_count_goodput_within_the_deadline_and_fast_rejections() -> None:
    samples = (
        [Sample(0.1 * i, 0.5, 200) for i in range(80)]  # 8/s inside the deadline
        + [Sample(0.1 * i, 12.0, 200) for i in range(10)]  # answered, but too late
        + [Sample(0.01 * i, 0.002, 503) for i in range(300)]
        + [Sample(1.0, 15.0, 0)]
    )
    watch = Watch(pid=0, port=0, body=b"")
    watch.rss = [100 * 2**20, 300 * 2**20, 250 * 2**20]
    watch.probes = [(503, True, 0.01), (503, True, 0.01), (200, False, 0.4)]
    f = summarise(LoadResult(SPEC, samples), peak=10.0, deadline_s=10.0, watch=watch, alive=True)
    assert f["goodput_per_s"] == 8.0 and f["goodput_of_peak"] == 0.8
    assert f["rejected_per_s"] == 30.0 and f["rejected_p99_ms"] == 2.0
    assert f["other_statuses"] == {"0": 1}
    assert (f["probe_503s"], f["probe_503s_with_retry_after"]) == (2, 2)
    assert (f["rss_start_mib"], f["rss_max_mib"], f["rss_end_mib"]) == (100, 300, 250)


def test_overload_section_shows_how_the_model_slowed_under_the_load() -> None:
    view = ServerView(batches=10, images=320, queue_wait_s=0.0, inference_s=4.8)
    under = model_figures(view, seconds=6.0)
    assert under == {"model_ms_per_image": 15.0, "model_busy": 0.8}
    watch = Watch(pid=0, port=0, body=b"")
    f = summarise(LoadResult(SPEC, []), peak=10.0, deadline_s=10.0, watch=watch, alive=True)
    f.update({"seconds": 60.0, "factor": 3.0, **under})
    f.update({"peak_model_ms_per_image": 12.0, "peak_model_busy": 0.95})
    text = "\n".join(sections_scenarios.overload(f))
    assert "| model time per image: at the peak / at 3x ms | 12.0 / 15.0 |" in text
    assert "| model busy: at the peak / at 3x | 95% / 80% |" in text
    assert "1 generator process" in text


def test_results_md_is_what_results_json_renders_to() -> None:
    data = results.load(BENCH / "results.json")
    assert (BENCH / "RESULTS.md").read_text() == render.results_markdown(data)


def test_every_section_of_results_json_says_when_where_and_how_it_was_measured() -> None:
    for name, section in results.load(BENCH / "results.json").items():
        assert name in results.SECTIONS
        assert {"date", "machine", "command"} <= set(section), name


def test_recording_a_section_replaces_it_and_keeps_the_others_in_order(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"overload": {"x": 1}, "limit": {"y": 2}}))
    argv = ["ceiling", "--duration", "2", "--results", str(path), "--readme="]
    results.record(path, "ceiling", argv, {"wrk_per_s": None})
    data = json.loads(path.read_text())
    assert list(data) == ["limit", "ceiling", "overload"]
    assert data["ceiling"]["command"] == "python -m bench ceiling --duration 2"
    assert data["ceiling"]["wrk_per_s"] is None and data["limit"] == {"y": 2}


def test_a_section_measured_apart_from_the_report_says_how() -> None:
    report = {"date": "d1", "machine": "m", "command": "python -m bench report"}
    alone = {"date": "d2", "machine": "m", "command": "python -m bench overload"}
    assert render.provenance(alone, report) == [
        "_Measured on d2, with `python -m bench overload`._",
        "",
    ]
    assert render.provenance(dict(report), report) == []


def test_the_readme_block_is_replaced_between_its_markers_only() -> None:
    text = f"intro\n{render.START}\nold 1.0x\n{render.END}\n\n## Next\n"
    replaced = render.put_block(text, "new 2.0x")
    assert replaced == f"intro\n{render.START}\nnew 2.0x\n\n{render.END}\n\n## Next\n"
    assert render.readme_numbers(replaced) == "new 2.0x"


def test_the_readme_lines_leave_out_a_claim_whose_section_was_not_measured() -> None:
    data = results.load(BENCH / "results.json")
    every = render.readme_block(data).splitlines()
    without = {name: section for name, section in data.items() if name != "search"}
    assert render.readme_block(without).splitlines() == [
        line for line in every if "search adds" not in line
    ]


def test_reactor_cpu_is_the_main_thread_and_the_rest_is_every_other_thread() -> None:
    before = frontend.ServerSample(
        {}, {7: ThreadCpu(7, "python", 1.0), 8: ThreadCpu(8, "python", 2.0)}
    )
    after = frontend.ServerSample(
        {},
        {
            7: ThreadCpu(7, "python", 1.5),
            8: ThreadCpu(8, "python", 2.25),
            9: ThreadCpu(9, "python", 0.5),  # started during the window: all of it counts
        },
    )
    split = frontend.cpu_split(7, before, after)
    assert split["reactor_cpu_s"] == 0.5 and split["others_cpu_s"] == 0.75
    assert split["others_are"] == "all threads but the reactor's"


def test_decode_threads_are_picked_by_name_where_the_kernel_knows_them() -> None:
    before = frontend.ServerSample({}, {})
    after = frontend.ServerSample(
        {},
        {
            7: ThreadCpu(7, "python", 1.0),
            8: ThreadCpu(8, "batchserve-deco", 0.25),
            9: ThreadCpu(9, "tf_inter_op", 4.0),
        },
    )
    split = frontend.cpu_split(7, before, after)
    assert split["others_cpu_s"] == 0.25 and split["others_are"] == "decode threads"


def test_requests_served_count_one_route_over_every_status() -> None:
    before = {'batchserve_requests_total{route="/v1/embed",code="200"}': 10.0}
    after = {
        'batchserve_requests_total{route="/v1/embed",code="200"}': 110.0,
        'batchserve_requests_total{route="/v1/embed",code="503"}': 5.0,
        'batchserve_requests_total{route="/metrics",code="200"}': 2.0,
    }
    assert frontend.served(before, after) == 105.0


def test_side_by_side_quotes_the_median_of_the_per_pair_ratios() -> None:
    def rate(per_s: int) -> LoadResult:
        return LoadResult(SPEC, [Sample(i / per_s, 0.01, 200) for i in range(10 * per_s)])

    ours, theirs = [rate(30), rate(20), rate(40)], [rate(10), rate(20), rate(20)]
    ratios = [versus.ratio_of(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert [round(r, 6) for r in ratios] == [3.0, 1.0, 2.0]
    assert versus.side(ours)["median_images_per_s"] == 30.0


def test_ab_runs_another_checkout_from_its_data_dir_so_that_pythonpath_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.harness import procs
    from bench.scenarios import ab

    started: list[tuple[Any, ...]] = []

    def start(directory: Path, flags: Any, env: Any = None, cwd: Any = None) -> str:
        started.append((directory, list(flags), env, cwd))
        return "server"

    monkeypatch.setattr(procs.ServerProcess, "start", start)
    ab.Side("--decode-nice 0").start(tmp_path / "b", ["--no-demo"])
    ab.Side(code=str(tmp_path / "old")).start(tmp_path / "a", ["--no-demo"])
    assert started == [
        (tmp_path / "b", ["--no-demo", "--decode-nice", "0"], {}, None),
        (tmp_path / "a", ["--no-demo"], {"PYTHONPATH": str(tmp_path / "old")}, tmp_path / "a"),
    ]


def test_versus_names_the_runtime_of_every_side_and_quotes_each_pair() -> None:
    def side(rate: float, p99: float) -> dict[str, Any]:
        return {"images_per_s": [rate, rate], "median_images_per_s": rate, "p50_ms": 100.0,
                "p99_ms": p99, "errors": {}}  # fmt: skip

    sides = {"batchserve": side(90, 500), "openvino": side(200, 300),
             "baseline": side(70, 550), "bentoml": side(80, 650)}  # fmt: skip
    pairs = {"batchserve/baseline": [1.3, 1.2], "openvino/bentoml": [2.5, 2.4]}
    section = {"clients": 32, "rounds": 2, "seconds": 10, "warmup_s": 2, "sides": sides,
               "ratios_by_pair": pairs, "median_ratios": {"batchserve/baseline": 1.25,
                                                          "openvino/bentoml": 2.45}}  # fmt: skip
    text = "\n".join(sections_scenarios.versus(section))
    assert "| (c) BentoML 1.4, batchable API (TensorFlow) | 80, 80 | 80 | 100.0 | 650 |" in text
    assert (
        "- batchserve, `--backend openvino` / (c) BentoML 1.4, batchable API (TensorFlow), "
        "median of the per-round ratios: **2.45x** at p99 300 against 650 ms (rounds: 2.50, "
        "2.40)."
    ) in text


def test_the_verified_search_part_shows_its_cost_on_the_server_and_the_readme_its_top1() -> None:
    from bench.report.sections_verified import verified

    data = results.load()
    section = data["retrieval"]
    cost = section["verify_cost"]
    default = "GeM + trim borders (new default)"
    lines = "\n".join(verified(section, default))
    assert (
        f"| verified / unverified | {cost['p50_ratio']}x | | {cost['throughput_ratio']}x |" in lines
    )
    assert f"| `verify=true` | {cost['verified']['p50_ms']} |" in lines
    unmeasured = "\n".join(verified({**section, "verify_cost": None}, default))
    assert "verified / unverified" not in unmeasured and "Copy detection" in unmeasured
    top1 = section["verified"]["shortlists"]["20"]["top1"]
    assert f"{top1:.0%} with `verify=true`, its top 20 verified" in render._search_quality(data)

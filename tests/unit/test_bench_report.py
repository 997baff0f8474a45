"""The benchmark report's arithmetic: the server's view of a run from two /metrics scrapes,
and the low-load breakdown built from it."""

from __future__ import annotations

from pathlib import Path

from bench.__main__ import low_load_section, put_section
from bench.load import LoadResult, LoadSpec, Sample
from bench.overload import Watch, model_figures, section, summarise
from bench.scrape import ServerView, difference

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


def test_put_section_replaces_a_section_in_place_or_appends_it(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n## A\n\nold a\n\n## B\n\nb\n")
    put_section(path, "## A", ["## A", "", "new a", ""])
    assert path.read_text() == "# R\n\n## A\n\nnew a\n\n## B\n\nb\n"
    put_section(path, "## C", ["## C", "", "c", ""])
    assert path.read_text().endswith("## B\n\nb\n\n## C\n\nc\n")


def test_overload_figures_count_goodput_within_the_deadline_and_fast_rejections() -> None:
    spec = LoadSpec(url="http://127.0.0.1:1/v1/embed", requests=[], duration_s=10, warmup_s=0)
    samples = (
        [Sample(0.1 * i, 0.5, 200) for i in range(80)]  # 8/s inside the deadline
        + [Sample(0.1 * i, 12.0, 200) for i in range(10)]  # answered, but too late
        + [Sample(0.01 * i, 0.002, 503) for i in range(300)]
        + [Sample(1.0, 15.0, 0)]
    )
    watch = Watch(pid=0, port=0, body=b"")
    watch.rss = [100 * 2**20, 300 * 2**20, 250 * 2**20]
    watch.probes = [(503, True, 0.01), (503, True, 0.01), (200, False, 0.4)]
    f = summarise(LoadResult(spec, samples), peak=10.0, deadline_s=10.0, watch=watch, alive=True)
    assert f["goodput_per_s"] == 8.0 and f["goodput_of_peak"] == 0.8
    assert f["rejected_per_s"] == 30.0 and f["rejected_p99_ms"] == 2.0
    assert f["other_statuses"] == {"0": 1}
    assert (f["probe_503s"], f["probe_503s_with_retry_after"]) == (2, 2)
    assert (f["rss_start_mib"], f["rss_max_mib"], f["rss_end_mib"]) == (100, 300, 250)


def test_overload_section_shows_how_the_model_slowed_under_the_load() -> None:
    view = ServerView(batches=10, images=320, queue_wait_s=0.0, inference_s=4.8)
    under = model_figures(view, seconds=6.0)
    assert under == {"model_ms_per_image": 15.0, "model_busy": 0.8}
    spec = LoadSpec(url="http://127.0.0.1:1/v1/embed", requests=[], duration_s=10, warmup_s=0)
    watch = Watch(pid=0, port=0, body=b"")
    f = summarise(LoadResult(spec, []), peak=10.0, deadline_s=10.0, watch=watch, alive=True)
    f.update({"peak_model_ms_per_image": 12.0, "peak_model_busy": 0.95, **under})
    text = "\n".join(section(f, 60))
    assert "| model time per image: at the peak / at 3x ms | 12.0 / 15.0 |" in text
    assert "| model busy: at the peak / at 3x | 95% / 80% |" in text
    assert "1 generator process" in text

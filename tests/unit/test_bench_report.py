"""The benchmark report's arithmetic: the server's view of a run from two /metrics scrapes,
and the low-load breakdown built from it."""

from __future__ import annotations

from bench.__main__ import low_load_section
from bench.scrape import difference

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

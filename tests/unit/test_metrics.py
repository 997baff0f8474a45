"""The /metrics page: batchserve's own metrics under their stable names, the process's and
the interpreter's beside them, no ``*_created`` series, and the gauges the alerts read."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from batchserve.serving.metrics import Metrics


def busy_metrics() -> Metrics:
    """Metrics with a sample in every labelled family (each child makes its own series)."""
    metrics = Metrics()
    metrics.request_done("/v1/embed", 200, 0.02)
    metrics.request_done("/v1/search", 503, 0.001)
    metrics.batch_started(3, [0.001, 0.002, 0.003])
    metrics.item_rejected("queue_full")
    metrics.inference_done(4, 0.05)
    metrics.search_done(0.004)
    metrics.decoded(0.003)
    metrics.set_model("dogs", "builtin", 1280, True)
    return metrics


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def names(metrics: Metrics) -> set[str]:
    return {name for name, _ in samples(metrics)}


def test_the_design_names_and_labels_are_unchanged() -> None:
    families = {
        f.name: (f.type, {frozenset(s.labels) - {"le"} for s in f.samples})
        for f in text_string_to_metric_families(busy_metrics().render().decode())
    }
    expected = {
        "batchserve_requests": ("counter", {frozenset({"route", "code"})}),
        "batchserve_request_seconds": ("histogram", {frozenset({"route"})}),
        "batchserve_queue_items": ("gauge", {frozenset()}),
        "batchserve_queue_wait_seconds": ("histogram", {frozenset()}),
        "batchserve_batch_size": ("histogram", {frozenset()}),
        "batchserve_inference_seconds": ("histogram", {frozenset({"batch_size"})}),
        "batchserve_decode_seconds": ("histogram", {frozenset()}),
        "batchserve_rejected": ("counter", {frozenset({"reason"})}),
        "batchserve_model_info": ("gauge", {frozenset({"name", "source", "dim", "pretrained"})}),
        "batchserve_search_seconds": ("histogram", {frozenset()}),
        "batchserve_index_items": ("gauge", {frozenset()}),
    }
    for name, (kind, label_sets) in expected.items():
        assert families[name] == (kind, label_sets), name


def test_the_page_has_the_process_memory_cpu_and_file_descriptors() -> None:
    found = samples(Metrics())
    assert found[("process_resident_memory_bytes", frozenset())] > 1_000_000
    for name in ("process_cpu_seconds_total", "process_open_fds", "process_start_time_seconds"):
        assert (name, frozenset()) in found, name


def test_the_page_has_the_python_version() -> None:
    [labels] = [dict(labels) for name, labels in samples(Metrics()) if name == "python_info"]
    assert labels["implementation"] and labels["major"] == "3"


def test_the_page_has_the_garbage_collector_counts() -> None:
    generations = {
        dict(labels)["generation"]
        for name, labels in samples(Metrics())
        if name == "python_gc_collections_total"
    }
    assert generations == {"0", "1", "2"}


def test_no_series_ends_in_created() -> None:
    text = busy_metrics().render().decode()
    assert "batchserve_requests_total" in text and "batchserve_request_seconds_count" in text
    created = [line for line in text.splitlines() if "_created" in line]
    assert created == []


def test_two_servers_in_one_process_each_have_the_process_metrics() -> None:
    # The collectors belong to each server's own registry, not the library's global one.
    first, second = Metrics(), Metrics()
    assert "process_resident_memory_bytes" in names(first)
    assert "process_resident_memory_bytes" in names(second)


def test_ready_reads_0_until_tracked_then_follows_the_condition_at_each_scrape() -> None:
    metrics = Metrics()
    assert samples(metrics)[("batchserve_ready", frozenset())] == 0.0
    ready = [False]
    metrics.track_readiness(lambda: ready[0])
    assert samples(metrics)[("batchserve_ready", frozenset())] == 0.0
    ready[0] = True
    assert samples(metrics)[("batchserve_ready", frozenset())] == 1.0
    ready[0] = False
    assert samples(metrics)[("batchserve_ready", frozenset())] == 0.0


def test_the_queue_capacity_is_exported_beside_the_queue_depth() -> None:
    metrics = Metrics()
    metrics.set_queue_capacity(512)
    metrics.queue_size(17)
    found = samples(metrics)
    assert found[("batchserve_queue_capacity_items", frozenset())] == 512.0
    assert found[("batchserve_queue_items", frozenset())] == 17.0

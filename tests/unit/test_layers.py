"""The shape of the package: imports run one way down the layers pyproject.toml declares
(``[tool.importlinter]``), no module imports another in a circle, and the folders stay small.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "batchserve"


def contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return found


def layer_levels() -> list[grimp.Layer]:
    (layers,) = [
        c["layers"]
        for c in contracts()
        if c["type"] == "layers" and str(c["layers"][0]).startswith("batchserve.")  # type: ignore[index]
    ]
    assert isinstance(layers, list)
    return [
        grimp.Layer(*(name.strip() for name in level.split("|")), independent=True)
        for level in layers
    ]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("batchserve", cache_dir=None)


def circles(graph: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = set()
            while (member := stack.pop()) != module:
                component.add(member)
            component.add(module)
            if len(component) > 1:
                found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_every_import_contract_is_kept() -> None:
    # In a process of its own: import-linter's in-process run trips over zope interfaces
    # that an earlier test's Twisted imports declared.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_import_runs_back_up_a_layer(graph: grimp.ImportGraph) -> None:
    assert graph.find_illegal_dependencies_for_layers(layers=layer_levels()) == set()


def test_an_import_back_up_a_layer_is_caught(graph: grimp.ImportGraph) -> None:
    graph.add_import(importer="batchserve.storage.store", imported="batchserve.http.wire")
    try:
        illegal = graph.find_illegal_dependencies_for_layers(layers=layer_levels())
    finally:
        graph.remove_import(importer="batchserve.storage.store", imported="batchserve.http.wire")
    assert ("batchserve.storage", "batchserve.http") in {(d.importer, d.imported) for d in illegal}


def test_no_module_imports_another_in_a_circle(graph: grimp.ImportGraph) -> None:
    assert circles(graph) == []


def test_a_circle_is_caught(graph: grimp.ImportGraph) -> None:
    graph.add_import(importer="batchserve.models.views", imported="batchserve.models.images")
    try:
        found = circles(graph)
    finally:
        graph.remove_import(importer="batchserve.models.views", imported="batchserve.models.images")
    assert any({"batchserve.models.views", "batchserve.models.images"} <= c for c in found)


def test_the_top_level_holds_only_entry_points_and_what_every_layer_shares() -> None:
    assert len(list(PACKAGE.glob("*.py"))) <= 8


@pytest.mark.parametrize(
    "folder", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
)
def test_each_layer_is_a_folder_of_at_most_15_modules(folder: str) -> None:
    modules = [p for p in (PACKAGE / folder).glob("*.py") if p.name != "__init__.py"]
    assert 0 < len(modules) <= 15
    docstring = (PACKAGE / folder / "__init__.py").read_text()
    assert docstring.startswith('"""'), f"{folder}/__init__.py says what lives there"

"""Declaring settings: ``setting(...)`` fields in a component's own frozen dataclass, and
``part(...)`` fields that compose components into a command's tree (see config.py, which
reads them from flags, ``BATCHSERVE_*`` variables and TOML)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batchserve.errors import ConfigError


@dataclass(frozen=True)
class Meta:
    """How one setting is named, explained and bounded."""

    help: str
    name: str | None = None
    choices: Sequence[str] | None = None
    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None


def setting(
    default: Any,
    help: str,
    *,
    name: str | None = None,
    choices: Sequence[str] | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    above: float | None = None,
) -> Any:
    """A dataclass field that is a setting: its default, help and bounds; ``name`` when its
    flat name (flag, variable, TOML key) differs from the field's."""
    meta = Meta(help, name, choices, at_least, at_most, above)
    return dataclasses.field(default=default, metadata={"setting": meta})


def check_value(name: str, meta: Meta, value: Any) -> Any:
    """``value`` if it is within the choices and bounds of ``meta``; else ConfigError
    naming the setting."""
    if meta.choices and value not in meta.choices:
        raise ConfigError(f"{name} must be one of {', '.join(meta.choices)}, got {value!r}")
    if meta.at_least is not None and value < meta.at_least:
        raise ConfigError(f"{name} must be at least {meta.at_least:g}, got {value}")
    if meta.at_most is not None and value > meta.at_most:
        raise ConfigError(f"{name} must be at most {meta.at_most:g}, got {value}")
    if meta.above is not None and value <= meta.above:
        raise ConfigError(f"{name} must be above {meta.above:g}, got {value}")
    return value


def check_settings(obj: Any) -> None:
    """Check every setting of the dataclass ``obj`` and of its parts."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if "part" in f.metadata:
            check_settings(value)
        elif "setting" in f.metadata:
            meta: Meta = f.metadata["setting"]
            check_value(meta.name or f.name, meta, value)


def part(kind: type, only: Sequence[str] | None = None) -> Any:
    """A dataclass field holding a component's settings; ``only``: the flat names of those
    this command uses (the others keep their defaults and are not shown)."""
    return dataclasses.field(
        default_factory=kind, metadata={"part": frozenset(only) if only else None}
    )

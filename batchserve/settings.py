"""Declaring settings: ``setting(...)`` fields in a component's own frozen dataclass, and
``part(...)`` fields that compose components into a command's tree (see config.py, which
reads them from flags, ``BATCHSERVE_*`` variables and TOML).

A dataclass with a ``setting(...)`` field checks the bounds of its settings whenever it is
constructed, however it is built (from flags, in code, or by ``dataclasses.replace``), and
with the same ConfigError a user gets for a flag; its own ``__post_init__``, if it has one,
runs after that check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
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
    flat name (flag, variable, TOML key) differs from the field's. Its class checks the
    bounds on construction."""
    meta = Meta(help, name, choices, at_least, at_most, above)
    declared = dataclasses.field(default=default, metadata={"setting": meta})
    # dataclasses.field always makes a plain Field; ours adds only the hook that makes its
    # class check its settings (same slots, so the object is the same but for that hook).
    declared.__class__ = _SettingField
    return declared


class _SettingField(dataclasses.Field[Any]):
    """A setting's Field: when the class that declares it is made (before ``@dataclass``
    reads the class), it gives the class a ``__post_init__`` that checks its settings."""

    __slots__ = ()

    def __set_name__(self, owner: type, name: str) -> None:
        # Field's own __set_name__ only forwards to a default that is a descriptor; a
        # setting's default is a plain value.
        _check_on_construction(owner)


#: Set on a class once its ``__post_init__`` checks its settings.
_CHECKS_SETTINGS = "__batchserve_checks_settings__"


def _check_on_construction(cls: type) -> None:
    """Give ``cls`` a ``__post_init__`` that checks the bounds of its settings, then runs
    the one ``cls`` declares (or inherits)."""
    if _CHECKS_SETTINGS in vars(cls):
        return
    own: Callable[[Any], None] | None = vars(cls).get("__post_init__")

    def checked_post_init(self: Any) -> None:
        check_fields(self)
        if own is not None:
            own(self)
            return
        inherited = getattr(super(cls, self), "__post_init__", None)
        if inherited is not None:
            inherited()

    checked_post_init.__name__ = "__post_init__"
    checked_post_init.__qualname__ = f"{cls.__qualname__}.__post_init__"
    checked_post_init.__doc__ = own.__doc__ if own is not None else None
    setattr(cls, "__post_init__", checked_post_init)  # noqa: B010 (mypy: not on type)
    setattr(cls, _CHECKS_SETTINGS, True)


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


def check_fields(obj: Any) -> None:
    """Check every setting of the dataclass ``obj`` (not of its parts), in declaration
    order: ConfigError naming the first out of its bounds."""
    for f in dataclasses.fields(obj):
        if "setting" in f.metadata:
            meta: Meta = f.metadata["setting"]
            check_value(meta.name or f.name, meta, getattr(obj, f.name))


def part(kind: type, only: Sequence[str] | None = None) -> Any:
    """A dataclass field holding a component's settings; ``only``: the flat names of those
    this command uses (the others keep their defaults and are not shown)."""
    return dataclasses.field(
        default_factory=kind, metadata={"part": frozenset(only) if only else None}
    )

"""A shared catalog out of reach, as a replica says it: reachable or not and why, in a few
words that name no address (``/readyz``), from the driver's words (for the log)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchserve.errors import NotReady


@dataclass(frozen=True)
class CatalogHealth:
    """A shared catalog as this replica last found it: ``reachable``, or not and ``reason``,
    a few words on why (as /readyz says it; the database's address stays in the log)."""

    reachable: bool
    reason: str | None = None


@dataclass(frozen=True)
class Outage:
    """A shared catalog out of reach: the error that found it so (raised again for what
    cannot be answered without it) and why, in a few words. One object, so that the reactor
    thread reads both in one attribute read while the store thread replaces it."""

    error: NotReady
    reason: str


#: The driver's words, as a catalog's error carries them in its ``detail`` (for the log: it
#: names the database's address too), and the few words /readyz says instead.
_NUMBER = r"(\d+(?:\.\d+)?)"
_REASONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"no answer from the server within {_NUMBER} s"), "no answer within {0} s"),
    (re.compile(r"connection refused", re.IGNORECASE), "connection refused"),
    (re.compile(r"the database system is (\w+ \w+)"), "the database is {0}"),
    (re.compile(r"closed the connection|terminating connection"), "connection lost"),
    (re.compile(rf"couldn't get a connection after {_NUMBER} sec"), "no connection within {0} s"),
]


def few_words(detail: str) -> str | None:
    """Why a shared catalog is out of reach, in a few words without its address, from the
    driver's words in ``detail``: "no answer within 7 s" (stopped or hung), "connection
    refused" (down), "no connection within 2 s"...; None when the words are not known."""
    for pattern, reason in _REASONS:
        found = pattern.search(detail)
        if found is not None:
            return reason.format(*(_tidy(g) for g in found.groups()))
    return None


def _tidy(word: str) -> str:
    """A number as short as it goes ("2.00" -> "2"); other words as they are."""
    return f"{float(word):g}" if re.fullmatch(_NUMBER, word) else word

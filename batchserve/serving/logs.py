"""The server's log: Twisted's logging system, filtered by level, written as text lines or
JSON lines with one timestamp each; one access line per request; TensorFlow's start-up
noise kept out below the debug level.

An access event carries its fields (``ACCESS_FIELDS``) as event keys, so a JSON line has
them as keys and a text line reads as a sentence.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import provider

from batchserve.models.compiled import ABSL_PREAMBLE, NATIVE_LINE, quiet_tensorflow

ACCESS_NAMESPACE = "batchserve.access"
ACCESS_FIELDS = (
    "request_id",
    "method",
    "route",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "latency_ms",
    "images",
    "batch_size",
    "client",
)
ACCESS_FORMAT = (
    "{method} {path} {status} {latency_ms}ms in={bytes_in}B out={bytes_out}B "
    "images={images} batch={batch_size} client={client} id={request_id}"
)
#: A request id a client may choose: printable, no spaces, at most 128 characters.
_CLIENT_ID = re.compile(r"[!-~]{1,128}")

access = Logger(namespace=ACCESS_NAMESPACE)


#: A made request id is a count hashed with this process's random key: unique as a random
#: id is, telling nothing of how many requests came before, at a fifth of uuid4's cost
#: (a flood of refusals makes one for each).
_ID_KEY = secrets.token_bytes(16)
_ID_COUNT = itertools.count()


def request_id(header: bytes | None) -> str:
    """The client's ``X-Request-Id`` when it is a sane one, else a new id (32 hex digits)."""
    if header:
        text = header.decode("latin-1")
        if _CLIENT_ID.fullmatch(text):
            return text
    count = next(_ID_COUNT).to_bytes(8, "little")
    return hashlib.blake2b(count, key=_ID_KEY, digest_size=16).hexdigest()


def log_access(fields: dict[str, Any]) -> None:
    # The line is formatted here by str.format (in C); Twisted's own formatting of eleven
    # fields, in Python, was a sixth of the reactor's time per request in a flood.
    access.info("{access_line}", access_line=ACCESS_FORMAT.format(**fields), **fields)


def _time(event: LogEvent) -> str:
    moment = datetime.fromtimestamp(event.get("log_time", time.time()), tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _level(event: LogEvent) -> str:
    return str(getattr(event.get("log_level"), "name", "info"))


def _message(event: LogEvent) -> str:
    # An access line is formatted already (log_access): Twisted's formatting of its one
    # field, in Python, was a fifth of an access line's cost.
    text = event.get("access_line") or formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def text_observer(out: IO[str], process: str = "") -> ILogObserver:
    """``time level namespace: message``, one line per event (a traceback indented);
    with ``process`` (a server of several processes: ``core``, ``edge-1`` ...), ``time
    level [process] namespace: message``."""
    tag = f"[{process}] " if process else ""

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        namespace = event.get("log_namespace", "-")
        message = _message(event).replace("\n", "\n    ")
        out.write(f"{_time(event)} {_level(event):<5} {tag}{namespace}: {message}\n")

    return observe  # type: ignore[no-any-return]  # zope's @provider is untyped


def json_observer(out: IO[str], process: str = "") -> ILogObserver:
    """One JSON object per line: time, level, logger, message, and an access event's
    fields as keys of their own; with ``process``, a ``process`` key naming it."""

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        line: dict[str, Any] = {
            "time": _time(event),
            "level": _level(event),
            "logger": event.get("log_namespace", "-"),
            "message": _message(event),
        }
        if process:
            line["process"] = process
        if line["logger"] == ACCESS_NAMESPACE:
            line.update({key: event.get(key) for key in ACCESS_FIELDS})
        out.write(orjson.dumps(line, default=str).decode() + "\n")

    return observe  # type: ignore[no-any-return]  # zope's @provider is untyped


OBSERVERS: dict[str, Callable[[IO[str], str], ILogObserver]] = {
    "text": text_observer,
    "json": json_observer,
}


#: Twisted's own chatter (ports opening and closing, the main loop's end), below warnings
#: kept out of the log unless it is at debug.
QUIET_NAMESPACES = ("twisted", "log_legacy")


def filtered(observer: ILogObserver, level_name: str) -> ILogObserver:
    """``observer`` seeing only events at ``level_name`` (debug ... critical) and above;
    below debug, Twisted's internals only from warnings up."""
    level = LogLevel.levelWithName(level_name)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    if level != LogLevel.debug:
        for namespace in QUIET_NAMESPACES:
            predicate.setLogLevelForNamespace(namespace, max(level, LogLevel.warn))
    return FilteringLogObserver(observer, [predicate])


def start_logging(level_name: str, log_format: str, process: str = "") -> None:
    """Send Twisted's log (and Python's ``logging``, which TensorFlow and Keras use) to
    stderr as ``log_format`` lines from ``level_name`` up. Below debug, what native code
    writes to stderr (TensorFlow's C++ start-up lines) becomes log events too, so that every
    line of a JSON log is JSON; at debug it is written as it comes."""
    quiet_framework_logs(level_name)
    out = sys.stderr if level_name == "debug" else capture_native_stderr()
    observer = filtered(OBSERVERS[log_format](out, process), level_name)
    logging.getLogger().addHandler(TwistedHandler())
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def quiet_framework_logs(level_name: str) -> None:
    """Below debug, TensorFlow's C++ start-up lines (CPU features, plugins) stay out of the
    log, and its (and the catalog pool's) Python loggers say only errors. Must run before
    TensorFlow is imported."""
    if level_name == "debug":
        return
    quiet_tensorflow(os.environ)
    for name in ("tensorflow", "absl", "keras", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # A shared catalog's pool warns at every reconnect try; the follower logs an outage once.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


#: Python's logging levels as Twisted's.
_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


_NATIVE_LEVELS = {
    "I": LogLevel.debug,
    "W": LogLevel.warn,
    "E": LogLevel.error,
    "F": LogLevel.critical,
}
native = Logger(namespace="native")


def capture_native_stderr() -> IO[str]:
    """Point file descriptor 2 at a pipe whose lines a thread turns into log events, and
    return a stream on the original stderr for the log's own lines. Python's own
    ``sys.stderr`` keeps writing to the original (a last message before exit is never
    stuck in the pipe); at exit the pipe is closed and what it holds is logged."""
    original = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stderr = original
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    reader = threading.Thread(
        target=_log_native_lines, args=(read_end,), name="batchserve-stderr", daemon=True
    )
    reader.start()
    atexit.register(_drain_native, reader)
    return original


def _drain_native(reader: threading.Thread) -> None:
    os.close(2)  # the pipe's last writer: the reader sees the end once it has read the rest
    reader.join(timeout=1.0)


def _log_native_lines(read_end: int) -> None:
    with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            log_native_line(line.rstrip("\n"))


def log_native_line(line: str) -> None:
    """One line native code wrote to stderr, as a log event: absl's info lines at debug
    level, its warnings and errors at theirs, anything else as a warning."""
    if not line.strip():
        return
    found = NATIVE_LINE.fullmatch(line)
    if found:
        level, where, text = found.groups()
        native.emit(_NATIVE_LEVELS[level], "{text} ({where})", text=text, where=where)
    elif line.startswith(ABSL_PREAMBLE):
        native.debug("{text}", text=line)
    else:
        native.warn("{text}", text=line)


class TwistedHandler(logging.Handler):
    """Python ``logging`` records into Twisted's log, under the logger's name."""

    def emit(self, record: logging.LogRecord) -> None:
        level = _LEVELS.get(record.levelno, LogLevel.info)
        Logger(namespace=record.name).emit(level, "{text}", text=record.getMessage())

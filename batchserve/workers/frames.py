"""The control channel between an edge process and the core: length-prefixed frames over a
Unix socket, each a request, its answer, or a one-way notice.

A frame is ``(kind, call, name, body)`` pickled with protocol 5: ``kind`` is ``"call"``,
``"done"``, ``"failed"`` or ``"tell"``; ``call`` numbers a request and its answer; ``name``
says what is asked. Bodies are small: tasks, slot numbers, embeddings, matches, items.
Images never travel here: they are in shared memory (``serving/slots.py``). Not AMP: it
caps a value at 64 KiB where the answer of a request of 64 images (their embeddings) is
330 KiB, and its boxes are parsed in Python where pickle's are read in C.

Only the core and its edges speak on the socket, which lies in a folder only the server's
user can open; still, a frame is read by an unpickler that makes only plain data, numpy
arrays and batchserve's own records and errors, never an arbitrary callable.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import itertools
import pickle
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from batchserve import errors
from batchserve.errors import BatchserveError, NotReady

log = Logger(namespace="batchserve.workers")

#: Beside batchserve's own records (dataclasses and enums), what a frame may hold.
_ALLOWED = {
    ("builtins", name) for name in ("set", "frozenset", "complex", "bytearray", "slice", "range")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("pathlib", "PosixPath"),
    ("pathlib._local", "PosixPath"),
}

#: Frames longer than this are refused (a corrupt length prefix, not a real answer).
MAX_FRAME_BYTES = 256 * 2**20


class Refused(pickle.UnpicklingError):
    """A frame named a class that is not plain data."""


#: What ``find_class`` allowed so far, by (module, name): every frame names the same few
#: classes, and the checks below (an import, a class's checks) cost more than the lookup.
_FOUND: dict[tuple[str, str], Any] = {}


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _FOUND.get((module, name))
        if found is None:
            found = _FOUND[module, name] = self._allowed(module, name)
        return found

    def _allowed(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module.startswith("batchserve.") and "." not in name:
            found = super().find_class(module, name)
            if (
                isinstance(found, type)
                and found.__module__ == module
                and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))
            ):
                return found
        raise Refused(f"a control frame may not hold {module}.{name}")


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=5)


def loads(data: bytes) -> Any:
    return _DataUnpickler(io.BytesIO(data)).load()


def error_body(failure: Failure) -> tuple[str, str, float | None, str]:
    """A failure as it crosses the channel: the class in ``batchserve.errors`` it is (a
    subclass of a lower layer, such as the PostgreSQL catalog's ``CatalogUnavailable``, as
    the error it extends), its message, Retry-After and code; anything else as an internal
    error."""
    error = failure.value
    if isinstance(error, BatchserveError):
        kind = next(k for k in type(error).__mro__ if k.__module__ == errors.__name__)
        retry = getattr(error, "retry_after_s", None)
        return kind.__name__, str(error), retry, error.code
    return "InternalError", f"{type(error).__name__}: {error}", None, errors.InternalError.code


def error_from(body: tuple[str, str, float | None, str]) -> Exception:
    """The exception ``error_body`` described, rebuilt on this side, with its code."""
    name, message, retry_after_s, code = body
    kind = getattr(errors, name, None)
    if not (isinstance(kind, type) and issubclass(kind, BatchserveError)):
        return errors.InternalError(message)
    error: BatchserveError = kind(message)
    if retry_after_s is not None:
        error.retry_after_s = retry_after_s  # type: ignore[attr-defined]
    error.code = code
    return error


class ChannelProtocol(Int32StringReceiver):
    """Both ends of the control channel: ``ask`` sends a request and returns a Deferred of
    its answer; a request that comes in goes to ``answer(name, body)`` (return a value or a
    Deferred) and a notice to ``heard(name, body)``. Cancelling an ``ask``'s Deferred sends
    a ``cancel`` notice naming its call. When the channel closes, every unanswered ``ask``
    fails with NotReady."""

    MAX_LENGTH = MAX_FRAME_BYTES

    def __init__(self) -> None:
        self._calls = itertools.count(1)
        self._waiting: dict[int, tuple[Deferred[Any], Callable[[], None] | None]] = {}
        #: Requests this side is answering, by call: cancelled on a ``cancel`` notice.
        self._answering: dict[int, Deferred[Any]] = {}
        self.closed = False

    # -- sending ------------------------------------------------------------------------

    def ask(
        self, name: str, body: Any = None, settled: Callable[[], None] | None = None
    ) -> Deferred[Any]:
        """Send request ``name``; its answer. ``settled`` runs once the other side is done
        with the request: when its answer comes (also after the Deferred was cancelled) or
        the channel closes, whichever is first."""
        if self.closed:
            if settled is not None:
                settled()
            return fail(NotReady("the model core is not reachable; retry shortly"))
        call = next(self._calls)
        d: Deferred[Any] = Deferred(lambda _d: self._cancel(call))
        self._waiting[call] = (d, settled)
        self.sendString(dumps(("call", call, name, body)))
        return d

    def tell(self, name: str, body: Any = None) -> None:
        if not self.closed:
            self.sendString(dumps(("tell", 0, name, body)))

    def _cancel(self, call: int) -> None:
        # The answer still comes (a failure): until then the other side may use what the
        # request shared, so the caller's own clean-up waits for it (see EdgeQueue).
        self.tell("cancel", call)

    # -- receiving ----------------------------------------------------------------------

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted API)
        kind, call, name, body = loads(string)
        if kind == "call":
            self._start_answer(call, name, body)
        elif kind == "tell":
            if name == "cancel":
                answering = self._answering.get(body)
                if answering is not None:
                    answering.cancel()
            else:
                self.heard(name, body)
        else:
            waiting, settled = self._waiting.pop(call, (None, None))
            if settled is not None:
                _run_settled(settled)
            if waiting is None or waiting.called:
                return
            if kind == "done":
                waiting.callback(body)
            else:
                waiting.errback(Failure(error_from(body)))

    def _start_answer(self, call: int, name: str, body: Any) -> None:
        try:
            result = self.answer(name, body)
        except Exception:
            self._reply(call, Failure())
            return
        if not isinstance(result, Deferred):
            self._reply(call, result)
            return
        self._answering[call] = result
        result.addBoth(self._answered, call)

    def _answered(self, result: Any, call: int) -> None:
        self._answering.pop(call, None)
        self._reply(call, result)

    def _reply(self, call: int, result: Any) -> None:
        if self.closed:
            return
        if isinstance(result, Failure):
            self.sendString(dumps(("failed", call, "", error_body(result))))
            return
        try:
            frame = dumps(("done", call, "", result))
        except Exception:  # an answer that cannot be framed is the request's error
            frame = dumps(("failed", call, "", error_body(Failure())))
        self.sendString(frame)

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802 (Twisted API)
        self.closed = True
        waiting, self._waiting = self._waiting, {}
        for d, settled in waiting.values():
            if settled is not None:
                _run_settled(settled)
            if not d.called:
                d.errback(Failure(NotReady("the model core went away; retry shortly")))
        answering, self._answering = self._answering, {}
        for d in answering.values():
            d.cancel()
        self.lost()

    # -- for the two ends ---------------------------------------------------------------

    def answer(self, name: str, body: Any) -> Any:
        raise NotImplementedError(name)

    def heard(self, name: str, body: Any) -> None:
        """A one-way notice from the other side (default: ignored)."""

    def lost(self) -> None:
        """The channel closed (default: nothing more)."""


def _run_settled(settled: Callable[[], None]) -> None:
    # A clean-up that fails must not stop the frame's answer from reaching its caller.
    try:
        settled()
    except Exception:
        log.failure("a request's clean-up failed")

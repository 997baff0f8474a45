"""The control channel's frames: what they may hold, and errors across it."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from batchserve.config import ServeSettings
from batchserve.errors import DeadlineExceeded, InternalError, Overloaded
from batchserve.serving.records import AddTask
from batchserve.workers import frames


def test_a_frame_that_names_a_callable_is_refused() -> None:
    with pytest.raises(frames.Refused, match=r"(posix|os)\.system"):
        frames.loads(pickle.dumps(os.system))


def test_a_frame_may_not_build_a_batchserve_class_that_is_not_a_record() -> None:
    from batchserve.serving.slots import Partition

    with pytest.raises(frames.Refused, match="Partition"):
        frames.loads(pickle.dumps(Partition))


def test_records_settings_and_arrays_cross_unchanged() -> None:
    task = AddTask("a", "cat", {"k": [1, 2]}, b"\xff\xd8", np.ones((2, 3), np.float32))
    back = frames.loads(frames.dumps(("call", 1, "submit", (0.5, [(3, (4,), task)]))))
    _kind, _call, _name, (_t, [(_slot, _views, crossed)]) = back
    assert crossed.id == "a" and crossed.metadata == {"k": [1, 2]}
    assert np.array_equal(crossed.views, task.views)
    assert frames.loads(frames.dumps(ServeSettings())) == ServeSettings()


def test_an_error_crosses_with_its_kind_message_and_retry_after() -> None:
    from twisted.python.failure import Failure

    crossed = frames.error_from(frames.error_body(Failure(Overloaded("full", retry_after_s=3))))
    assert isinstance(crossed, Overloaded) and str(crossed) == "full"
    assert crossed.retry_after_s == 3
    late = frames.error_from(frames.error_body(Failure(DeadlineExceeded("late"))))
    assert isinstance(late, DeadlineExceeded)
    bug = frames.error_from(frames.error_body(Failure(KeyError("x"))))
    assert isinstance(bug, InternalError) and "KeyError" in str(bug)


def test_a_lower_layers_error_crosses_as_the_error_it_extends_with_its_code() -> None:
    from twisted.python.failure import Failure

    from batchserve.errors import NotReady
    from batchserve.storage.postgres import CatalogUnavailable

    crossed = frames.error_from(frames.error_body(Failure(CatalogUnavailable("db at 10.0.0.1"))))
    assert isinstance(crossed, NotReady) and crossed.retry_after_s == 1
    assert crossed.code == "catalog_unavailable"
    assert str(crossed) == "the shared catalog is unavailable"  # the address stays behind


def test_a_frame_may_name_only_a_records_class_itself_not_its_attributes_or_instances() -> None:
    import io

    from batchserve.config import ServeSettings

    unpickler = frames._DataUnpickler(io.BytesIO(b""))
    assert unpickler.find_class("batchserve.config", "ServeSettings") is ServeSettings
    for module, name in [
        ("batchserve.serving.pipeline", "Job.images"),  # an attribute path (protocol 4)
        ("batchserve.workers.frames", "log"),  # an object, not a class
        ("batchserve.config", "ServerSettings.edge_count"),
        ("batchserve.serving.slots", "Partition"),  # a class, not a record
    ]:
        with pytest.raises(frames.Refused):
            unpickler.find_class(module, name)


def test_a_refused_class_stays_refused_after_allowed_ones_are_remembered() -> None:
    from batchserve.serving.slots import Partition

    task = AddTask("a", "cat", {}, b"", np.ones(2, np.float32))
    for _ in range(2):
        assert frames.loads(frames.dumps(task)).id == "a"
        with pytest.raises(frames.Refused, match="Partition"):
            frames.loads(pickle.dumps(Partition))
    assert ("batchserve.serving.records", "AddTask") in frames._FOUND
    assert all(name != "Partition" for _module, name in frames._FOUND)

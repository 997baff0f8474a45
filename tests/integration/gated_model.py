"""A tiny SavedModel whose every call waits at a gate the test opens and closes, and logs
the batch size it was called with. The server loads it like any user's SavedModel
(``--model DIR``); the test then decides when the model is busy, so queueing, deadlines
and draining can be observed from outside without depending on how fast the machine is.

The gate is a file: while it is absent, a call spins in the graph (a ``while_loop`` over
``tf.io.matching_files``), holding the inference thread; it returns once the file exists.
Each call first appends its batch size to the call log (``tf.print`` to a file).
"""

from __future__ import annotations

import time
from pathlib import Path

INPUT_SIZE = 32
DIM = 8


class GatedModel:
    """The model directory, its gate and its call log, all under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "gated-savedmodel"
        self.gate = directory / "gate-open"
        self.log = directory / "calls.log"

    def open(self) -> None:
        """Let every waiting and future call through."""
        self.gate.touch()

    def close(self) -> None:
        """Make every future call wait until ``open``."""
        self.gate.unlink(missing_ok=True)

    def calls(self) -> list[int]:
        """The padded batch size of every call the model has started, in order."""
        if not self.log.exists():
            return []
        return [int(line) for line in self.log.read_text().split()]

    def wait_for_calls(self, count: int, timeout_s: float = 60.0) -> list[int]:
        """Wait until the model has started ``count`` calls; return them all."""
        deadline = time.monotonic() + timeout_s
        while len(self.calls()) < count:
            assert time.monotonic() < deadline, f"the model started {self.calls()}"
            time.sleep(0.01)
        return self.calls()


def build_gated_model(directory: Path) -> GatedModel:
    """Write the SavedModel under ``directory`` with its gate open."""
    import tensorflow as tf

    model = GatedModel(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gate, log = str(model.gate), f"file://{model.log}"
    projection = tf.constant(
        [
            [1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.2, 1.0],
            [0.0, 1.0, 0.0, 0.5, 1.0, 0.3, 0.0, 1.0],
            [0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.7, 1.0],
        ]
    )

    def closed(i: tf.Tensor) -> tf.Tensor:
        # The pattern depends on the loop variable, so the glob cannot be hoisted out of
        # the loop: it runs on every iteration.
        pattern = tf.strings.join([gate, tf.strings.substr(tf.strings.as_string(i), 0, 0)])
        return tf.equal(tf.size(tf.io.matching_files(pattern)), 0)

    class Gated(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3])])
        def serve(self, pixels: tf.Tensor) -> dict[str, tf.Tensor]:
            logged = tf.print(tf.shape(pixels)[0], output_stream=log)
            with tf.control_dependencies([logged]):
                waited = tf.while_loop(closed, lambda i: [i + 1], [tf.constant(0)])
            with tf.control_dependencies(tf.nest.flatten(waited)):
                colour = tf.reduce_mean(pixels, axis=[1, 2]) / 255.0 + 0.01
            return {"embedding": colour @ projection}

    module = Gated()
    tf.saved_model.save(module, str(model.path), signatures={"serving_default": module.serve})
    model.open()
    return model

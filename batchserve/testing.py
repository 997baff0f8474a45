"""Fakes for testing batchserve and code built on it, without TensorFlow or threads."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Self, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed

from batchserve.batching import Batch
from batchserve.errors import InferenceFailed
from batchserve.inference import Prediction, run_batch
from batchserve.models import ModelInfo, ModelOutputs

In = TypeVar("In")


class FakeRunner(Generic[In]):
    """A BatchRunner that records every batch and answers only when the test says so."""

    def __init__(self) -> None:
        self.batches: list[Batch[In]] = []
        self.pending: list[tuple[Batch[In], Deferred[Sequence[Any]]]] = []

    @property
    def sizes(self) -> list[int]:
        """The size of every batch handed over, in order."""
        return [len(batch) for batch in self.batches]

    def run(self, batch: Batch[In]) -> Deferred[Sequence[Any]]:
        d: Deferred[Sequence[Any]] = Deferred()
        self.batches.append(batch)
        self.pending.append((batch, d))
        return d

    def complete(self, fn: Callable[[In], Any] = lambda payload: payload) -> Batch[In]:
        """Finish the oldest pending batch: each live item's result is ``fn(payload)``."""
        batch, d = self.pending.pop(0)
        live = set(batch.live_indices())
        d.callback([fn(p) if i in live else None for i, p in enumerate(batch.payloads)])
        return batch

    def fail(self, error: Exception) -> Batch[In]:
        """Fail the oldest pending batch with ``error``."""
        batch, d = self.pending.pop(0)
        d.errback(error)
        return batch


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Stands in for a thread pool (decode pool, index thread): runs ``f(*args)`` at once on
    the caller's thread."""
    return maybeDeferred(f, *args)


def result_of(d: Deferred[Any]) -> Any:
    """What ``d`` has fired with: its result, or the Failure; an AssertionError if it has not
    fired yet."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


class FakeModel:
    """An EmbeddingModel without TensorFlow: each image's embedding is a fixed random
    projection of its mean colour, unit-normalised; probabilities are a softmax over
    ``classes`` of another projection. Deterministic, and equal for equal images whatever
    the batch. Records the shape of every batch it is given."""

    def __init__(
        self,
        input_size: tuple[int, int] = (32, 32),
        dim: int = 8,
        classes: Sequence[str] | None = ("cat", "dog", "car"),
    ) -> None:
        rng = np.random.default_rng(0)
        self._project = rng.normal(size=(3, dim)).astype(np.float32)
        n_classes = len(classes) if classes else 0
        self._classify = rng.normal(size=(3, max(n_classes, 1))).astype(np.float32)
        self._info = ModelInfo(
            name="fake",
            source="fake",
            input_size=input_size,
            dim=dim,
            classes=list(classes) if classes else None,
            pretrained=False,
            weights_sha256="0" * 64,
        )
        self.batch_shapes: list[tuple[int, ...]] = []
        self.fail_next: BaseException | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    def predict(self, images: npt.NDArray[np.uint8]) -> ModelOutputs:
        self.batch_shapes.append(images.shape)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        colour = images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32) / 255.0
        features = colour @ self._project + 1e-3
        embeddings = features / np.linalg.norm(features, axis=1, keepdims=True)
        probabilities = None
        if self._info.classes:
            logits = colour @ self._classify
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return ModelOutputs(embeddings.astype(np.float32), probabilities)


class SyncModelRunner:
    """A BatchRunner that runs the model at once on the calling thread, with the same
    padding and skipping as the inference thread. Records batch sizes."""

    def __init__(self, model: FakeModel, sizes: Sequence[int] = (1, 2, 4, 8)) -> None:
        self.model = model
        self.sizes = list(sizes)
        self.batch_sizes: list[int] = []
        self.ready = True

    @property
    def info(self) -> ModelInfo:
        return self.model.info

    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]:
        self.batch_sizes.append(len(batch))
        try:
            return succeed(run_batch(self.model, batch, self.sizes))
        except Exception as e:
            return fail(InferenceFailed(f"model failed on a batch: {e!r}"))


def encode_image(
    array: npt.NDArray[np.uint8] | None = None,
    fmt: str = "JPEG",
    size: tuple[int, int] = (64, 48),
    colour: tuple[int, int, int] = (200, 30, 30),
    mode: str = "RGB",
    **save_args: Any,
) -> bytes:
    """An encoded image: ``array`` (uint8 HxWx3) or a solid ``colour`` of ``size`` (w, h)."""
    image = Image.fromarray(array) if array is not None else Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **save_args)
    return out.getvalue()


def encode_multipart(
    files: Sequence[tuple[str, str, bytes]],
    fields: dict[str, str] | None = None,
    boundary: str = "batchserve-test-boundary",
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type. ``files``: (field, filename, data)."""
    crlf = b"\r\n"
    parts: list[bytes] = []
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + crlf
        )
    for name, filename, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + crlf
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class ServerProcess:
    """A ``batchserve serve`` process on 127.0.0.1 and a free port, for integration tests
    and benchmarks. ``start`` returns once ``/readyz`` answers 200; ``ready_s`` is the
    time from process start to ready."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, port: int, ready_s: float, log_path: Path
    ) -> None:
        self.process = process
        self.url = url
        self.port = port
        self.ready_s = ready_s
        self.log_path = log_path

    @classmethod
    def start(
        cls,
        directory: Path,
        args: Sequence[str] = (),
        timeout_s: float = 300.0,
        env: Mapping[str, str] | None = None,
    ) -> Self:
        """Start the server with its data dir and log under ``directory``. Its environment
        is this process's without any ``BATCHSERVE_*`` variable, plus ``env``."""
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / "server.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("BATCHSERVE_")}
        environ.update(env or {})
        started = time.monotonic()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "batchserve.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--data-dir",
                    str(directory / "data"),
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environ,
            )
        port = None
        while time.monotonic() - started < timeout_s and process.poll() is None:
            if port is None:
                found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
                port = int(found.group(1)) if found else None
            elif _status(f"http://127.0.0.1:{port}/readyz") == 200:
                url = f"http://127.0.0.1:{port}"
                return cls(process, url, port, time.monotonic() - started, log_path)
            time.sleep(0.05)
        process.kill()
        process.wait()
        raise RuntimeError("server did not become ready:\n" + log_path.read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; return the exit status."""
        return stop_process(self.process, timeout_s)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """Stop ``process`` as an orchestrator would: SIGTERM, then SIGKILL after
    ``timeout_s``. Returns its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


#: Classes of ``write_class_folders``: crops of texture photos scikit-image ships, and
#: synthetic patterns.
PATTERN_CLASSES = ("brick", "grass", "gravel", "stripes", "checkers")


def pattern_image(kind: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """One image of class ``kind``: a random crop of the texture photo, or a random
    instance of the pattern (angle, frequency, colours), flipped and lit at random."""
    if kind in ("brick", "grass", "gravel"):
        from skimage import data

        photo = np.asarray(getattr(data, kind)())
        side = int(min(photo.shape[:2]) * rng.uniform(0.3, 0.7))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        image = Image.fromarray(photo[top : top + side, left : left + side]).convert("RGB")
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    else:
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if kind == "stripes":
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(8, 24)
            phase = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
            mix = (phase > 0).astype(np.float64)
        elif kind == "checkers":
            cell = rng.uniform(8, 24)
            mix = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float64)
        else:
            raise ValueError(f"unknown pattern class {kind!r}")
        pixels = mix[..., None] * a + (1 - mix[..., None]) * b
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.8, 1.2)
    lit = np.clip(np.asarray(image, dtype=np.float64) * gain, 0, 255).astype(np.uint8)
    return Image.fromarray(lit)


def write_class_folders(
    root: Path, per_class: int, seed: int = 0, classes: Sequence[str] = PATTERN_CLASSES
) -> dict[str, list[Path]]:
    """``root/<class>/<n>.jpg``: ``per_class`` images of each class, different per seed."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        written[kind] = []
        for i in range(per_class):
            path = folder / f"{seed}-{i}.jpg"
            pattern_image(kind, rng).save(path, format="JPEG", quality=90)
            written[kind].append(path)
    return written

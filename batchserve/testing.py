"""In-memory fakes for testing batchserve and code built on it: a model, runners, a Site
client, inline threads, encoded images. No TensorFlow, no sockets, no threads, no files."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from batchserve.errors import InferenceFailed
from batchserve.models.batches import Prediction
from batchserve.models.spec import LEGACY_EMBEDDING, ModelInfo, ModelOutputs
from batchserve.models.views import recipe
from batchserve.serving.batching import Batch
from batchserve.serving.inference import run_batch
from batchserve.serving.threads import Threads

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


def _views(crops: bool, grey: bool) -> dict[str, Any]:
    return {"views": views} if (views := recipe(crops, grey)) else {}


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
        crop_views: bool = False,
        grey_view: bool = False,
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
            trained_on="nothing: a deterministic stand-in for tests",
            embedding={**LEGACY_EMBEDDING, **_views(crop_views, grey_view)},
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
    """The model's thread as the server drives it (a ``ModelWorker``), running each batch
    at once on the calling thread with the same padding and skipping as the inference
    thread. Records batch sizes. ``loaded=False``: no model until ``start()``."""

    def __init__(
        self, model: FakeModel, sizes: Sequence[int] = (1, 2, 4, 8), loaded: bool = True
    ) -> None:
        self.model = model
        self.sizes = list(sizes)
        self.batch_sizes: list[int] = []
        self.ready = loaded

    @property
    def info(self) -> ModelInfo | None:
        return self.model.info if self.ready else None

    def start(self) -> Deferred[ModelInfo]:
        self.ready = True
        return succeed(self.model.info)

    def stop(self, timeout_s: float = 30.0) -> None:
        self.ready = False

    def run(self, batch: Batch[npt.NDArray[np.uint8]]) -> Deferred[Sequence[Prediction | None]]:
        self.batch_sizes.append(len(batch))
        try:
            return succeed(run_batch(self.model, batch, self.sizes))
        except Exception as e:
            return fail(InferenceFailed(f"model failed on a batch: {e!r}"))


@dataclass
class Response:
    """An HTTP response: status, headers (lower-case names, last value wins), body."""

    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class SiteClient:
    """Speaks HTTP/1.0 to a ``Site`` over in-memory transports: the server's whole HTTP
    stack (its request factory, refusals from headers, body limits, Klein routes) with no
    socket and no reactor. ``request`` returns a Deferred that ``flush()`` fires once the
    server has finished the response; cancelling it hangs up."""

    def __init__(self, site: Site) -> None:
        self._site = site
        self._open: list[tuple[StringTransport, Deferred[Response]]] = []

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> Deferred[Response]:
        head = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(body)}")
        address = IPv4Address("TCP", "127.0.0.1", 8080)
        protocol = self._site.buildProtocol(address)
        assert protocol is not None
        transport = StringTransport(address, IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)

        def hang_up(_d: Deferred[Response]) -> None:
            protocol.connectionLost(Failure(ConnectionDone("the client hung up")))

        d: Deferred[Response] = Deferred(hang_up)
        self._open.append((transport, d))
        protocol.dataReceived(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        self.flush()
        return d

    def flush(self) -> None:
        """Fire the Deferred of every response the server has finished."""
        still_open = []
        for transport, d in self._open:
            if d.called:
                continue
            if transport.disconnecting:
                d.callback(_parse_response(transport.value()))
            else:
                still_open.append((transport, d))
        self._open = still_open


def _parse_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status.split()[1]), headers, body)


def inline_threads() -> Threads:
    """Threads that run every job at once on the calling thread."""
    return Threads(decode=run_now, store=run_now)


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

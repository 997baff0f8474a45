"""A data dir: where its store lives and on which catalog (``StoreSettings``), the lock that
lets one process at a time use it, and the id it gives its replica in a shared catalog."""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from batchserve.errors import ConfigError
from batchserve.settings import setting
from batchserve.storage.catalog import Catalog


@dataclass(frozen=True)
class StoreSettings:
    """Where items live and how often the index is written down. Times in seconds."""

    data_dir: str = setting("data", "directory for the catalog and index snapshots")
    snapshot_interval_s: float = setting(
        300.0,
        "seconds between index snapshots (only when something changed; also at exit)",
        above=0,
    )
    demo: bool = setting(
        True, "on a first start with an empty data dir, index the sample photos shipped"
    )
    catalog: str = setting(
        "sqlite",
        "where items live: 'sqlite' (the embedded catalog in the data dir), or a "
        "postgresql://user@host:port/db URL that several replicas share",
    )
    follow_interval_s: float = setting(
        1.0,
        "with a shared catalog, seconds between polls of its change log (a change is also "
        "announced at once by LISTEN/NOTIFY)",
        above=0,
    )
    change_log_retention_s: float = setting(
        3600.0,
        "with a shared catalog, seconds a change stays in its log at least (keep it above "
        "--snapshot-interval-s); older changes that every live replica has applied are pruned, "
        "and a replica whose snapshot is older than the log rebuilds its index from the catalog",
        at_least=0,
    )
    replica_expiry_s: float = setting(
        86400.0,
        "with a shared catalog, seconds after which a replica not heard from (stopped, or cut "
        "off) no longer holds back the pruning of its change log",
        above=0,
    )

    def __post_init__(self) -> None:
        if self.catalog != "sqlite" and not self.shared_catalog:
            raise ConfigError(
                f"catalog must be 'sqlite' or a postgresql:// URL, got {self.catalog!r}"
            )

    @property
    def shared_catalog(self) -> bool:
        return self.catalog.startswith(("postgresql://", "postgres://"))

    def open_catalog(self, dim: int, views: int = 0) -> Catalog | None:
        """The catalog these settings name: None for the data dir's own SQLite catalog."""
        if not self.shared_catalog:
            return None
        try:
            from batchserve.storage.postgres import PostgresCatalog
        except ImportError as e:
            raise ConfigError(
                "a postgresql:// catalog needs the postgres extra: in a clone, "
                ".venv/bin/pip install -e '.[postgres]'; else pip install 'batchserve[postgres]'"
            ) from e
        return PostgresCatalog(
            self.catalog,
            dim,
            views,
            change_log_retention_s=self.change_log_retention_s,
            replica_expiry_s=self.replica_expiry_s,
        )


def open_as_made(settings: StoreSettings) -> Catalog:
    """The catalog of an existing data dir (or a shared catalog) opened as its model made
    it, its dim and item views read from the fingerprint it records: for jobs that read
    what is stored without loading the model. ConfigError when there is none yet."""
    from batchserve.models import views
    from batchserve.storage.sqlite import SqliteCatalog

    path = Path(settings.data_dir) / "catalog.sqlite3"
    if not settings.shared_catalog and not path.exists():
        raise ConfigError(f"{settings.data_dir} holds no catalog: serve or index into it first")
    probe = settings.open_catalog(1) or SqliteCatalog(path, 1)
    try:
        recorded = probe.get_meta("model")
    finally:
        probe.close()
    if recorded is None:
        raise ConfigError(f"the catalog of {settings.data_dir} holds no items yet")
    fingerprint = json.loads(recorded)
    per_item = views.count(fingerprint.get("embedding", {}).get("views") or {})
    dim = int(fingerprint["dim"])
    return settings.open_catalog(dim, per_item) or SqliteCatalog(path, dim, per_item)


class DataDirLocked(ConfigError):
    code = "data_dir_locked"


def lock_data_dir(data_dir: Path) -> int:
    """Take the data dir's exclusive lock (one server or indexer at a time); return the fd,
    held until the process exits."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"process {holder}" if holder.isdigit() else "another batchserve process"
        raise DataDirLocked(
            f"{data_dir} is in use by {who} (a server or an indexer): stop it, or pass "
            "another --data-dir"
        ) from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # named to whoever finds it locked
    return fd


def remove_if_untouched(data_dir: Path) -> bool:
    """Remove ``data_dir`` when it holds nothing but its lock (a start that failed before
    it wrote anything: a model that did not load); whether it was removed."""
    try:
        if [p.name for p in data_dir.iterdir()] != ["lock"]:
            return False
        (data_dir / "lock").unlink()
        data_dir.rmdir()
    except OSError:
        return False
    return True


def replica_id(data_dir: Path) -> str:
    """The id of the replica whose data dir is ``data_dir``: made once, kept in the dir."""
    path = data_dir / "replica-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    made = uuid.uuid4().hex
    tmp = path.with_name(path.name + ".tmp")
    with open(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "w") as f:
        f.write(made + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return made

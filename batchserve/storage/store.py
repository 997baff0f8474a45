"""The item store: the catalog, the vector index and the filter maps kept in step.

Everything here runs on the index thread, one call at a time, so neither FAISS nor SQLite
needs a lock. A batch of searches is ONE index search per distinct filter (one in total
when no query filters); a batch of adds is one SQLite transaction and one index add.
Snapshots of the index are written atomically and loaded at start; the catalog's change
log brings a snapshot up to date, or the index is rebuilt from the catalog. A log pruned past
what the index applied (a snapshot older than its oldest change, a replica away past its
expiry) is never replayed with its gap: the index is rebuilt from the catalog's items.

With a shared catalog (PostgreSQL), the store keeps in memory the record of every item its
index holds, so that searches and reads by id go on while the catalog is out of reach;
writes, listings, thumbnails and similar-item searches (which read the stored vector) need
the catalog, and fail with its NotReady (HTTP 503, Retry-After) meanwhile. Once a call has
found it out of reach, writes are refused at once, without waiting on it again, until the
follower's next pass (``catch_up``) finds it back; ``catalog_health`` says which, and why.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from batchserve.errors import NotReady
from batchserve.models.spec import ModelInfo
from batchserve.models.views import VIEW_WEIGHT
from batchserve.storage.catalog import Catalog, ChangeLogPruned, row_shape
from batchserve.storage.data_dir import StoreSettings, replica_id
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.outage import CatalogHealth, Outage
from batchserve.storage.records import Item, Match, NewItem
from batchserve.storage.sqlite import SqliteCatalog
from batchserve.storage.viewed_index import ViewedIndex

log = logging.getLogger(__name__)

KEEP_SNAPSHOTS = 2


class SearchableIndex(Protocol):
    """What the store needs of an index (VectorIndex; tests hand in a counting one)."""

    dim: int
    #: Calls made into the index by kind ("search", "add", "remove").
    calls: Counter[str]

    @property
    def size(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def kind_in_use(self) -> str: ...

    @property
    def trained(self) -> bool: ...

    @property
    def device(self) -> str: ...

    def add(self, ids: Any, vectors: Any) -> None: ...

    def remove(self, ids: Any) -> None: ...

    def rebuild(self, ids: Any, vectors: Any) -> None: ...

    def needs_training(self) -> bool: ...

    def needs_rebuild(self) -> bool: ...

    def search(
        self, queries: Any, k: int, allowed: npt.NDArray[np.int64] | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...

    def write(self, path: Path) -> list[int]: ...

    def load(self, path: Path, tombstones: list[int], trained: bool) -> None: ...


@dataclass(frozen=True)
class SearchQuery:
    """One search: ``vector`` float32 [dim], unit norm. ``label`` and ``predicted_class``
    restrict the items searched; ``exclude`` leaves one item out (its own neighbours)."""

    vector: npt.NDArray[np.float32]
    k: int = 10
    min_score: float | None = None
    label: str | None = None
    predicted_class: str | None = None
    exclude: str | None = None


@dataclass
class OpenReport:
    """How the index was brought up at start."""

    snapshot_seq: int | None = None
    replayed: int = 0
    rebuilt: bool = False
    #: Rebuilt because the catalog's log was pruned past the snapshot (or while replaying).
    behind_horizon: bool = False
    seconds: float = 0.0
    skipped_snapshots: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChangeLogState:
    """With a shared catalog: this replica's id in the catalog's ``replicas`` table, the last
    change pruned from the log (all later ones are kept), and how many times this replica
    found the log pruned past what its index held, and rebuilt the index from the catalog."""

    replica_id: str
    pruned_seq: int
    rebuilt_behind_horizon: int


@dataclass(frozen=True)
class IndexState:
    """What the store holds now, as ``ItemStore.describe`` reports it: the index's kind
    as configured and the structure searched now (``flat`` until an IVF kind is trained),
    its live items, vectors per item (1 + item views), embedding length, device, and the
    labels in use; calls made into the index since the start, by kind; the catalog's
    durability as it reports it, its write transactions since it was opened, the last
    change of its log applied to the index and the changes not applied yet; with a shared
    catalog, how this replica stands with its log's pruning."""

    kind: str
    kind_in_use: str
    size: int
    vectors_per_item: int
    dim: int
    device: str
    labels: int
    search_calls: int
    add_calls: int
    remove_calls: int
    durability: Mapping[str, str]
    commits: int
    applied_seq: int
    behind: int
    change_log: ChangeLogState | None = None


class ItemStore:
    """Items, their vectors and filters, under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        index: SearchableIndex,
        fingerprint: dict[str, Any],
        catalog: Catalog | None = None,
        views: int = 0,
    ) -> None:
        self.data_dir = data_dir
        #: With crop views (``views`` per item), a ``views.ViewedIndex``.
        self.index = index
        self.views = views
        self.fingerprint = fingerprint
        self.catalog: Catalog = catalog or SqliteCatalog(
            data_dir / "catalog.sqlite3", index.dim, views
        )
        self.catalog.check_model(fingerprint)
        #: A catalog other processes write too (PostgreSQL): this index follows its change
        #: log, and keeps the items searches show in memory, so searches and reads by id go
        #: on without it.
        self.shared = self.catalog.shared
        self._items: dict[int, Item] = {}
        #: The row in ``_items`` of each id there.
        self._fids: dict[str, int] = {}
        #: With a shared catalog, the error that found it out of reach (and why): set when a
        #: call to it fails, cleared when ``catch_up`` (the follower, every interval) next
        #: succeeds. Meanwhile reads by id come from memory and writes are refused at once,
        #: not after a wait on the catalog that would hold the store thread, and the
        #: searches queued behind, for up to its bound each time.
        self._outage: Outage | None = None
        #: The change of the catalog up to which the index is current.
        self.applied_seq = 0
        self.snapshot_dir = data_dir / "snapshots"
        self.snapshot_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        #: This replica's record in the catalog of how far it has applied the change log.
        self.replica_id = replica_id(data_dir)
        #: Rebuilds from the catalog because its log was pruned past ``applied_seq``.
        self.rebuilt_behind_horizon = 0
        #: The index is being rebuilt from the catalog (at open, or behind the horizon).
        self.rebuilding = False
        self._by_label: dict[str, set[int]] = defaultdict(set)
        self._by_class: dict[str, set[int]] = defaultdict(set)
        self._groups: dict[int, tuple[str | None, str | None]] = {}
        self._snapshot_seq = 0

    # -- start ----------------------------------------------------------------------------

    def open(self) -> OpenReport:
        """Load the newest usable snapshot and replay the changes after it, or rebuild from
        the catalog (also when its log was pruned past the snapshot); either way the index
        is then current with the catalog."""
        started = time.perf_counter()
        report = OpenReport()
        rebuilds = self.rebuilt_behind_horizon
        if self._load_snapshot(report):
            self.catalog.record_replica(self.replica_id, self.applied_seq)
            report.replayed = self.catch_up()  # or rebuilds, if pruned past it meanwhile
        else:
            self._rebuild_from(self.catalog.last_seq())
        report.behind_horizon = self.rebuilt_behind_horizon != rebuilds
        if self._snapshot_seq == -1:
            report.rebuilt, report.replayed = True, 0
        self.maintain()
        report.seconds = time.perf_counter() - started
        return report

    def _load_snapshot(self, report: OpenReport) -> bool:
        """Load the newest usable snapshot that the catalog's log still follows; whether
        one was."""
        pruned = self.catalog.pruned_seq()
        for meta_path in sorted(self.snapshot_dir.glob("index-*.json"), reverse=True):
            try:
                meta = json.loads(meta_path.read_text())
                self._check_snapshot(meta)
                if int(meta["seq"]) < pruned:  # the older ones are older still
                    self._behind_horizon(f"snapshot {meta_path.name}", int(meta["seq"]), pruned)
                    return False
                fids = np.load(meta_path.with_suffix(".fids.npy"))
                self.index.load(
                    meta_path.with_suffix(".faiss"), meta["tombstones"], meta["trained"]
                )
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                report.skipped_snapshots.append(f"{meta_path.name}: {e}")
                continue
            report.snapshot_seq = self._snapshot_seq = self.applied_seq = int(meta["seq"])
            self._remember_rows([int(f) for f in fids])
            return True
        return False

    def _rebuild_from(self, seq: int) -> None:
        """Rebuild the index from the catalog's items, then apply its changes after ``seq``
        (read before the items: changes also in the items are harmless to apply)."""
        self.applied_seq = seq
        # Recorded first: the changes after ``seq`` are kept while the rebuild reads.
        self.catalog.record_replica(self.replica_id, seq)
        self.rebuilding = True  # read by /readyz on the reactor thread
        try:
            self._rebuild()
        finally:
            self.rebuilding = False
        self._snapshot_seq = -1  # no snapshot on disk holds this index: the next one is due
        self.catch_up()

    def _behind_horizon(self, what: str, seq: int, pruned: int) -> None:
        log.warning(
            "%s applied the change log up to change %d, but the log was pruned up to change "
            "%d: rebuilding the index from the catalog instead of replaying",
            what,
            seq,
            pruned,
        )
        self.rebuilt_behind_horizon += 1

    def _check_snapshot(self, meta: dict[str, Any]) -> None:
        if meta["fingerprint"] != self.fingerprint:
            raise ValueError("made with another model")
        if meta.get("view_weight") != self._view_weight():
            raise ValueError(f"item views weighed {meta.get('view_weight')}")
        if meta["kind"] != self.index_kind():
            raise ValueError(f"kind {meta['kind']}, configured {self.index_kind()}")

    def _view_weight(self) -> float | None:
        """How the index weighs item views (None without them): snapshots record it."""
        return VIEW_WEIGHT if self.views else None

    def index_kind(self) -> str:
        """The index kind configured, which snapshots record."""
        return self.index.kind

    @property
    def catalog_health(self) -> CatalogHealth | None:
        """With a shared catalog, whether the last calls found it reachable (and if not,
        why); None with the embedded one. Read from any thread."""
        if not self.shared:
            return None
        outage = self._outage  # one read: the store thread may replace it meanwhile
        return CatalogHealth(True) if outage is None else CatalogHealth(False, outage.reason)

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Calls on the catalog: one that fails with NotReady marks it out of reach (the
        first failure of an outage says why, until it is over)."""
        try:
            yield
        except NotReady as e:
            if self.shared and self._outage is None:
                self._outage = Outage(e, e.reason)
            raise

    def _refuse_writes_while_unreachable(self) -> None:
        """While a shared catalog is known to be out of reach, a write fails at once: its
        wait, on top of the one that found the outage, would hold the store thread (and
        the searches behind it) past the catalog's bound. The follower's next pass tries
        the catalog again."""
        outage = self._outage
        if outage is not None:
            raise outage.error.with_traceback(None)

    def catch_up(self, known: dict[int, NewItem] | None = None, limit: int = 10_000) -> int:
        """Apply the catalog's changes after ``applied_seq`` to the index (this process's own
        writes and, with a shared catalog, every other's); return how many. Idempotent: an
        add of an item already in the index, or a delete of one not in it, does nothing, so
        changes already reflected by a rebuild are harmless. ``known`` holds items this
        process just wrote, whose embeddings need not be read back."""
        applied = 0
        with self._reaching():
            while True:
                try:
                    changes = self.catalog.changes_since(self.applied_seq, limit)
                except ChangeLogPruned as e:
                    # Never replay a log with a gap: the items are the truth.
                    self._behind_horizon("the index", e.seq, e.pruned_seq)
                    self._rebuild_from(self.catalog.last_seq())
                    return applied
                if not changes:
                    break
                self._apply(changes, known or {})
                self.applied_seq = changes[-1][0]
                applied += len(changes)
                if len(changes) < limit:
                    break
        self._outage = None
        return applied

    def behind(self) -> int:
        """Changes in the catalog not yet in the index."""
        with self._reaching():
            return max(0, self.catalog.last_seq() - self.applied_seq)

    def prune_change_log(self) -> int:
        """With a shared catalog: record there how far this replica has applied its change
        log, then prune the changes that every live replica has applied and that are past
        the catalog's retention (a few short statements). The follower's periodic pass, on
        this thread; returns the changes pruned."""
        if not self.shared:
            return 0  # pruned as snapshots are written: this process alone reads the log
        with self._reaching():
            self.catalog.record_replica(self.replica_id, self.applied_seq)
            return self.catalog.prune_changes(self.applied_seq)

    def _apply(self, changes: Sequence[tuple[int, str, int]], known: dict[int, NewItem]) -> None:
        before = set(self._groups)
        alive = set(before)
        for _seq, op, fid in changes:
            if op == "add":
                alive.add(fid)
            else:
                alive.discard(fid)
        gone = sorted(before - alive)
        if gone:
            self._forget(gone)
            self.index.remove(np.array(gone, dtype=np.int64))
        new = sorted(alive - before)
        mine = [fid for fid in new if fid in known]
        if mine:
            vectors = np.stack([known[fid].vectors for fid in mine])
            self.index.add(np.array(mine, dtype=np.int64), vectors)
            self._remember_rows(mine)
        others = [fid for fid in new if fid not in known]
        added: list[int] = []
        for fids, vectors in self.catalog.vectors(others):  # rows deleted since: not there
            self.index.add(fids, vectors)
            added.extend(int(f) for f in fids)
        # Once the vectors' reader is done: a read inside its loop would take a second
        # pooled connection, which a hung server then makes a second wait of the bound.
        self._remember_rows(added)

    def _rebuild(self) -> None:
        chunks = list(self.catalog.vectors())
        if chunks:
            fids = np.concatenate([c[0] for c in chunks])
            vectors = np.concatenate([c[1] for c in chunks])
        else:
            fids = np.zeros(0, dtype=np.int64)
            vectors = np.zeros((0, *row_shape(self.index.dim, self.catalog.views)), np.float32)
        self.index.rebuild(fids, vectors)
        self._forget(list(self._groups))
        self._remember_rows([int(f) for f in fids])

    def _remember_rows(self, fids: Sequence[int]) -> None:
        """Record rows now in the index, with their label and class (and, with a shared
        catalog, the whole item) read from the catalog. A row deleted since is recorded
        without them: it is in the index until its delete, which follows, is applied."""
        if not fids:
            return
        if self.shared:
            items = self.catalog.items_by_fid(fids)
            self._items.update(items)
            self._fids.update((item.id, fid) for fid, item in items.items())
            rows = {fid: (item.label, item.predicted_class) for fid, item in items.items()}
        elif len(fids) > 1000:
            wanted = set(fids)
            rows = {f: (label, kl) for f, label, kl in self.catalog.groups() if f in wanted}
        else:
            found = self.catalog.items_by_fid(fids)
            rows = {fid: (item.label, item.predicted_class) for fid, item in found.items()}
        for fid in fids:
            self._remember(fid, *rows.get(fid, (None, None)))

    def maintain(self) -> bool:
        """Train an IVF index once enough vectors exist, or compact removed vectors away.
        Returns True when the index was rebuilt."""
        if self.index.needs_training() or self.index.needs_rebuild():
            self._rebuild()
            return True
        return False

    # -- writes ---------------------------------------------------------------------------

    def add(self, items: Sequence[NewItem]) -> list[str]:
        """Add or replace ``items``: durable in the catalog, then in the index."""
        if not items:
            return []
        latest: dict[str, NewItem] = {item.id: item for item in items}  # last one wins
        batch = list(latest.values())
        self._refuse_writes_while_unreachable()
        with self._reaching():
            fids, _replaced = self.catalog.upsert(batch)
        # The index follows the catalog's change log, these writes and any other's.
        self.catch_up(known=dict(zip(fids, batch, strict=True)))
        self.maintain()
        return [item.id for item in items]

    def delete(self, item_id: str) -> bool:
        self._refuse_writes_while_unreachable()
        with self._reaching():
            fid = self.catalog.delete(item_id)
        if fid is None:
            return False
        self.catch_up()
        self.maintain()  # hnsw/ivfpq: compact once removed vectors pass 10%
        return True

    def _remember(self, fid: int, label: str | None, klass: str | None) -> None:
        self._groups[fid] = (label, klass)
        if label is not None:
            self._by_label[label].add(fid)
        if klass is not None:
            self._by_class[klass].add(fid)

    def _forget(self, fids: Sequence[int]) -> None:
        for fid in fids:
            item = self._items.pop(fid, None)
            if item is not None and self._fids.get(item.id) == fid:
                del self._fids[item.id]
            label, klass = self._groups.pop(fid, (None, None))
            if label is not None:
                self._by_label[label].discard(fid)
            if klass is not None:
                self._by_class[klass].discard(fid)

    # -- reads ----------------------------------------------------------------------------

    def get(self, item_id: str) -> Item | None:
        """The item ``item_id``, or None: from the catalog, or, while a shared catalog is out
        of reach, from memory (``_remembered``)."""
        if not self.shared:
            return self.catalog.get(item_id)
        if self._outage is None:
            try:
                with self._reaching():
                    return self.catalog.get(item_id)
            except NotReady:
                pass  # now marked out of reach: from memory
        outage = self._outage
        assert outage is not None
        return self._remembered(item_id, outage.error)

    def _remembered(self, item_id: str, outage: NotReady) -> Item | None:
        """The item ``item_id`` as this replica's index holds it, the catalog's log applied
        up to ``applied_seq``: the view its searches show, as current as they are.

        An id not in memory is refused with the outage (503), never answered 404: the
        catalog may be out of reach from this replica alone, while other replicas go on
        adding items that this one has not seen yet."""
        fid = self._fids.get(item_id)
        if fid is not None:
            return self._items[fid]
        raise outage.with_traceback(None)  # one error kept: its traceback must not grow

    def local_features(self, fids: Sequence[int]) -> dict[int, bytes]:
        """The packed local features of the rows ``fids`` that have them, from the catalog
        (NotReady while a shared one is out of reach)."""
        with self._reaching():
            return self.catalog.local_features(fids)

    def embedding(self, item_id: str) -> npt.NDArray[np.float32] | None:
        found = self.catalog.embedding(item_id)
        return None if found is None else found[1]

    def search(self, queries: Sequence[SearchQuery]) -> list[list[Match]]:
        """Matches for every query, best first: one index search per distinct filter."""
        groups: dict[tuple[str | None, str | None], list[int]] = defaultdict(list)
        for i, query in enumerate(queries):
            groups[(query.label, query.predicted_class)].append(i)
        raw: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]] = [
            (np.zeros(0, np.float32), np.zeros(0, np.int64))
        ] * len(queries)
        for (label, klass), members in groups.items():
            allowed = self._allowed(label, klass)
            if allowed is not None and len(allowed) == 0:
                continue
            k = max(queries[i].k + (1 if queries[i].exclude else 0) for i in members)
            vectors = np.stack([queries[i].vector for i in members])
            scores, ids = self.index.search(vectors, k, allowed)
            for row, i in enumerate(members):
                raw[i] = (scores[row], ids[row])
        found = self._found([int(f) for _s, ids in raw for f in ids if f >= 0])
        return [self._matches(q, r, found) for q, r in zip(queries, raw, strict=True)]

    def _found(self, fids: list[int]) -> dict[int, Item]:
        """The items of ``fids``: from memory with a shared catalog (so that searches go on
        while it is unreachable), else from the catalog."""
        if self.shared:
            return {fid: self._items[fid] for fid in fids if fid in self._items}
        return self.catalog.items_by_fid(fids)

    def _allowed(self, label: str | None, klass: str | None) -> npt.NDArray[np.int64] | None:
        sets = []
        if label is not None:
            sets.append(self._by_label.get(label, set()))
        if klass is not None:
            sets.append(self._by_class.get(klass, set()))
        if not sets:
            return None
        allowed = set.intersection(*sets)
        return np.fromiter(sorted(allowed), dtype=np.int64, count=len(allowed))

    @staticmethod
    def _matches(
        query: SearchQuery,
        raw: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        found: dict[int, Item],
    ) -> list[Match]:
        out: list[Match] = []
        for score, fid in zip(raw[0].tolist(), raw[1].tolist(), strict=True):
            item = found.get(fid)
            if item is None or item.id == query.exclude:
                continue
            if query.min_score is not None and score < query.min_score:
                break
            out.append(
                Match(
                    item.id,
                    round(float(score), 6),
                    item.label,
                    item.metadata,
                    item.predicted_class,
                    fid=fid,
                )
            )
            if len(out) == query.k:
                break
        return out

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self, force: bool = False) -> Path | None:
        """Write the index if anything changed since the last snapshot; keep the newest
        KEEP_SNAPSHOTS. A failed write leaves the previous snapshots as they were."""
        seq = self.applied_seq
        if seq == self._snapshot_seq and not force:
            return None
        path = self.snapshot_dir / f"index-{seq:012d}.faiss"
        tombstones = self.index.write(path)
        fids = np.fromiter(sorted(self._groups), dtype=np.int64, count=len(self._groups))
        np.save(path.with_suffix(".fids.npy"), fids)
        meta = {
            "seq": seq,
            "kind": self.index_kind(),
            "trained": self.index.trained,
            "dim": self.index.dim,
            "fingerprint": self.fingerprint,
            "view_weight": self._view_weight(),
            "tombstones": tombstones,
            "count": self.index.size,
            "written": time.time(),
        }
        meta_path = path.with_suffix(".json")
        tmp = meta_path.with_name(meta_path.name + ".tmp")
        with open(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, meta_path)
        self._snapshot_seq = seq
        self._prune_snapshots()
        return path

    def _prune_snapshots(self) -> None:
        metas = sorted(self.snapshot_dir.glob("index-*.json"), reverse=True)
        for old in metas[KEEP_SNAPSHOTS:]:
            old.with_suffix(".faiss").unlink(missing_ok=True)
            old.with_suffix(".fids.npy").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        kept = metas[:KEEP_SNAPSHOTS]
        if kept:
            oldest = int(kept[-1].stem.split("-")[1])
            self.catalog.prune_changes(oldest)

    def describe(self) -> IndexState:
        """What the store holds now (the HTTP layer writes it as /v1/index)."""
        return IndexState(
            kind=self.index_kind(),
            kind_in_use=self.index.kind_in_use,
            size=self.index.size,
            vectors_per_item=1 + self.views,
            dim=self.index.dim,
            device=self.index.device,
            labels=len([k for k, v in self._by_label.items() if v]),
            search_calls=self.index.calls["search"],
            add_calls=self.index.calls["add"],
            remove_calls=self.index.calls["remove"],
            durability=self.catalog.durability(),
            commits=self.catalog.commits,
            applied_seq=self.applied_seq,
            behind=self.behind(),
            change_log=ChangeLogState(
                self.replica_id, self.catalog.pruned_seq(), self.rebuilt_behind_horizon
            )
            if self.shared
            else None,
        )

    def close(self) -> None:
        """Close the catalog; with a shared one, first record how far this replica applied
        its log (as its final snapshot holds it), so that its record holds no more of the
        log than a restart replays."""
        try:
            if self.shared and self._outage is None:  # not a wait on a catalog known down
                self.catalog.record_replica(self.replica_id, self.applied_seq)
        except NotReady:
            pass  # its last record stands, until it expires
        finally:
            self.catalog.close()


def open_store(settings: StoreSettings, params: IndexParams, info: ModelInfo) -> ItemStore:
    """The item store for ``info``'s embeddings in the data dir, on its own catalog or a
    shared one (either refuses another model's)."""
    rows = VectorIndex(info.dim, params)
    # With crop views, an index of rows, several per item, used by item.
    index: SearchableIndex = ViewedIndex(rows, info.views) if info.views else rows
    catalog = settings.open_catalog(info.dim, info.views)
    return ItemStore(
        Path(settings.data_dir), index, info.fingerprint(), catalog=catalog, views=info.views
    )

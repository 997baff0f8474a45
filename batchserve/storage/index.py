"""The FAISS index: cosine similarity over L2-normalised vectors, with stable int64 ids.

Kinds: ``flat`` (exact), ``ivf`` (IVFFlat), ``hnsw`` (HNSWFlat) and ``ivfpq`` (IVF-PQ with
an 8-bit scalar-quantised re-rank). ``ivf`` and ``ivfpq`` need training: until
``train_min`` vectors exist they are searched exactly, then the owner trains and rebuilds
them from the stored vectors. Ids are always the caller's (the catalog's row ids), never
FAISS's positions: IVFFlat keeps them itself, the others are wrapped in ``IndexIDMap2``.
Kinds that cannot remove vectors (``hnsw``, ``ivfpq``) hide removed ids behind tombstones
and ask to be rebuilt once those grow. With a GPU build of FAISS and a GPU, searches run on
a GPU clone of the CPU master, re-cloned after removals (GPU indexes cannot remove).

Not thread-safe: exactly one thread (the index thread) uses an instance. numpy in, numpy
out; every array handed to FAISS is contiguous float32 / int64.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss as _faiss
import numpy as np
import numpy.typing as npt

from batchserve.settings import setting

# faiss's SWIG stubs know no keyword arguments (SearchParameters(sel=...) is valid).
faiss: Any = _faiss


def search_threads(kind: str, queries: int, available: int) -> int:
    """OpenMP threads for one search call.

    Graph and inverted-list searches (``hnsw``, ``ivf``, ``ivfpq``) parallelise over
    queries only, so a batch of one query runs on one thread whatever the pool holds, and
    waking the rest of the pool costs more than the search (2.6 ms against 1.5 ms per
    single-query hnsw search on 100k x 1280, next to a busy model). ``flat`` splits one
    query's matrix product across threads, so it keeps them all.
    """
    if kind == "flat":
        return available
    return max(1, min(available, queries))


KINDS = ("flat", "ivf", "hnsw", "ivfpq")

Vectors = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


@dataclass(frozen=True)
class IndexParams:
    """How the index is built and searched. 0 means "pick from the data"."""

    kind: str = setting(
        "flat",
        "FAISS index kind: flat (exact), ivf, hnsw or ivfpq",
        name="index_kind",
        choices=("flat", "ivf", "hnsw", "ivfpq"),
    )
    nlist: int = setting(
        0, "IVF inverted lists (0: about 4 sqrt(items))", name="ivf_nlist", at_least=0
    )
    nprobe: int = setting(32, "IVF lists searched per query", name="ivf_nprobe", at_least=1)
    train_min: int = setting(
        2000,
        "vectors before an ivf/ivfpq index is trained (searched exactly until then; with "
        "--crop-views an item is 6 vectors)",
        name="index_train_min",
        at_least=1,
    )
    hnsw_m: int = setting(32, "HNSW links per node", at_least=1)
    ef_construction: int = setting(
        200, "HNSW candidate list size while adding", name="hnsw_ef_construction", at_least=1
    )
    ef_search: int = setting(
        256, "HNSW candidate list size while searching", name="hnsw_ef_search", at_least=1
    )
    pq_m: int = setting(0, "IVF-PQ sub-quantizers (0: dim / 4)", at_least=0)
    refine_factor: int = setting(
        16,
        "IVF-PQ candidates per result re-ranked with 8-bit vectors",
        name="pq_refine_factor",
        at_least=1,
    )
    device: str = setting(
        "auto",
        "where FAISS searches (gpu needs a GPU build of FAISS)",
        name="index_device",
        choices=("auto", "cpu", "gpu"),
    )


def as_vectors(x: Any, dim: int) -> Vectors:
    """``x`` as a contiguous float32 [N, dim] array (FAISS refuses float64)."""
    array = np.ascontiguousarray(x, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"vectors must have shape [N, {dim}], got {array.shape}")
    return array


def as_ids(x: Any) -> Ids:
    return np.ascontiguousarray(x, dtype=np.int64).reshape(-1)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and int(faiss.get_num_gpus()) > 0


def auto_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: about 4 sqrt(n), at least 16, at most n / 39
    (FAISS wants 39 training points per centroid)."""
    return int(max(16, min(4 * math.sqrt(n), n // 39, 65536)))


def auto_pq_m(dim: int) -> int:
    """PQ sub-quantizers: dim / 4 when that divides dim, else the largest divisor <= dim / 4."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


class _Counted:
    """A FAISS index whose searches are counted as each one enters FAISS: a caller that
    searched query by query would count one call per query."""

    __slots__ = ("_calls", "_index")

    def __init__(self, index: Any, calls: Counter[str]) -> None:
        self._index = index
        self._calls = calls

    def search(
        self, queries: Vectors, k: int, params: Any = None
    ) -> tuple[npt.NDArray[np.float32], Ids]:
        self._calls["search"] += 1
        scores, ids = self._index.search(queries, k, params=params)
        return scores, ids


class VectorIndex:
    """Inner-product search over unit vectors with external int64 ids."""

    def __init__(self, dim: int, params: IndexParams) -> None:
        if params.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {params.kind}")
        # FAISS 1.15 takes the BLAS (matrix-matrix) path only past this many queries; a
        # batch of 32 on 100k x 1280 flat is 4-5x faster with BLAS.
        faiss.cvar.distance_compute_blas_threshold = 1
        self.dim = dim
        self.params = params
        self._tombstones: set[int] = set()
        self._trained_kind = params.kind in ("flat", "hnsw")
        self._cpu = self._empty(params.kind if self._trained_kind else "flat")
        self._gpu: Any = None
        self._gpu_resources: Any = None
        self._gpu_stale = True
        self.device = self._choose_device(params.device)
        #: Calls into the index, counted where they are made: "search" (one per call of a
        #: FAISS index's ``search``, counted by ``_Counted`` as FAISS is called, or per exact
        #: subset product, whatever the number of queries), "add", "remove".
        self.calls: Counter[str] = Counter()

    # -- construction -------------------------------------------------------------------

    def _empty(self, kind: str, nlist: int = 0) -> Any:
        d, ip = self.dim, faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            inner = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            inner = faiss.IndexHNSWFlat(d, self.params.hnsw_m, ip)
            inner.hnsw.efConstruction = self.params.ef_construction
            inner.hnsw.efSearch = self.params.ef_search
        elif kind == "ivf":
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
            # IVF keeps external ids itself; a hash-table direct map lets filtered searches
            # read vectors back by id and still allows removal (by IDSelectorArray).
            inner.set_direct_map_type(faiss.DirectMap.Hashtable)
            return inner
        else:  # ivfpq: IVF-PQ candidates re-ranked with 8-bit scalar-quantised vectors
            m = self.params.pq_m or auto_pq_m(d)
            ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, ip)
            refine = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip)
            inner = faiss.IndexRefine(ivfpq, refine)
            inner.k_factor = self.params.refine_factor
            inner.own_fields = True
            inner.own_refine_index = True
            ivfpq.this.disown()
            refine.this.disown()
        return faiss.IndexIDMap2(inner)

    def _choose_device(self, wanted: str) -> str:
        if wanted == "cpu":
            return "cpu"
        if gpu_available():
            return "gpu"
        if wanted == "gpu":
            raise RuntimeError("index_device=gpu but FAISS has no GPU support or sees no GPU")
        return "cpu"

    # -- state --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Live vectors (removed ones excluded)."""
        return int(self._cpu.ntotal) - len(self._tombstones)

    @property
    def kind(self) -> str:
        """The kind configured: what ``kind_in_use`` becomes once the index is trained."""
        return self.params.kind

    @property
    def kind_in_use(self) -> str:
        """The structure searched now: ``flat`` until an IVF kind is trained."""
        return self.params.kind if self._trained_kind else "flat"

    @property
    def tombstones(self) -> int:
        return len(self._tombstones)

    def needs_training(self) -> bool:
        """True once an IVF kind has enough vectors to train on."""
        return not self._trained_kind and self.size >= self.params.train_min

    def needs_rebuild(self) -> bool:
        """True when removed-but-present vectors exceed 10% (and 100 items)."""
        return len(self._tombstones) > max(100, int(self._cpu.ntotal) // 10)

    # -- mutation -----------------------------------------------------------------------

    def add(self, ids: Any, vectors: Any) -> None:
        """Add ``vectors`` [N, dim] under ``ids`` [N]. Ids are never reused: one that is or
        was in the index (even removed) is refused."""
        ids, vectors = as_ids(ids), as_vectors(vectors, self.dim)
        if len(ids) == 0:
            return
        if self._tombstones and not self._tombstones.isdisjoint(ids.tolist()):
            raise ValueError("ids of removed vectors cannot be added again")
        self.calls["add"] += 1
        self._cpu.add_with_ids(vectors, ids)
        if self._gpu is not None and not self._gpu_stale:
            self._gpu.add_with_ids(vectors, ids)

    def remove(self, ids: Any) -> None:
        ids = as_ids(ids)
        if len(ids) == 0:
            return
        self.calls["remove"] += 1
        if self.kind_in_use == "ivf":
            self._cpu.remove_ids(faiss.IDSelectorArray(ids))
        elif self.kind_in_use == "flat":
            self._cpu.remove_ids(faiss.IDSelectorBatch(ids))
        else:
            self._tombstones.update(ids.tolist())
        self._gpu_stale = True

    def rebuild(self, ids: Any, vectors: Any) -> None:
        """Replace the contents with exactly ``vectors`` under ``ids``, training IVF kinds
        on them when there are enough (``train_min``)."""
        ids, vectors = as_ids(ids), as_vectors(vectors, self.dim)
        kind = self.params.kind
        if kind in ("ivf", "ivfpq") and len(ids) >= self.params.train_min:
            fresh = self._empty(kind, self.params.nlist or auto_nlist(len(ids)))
            fresh.train(vectors)
            self._trained_kind = True
        elif kind in ("ivf", "ivfpq"):
            fresh = self._empty("flat")
            self._trained_kind = False
        else:
            fresh = self._empty(kind)
        if len(ids):
            fresh.add_with_ids(vectors, ids)
        self._cpu = fresh
        self._tombstones.clear()
        self._gpu_stale = True

    # -- search -------------------------------------------------------------------------

    def search(
        self, queries: Any, k: int, allowed: Ids | None = None
    ) -> tuple[npt.NDArray[np.float32], Ids]:
        """Top-``k`` by inner product for every query, in ONE FAISS call.

        Returns (scores [Q, k] float32, ids [Q, k] int64); missing results have id -1.
        ``allowed`` restricts the search to those ids: small sets are searched exactly.
        """
        queries = as_vectors(queries, self.dim)
        k = max(1, min(k, max(self.size, 1)))
        if allowed is not None:
            return self._search_within(queries, k, as_ids(allowed))
        fetch = k + len(self._tombstones)
        with self._threads_for(len(queries)):
            scores, ids = self._searcher().search(queries, fetch, params=self._search_params())
        return self._drop_tombstones(scores, ids, k)

    @contextmanager
    def _threads_for(self, queries: int) -> Iterator[None]:
        if self.device == "gpu":
            yield
            return
        available = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(search_threads(self.kind_in_use, queries, available))
        try:
            yield
        finally:
            faiss.omp_set_num_threads(available)

    def _search_within(
        self, queries: Vectors, k: int, allowed: Ids
    ) -> tuple[npt.NDArray[np.float32], Ids]:
        if self._tombstones:
            allowed = allowed[~np.isin(allowed, list(self._tombstones))]
        if len(allowed) == 0:
            return (
                np.full((len(queries), k), -np.inf, dtype=np.float32),
                np.full((len(queries), k), -1, dtype=np.int64),
            )
        if self.kind_in_use == "flat" or len(allowed) <= 20_000:
            # Exact over the subset: one matrix product, whatever the index kind.
            allowed, subset = self._reconstruct(allowed)
            if len(allowed) == 0:
                return self._search_within(queries, k, allowed)
            self.calls["search"] += 1
            sims = queries @ subset.T
            top = min(k, len(allowed))
            order = np.argsort(-sims, axis=1, kind="stable")[:, :top]
            scores = np.take_along_axis(sims, order, axis=1)
            found = allowed[order]
            if top < k:
                pad = k - top
                scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
                found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
            return scores.astype(np.float32), found.astype(np.int64)
        params = self._search_params(faiss.IDSelectorBatch(allowed))
        with self._threads_for(len(queries)):
            scores, ids = _Counted(self._cpu, self.calls).search(queries, k, params=params)
        return scores, ids

    def _reconstruct(self, ids: Ids) -> tuple[Ids, Vectors]:
        """The stored vectors of ``ids``, leaving out ids the index does not hold."""
        try:
            return ids, self._cpu.reconstruct_batch(ids)
        except RuntimeError:
            present, vectors = [], []
            for i in ids.tolist():
                try:
                    vectors.append(self._cpu.reconstruct(i))
                    present.append(i)
                except RuntimeError:
                    continue
            if not present:
                return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
            return np.array(present, dtype=np.int64), np.stack(vectors)

    def _searcher(self) -> _Counted:
        """The index searches run on (the GPU clone, else the CPU master), counted."""
        if self.device != "gpu":
            return _Counted(self._cpu, self.calls)
        if self._gpu is None or self._gpu_stale:
            if self._gpu_resources is None:
                self._gpu_resources = faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._cpu)
            self._gpu_stale = False
        return _Counted(self._gpu, self.calls)

    def _search_params(self, selector: Any = None) -> Any:
        kind = self.kind_in_use
        if kind == "ivf":
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.params.nprobe)
        if kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.params.ef_search)
        if kind == "ivfpq":
            return faiss.IndexRefineSearchParameters(
                k_factor=self.params.refine_factor,
                base_index_params=faiss.SearchParametersIVF(
                    sel=selector, nprobe=self.params.nprobe
                ),
            )
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _drop_tombstones(
        self, scores: npt.NDArray[np.float32], ids: Ids, k: int
    ) -> tuple[npt.NDArray[np.float32], Ids]:
        if not self._tombstones:
            return scores[:, :k], ids[:, :k]
        dead = np.isin(ids, list(self._tombstones))
        scores = np.where(dead, -np.inf, scores)
        ids = np.where(dead, -1, ids)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    # -- persistence --------------------------------------------------------------------

    def write(self, path: Path) -> list[int]:
        """Write the CPU master to ``path`` atomically (temp file, fsync, rename, fsync of
        the directory). Returns the tombstones, which the caller stores beside it."""
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._cpu, str(tmp))
        os.chmod(tmp, 0o600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return sorted(self._tombstones)

    def load(self, path: Path, tombstones: list[int], trained: bool) -> None:
        """Replace the contents with the index written at ``path``."""
        index = faiss.read_index(str(path))
        if index.d != self.dim:
            raise ValueError(f"snapshot has dimension {index.d}, expected {self.dim}")
        self._cpu = index
        self._tombstones = set(tombstones)
        self._trained_kind = trained
        self._gpu_stale = True

    @property
    def trained(self) -> bool:
        return self._trained_kind

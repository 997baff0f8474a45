"""Bulk indexing with a fake model and a real store: class folders, manifests, resuming,
and corrupt files reported without stopping."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchserve.errors import InvalidInput
from batchserve.images import DecodeLimits
from batchserve.index import IndexParams, VectorIndex
from batchserve.index_output import IndexOutput
from batchserve.ingest import IngestReport, ingest
from batchserve.sources import Source, read_manifest, scan_directory, sources_for
from batchserve.store import ItemStore, SearchQuery
from batchserve.testing import FakeModel, encode_image


def make_tree(root: Path) -> None:
    for label, colours in {
        "reds": [(250, 0, 0), (200, 30, 30)],
        "blues": [(0, 0, 250), (30, 30, 200), (10, 10, 150)],
    }.items():
        (root / label).mkdir(parents=True)
        for i, c in enumerate(colours):
            (root / label / f"{i}.png").write_bytes(encode_image(fmt="PNG", colour=c))
    (root / "loose.jpg").write_bytes(encode_image(colour=(0, 250, 0)))
    (root / "blues" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")


def open_store(path: Path, model: FakeModel) -> ItemStore:
    store = ItemStore(path, VectorIndex(model.info.dim, IndexParams()), model.info.fingerprint())
    store.open()
    return store


def run(sources: list[Source], store: ItemStore, model: FakeModel) -> IngestReport:
    return ingest(sources, IndexOutput(store), model, [1, 2, 4], 2, DecodeLimits())


def test_directory_labels_come_from_class_folders(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    sources = list(scan_directory(str(tmp_path / "images")))
    assert [(s.id, s.label) for s in sources] == [
        ("blues/0.png", "blues"),
        ("blues/1.png", "blues"),
        ("blues/2.png", "blues"),
        ("blues/broken.jpg", "blues"),
        ("loose.jpg", None),
        ("reds/0.png", "reds"),
        ("reds/1.png", "reds"),
    ]


def test_indexes_everything_readable_and_reports_the_rest(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    report = run(list(sources_for(str(tmp_path / "images"))), store, model)
    assert report.indexed == 6 and report.skipped == 0
    assert [p for p, _why in report.failed] == [str(tmp_path / "images/blues/broken.jpg")]
    assert store.index.size == 6
    assert [shape[0] for shape in model.batch_shapes] == [4, 2]  # 6 images, padded sizes
    red = np.full((1, 32, 32, 3), [250, 0, 0], dtype=np.uint8)
    [top] = store.search([SearchQuery(model.predict(red).embeddings[0], k=1)])[0]
    assert top.id == "reds/0.png" and top.score > 0.999


def test_a_second_run_resumes_and_skips_what_is_present(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    sources = list(sources_for(str(tmp_path / "images")))
    run(sources[:3], store, model)
    report = run(sources, store, model)
    assert report.skipped == 3 and report.indexed == 3 and store.index.size == 6


def test_manifests_csv_and_jsonl(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    csv_path = tmp_path / "images" / "m.csv"
    csv_path.write_text(
        'path,id,label,metadata\nreds/0.png,r0,red,"{""sku"": 1}"\nblues/1.png,,blue,\n'
    )
    rows = list(read_manifest(str(csv_path)))
    assert [(r.id, r.label, r.metadata) for r in rows] == [
        ("r0", "red", {"sku": 1}),
        ("blues/1.png", "blue", {}),
    ]
    jsonl = tmp_path / "images" / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "loose.jpg", "id": "g", "metadata": {"a": 1}}) + "\n")
    [row] = list(read_manifest(str(jsonl)))
    assert row.path == str(tmp_path / "images" / "loose.jpg") and row.metadata == {"a": 1}
    bad = tmp_path / "images" / "m.txt"
    bad.write_text("x")
    with pytest.raises(InvalidInput, match=r"\.csv, \.jsonl or \.parquet"):
        list(read_manifest(str(bad)))


def test_bulk_indexing_stores_a_thumbnail_of_each_image(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    run(list(sources_for(str(tmp_path / "images"))), store, model)
    found = store.catalog.thumbnail("reds/0.png")
    assert found is not None and found[1] is not None
    with Image.open(io.BytesIO(found[1])) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (64, 48)  # small images stay small
        assert thumb.convert("RGB").getpixel((32, 24))[0] > 200  # still red

"""Bulk indexing with a fake model and a real store: class folders, manifests, resuming by
content digest, corrupt files reported without stopping, the report, and --output Parquet."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchserve.bulk.local import embed_sources
from batchserve.bulk.outputs import EmbeddingsFile, IndexOutput, finish
from batchserve.bulk.report import STAGES, BulkReport, Progress, print_summary
from batchserve.bulk.sources import Source, read_manifest, scan_directory, sha256_hex, sources_for
from batchserve.errors import InvalidInput
from batchserve.models.batches import predicted_class, split_outputs
from batchserve.models.images import DecodeLimits
from batchserve.storage.index import IndexParams, VectorIndex
from batchserve.storage.records import NewItem
from batchserve.storage.store import ItemStore, SearchQuery
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


def run(sources: list[Source], store: ItemStore, model: FakeModel) -> BulkReport:
    return embed_sources(sources, IndexOutput(store), model, [1, 2, 4], 2, DecodeLimits())


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


def test_bulk_indexing_stores_the_local_features_of_each_image(tmp_path: Path) -> None:
    from batchserve.models.keypoints import FRAME, LocalFeatures

    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    run(list(sources_for(str(tmp_path / "images"))), store, model)
    fid = (store.catalog.thumbnail("reds/0.png") or (0, None))[0]
    packed = store.catalog.local_features([fid])[fid]
    assert LocalFeatures.from_bytes(packed).size == (FRAME, FRAME * 48 // 64)  # flat: none


def test_a_rerun_skips_unchanged_files_and_indexes_a_changed_one_again(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    sources = list(sources_for(str(tmp_path / "images")))
    run(sources, store, model)
    changed = tmp_path / "images" / "reds" / "0.png"
    new_bytes = encode_image(fmt="PNG", colour=(250, 250, 0))  # same id, yellow now
    changed.write_bytes(new_bytes)
    calls_before = len(model.batch_shapes)
    report = run(sources, store, model)
    assert report.indexed == 1 and report.skipped == 5
    assert [p for p, _why in report.failed] == [str(tmp_path / "images/blues/broken.jpg")]
    assert len(model.batch_shapes) == calls_before + 1  # only the changed file was embedded
    assert store.index.size == 6  # replaced, not added
    assert store.catalog.digests(["reds/0.png"]) == {"reds/0.png": sha256_hex(new_bytes)}
    yellow = model.predict(np.full((1, 32, 32, 3), [250, 250, 0], dtype=np.uint8)).embeddings[0]
    stored = store.embedding("reds/0.png")
    assert stored is not None
    np.testing.assert_allclose(stored, yellow, atol=1e-6)
    [top] = store.search([SearchQuery(yellow, k=1)])[0]
    assert top.id == "reds/0.png" and top.score > 0.999
    again = run(sources, store, model)  # and now it is unchanged too
    assert again.indexed == 0 and again.skipped == 6


def test_an_id_present_without_a_digest_is_skipped_and_counted(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    through_api = np.eye(model.info.dim, dtype=np.float32)[0]
    store.add([NewItem("reds/0.png", through_api, "api", digest=None)])
    assert store.catalog.digests(["reds/0.png"]) == {"reds/0.png": None}
    report = run(list(sources_for(str(tmp_path / "images"))), store, model)
    assert report.skipped == 1 and report.indexed == 5
    assert store.index.size == 6
    kept = store.get("reds/0.png")
    assert kept is not None and kept.label == "api"  # its content cannot be compared: left alone
    np.testing.assert_array_equal(store.embedding("reds/0.png"), through_api)


def test_the_report_times_each_stage(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    output = IndexOutput(open_store(tmp_path / "data", model))
    report = embed_sources(
        list(sources_for(str(tmp_path / "images"))), output, model, [1, 2, 4], 2, DecodeLimits()
    )
    assert tuple(report.stage_s) == STAGES == ("read+decode", "embed", "write", "index")
    assert report.stage_s["read+decode"] > 0
    assert report.stage_s["embed"] > 0
    assert report.stage_s["write"] > 0
    assert report.stage_s["index"] == 0  # compaction and snapshot come after, in finish
    finish(output, report)
    assert report.stage_s["index"] > 0


def test_the_summary_gives_counts_busy_time_per_stage_and_the_failures() -> None:
    report = BulkReport(
        indexed=40,
        skipped=3,
        failed=[(f"/img/{i}.jpg", "cannot decode") for i in range(4)],
        seconds=2.0,
        stage_s={"read+decode": 3.21, "embed": 1.5, "write": 0.19, "index": 0.5},
    )
    out = io.StringIO()
    print_summary(report, out, limit=3)
    lines = out.getvalue().splitlines()
    assert lines[1] == "indexed 40 images in 2.0 s (20 images/s); 3 already present; 4 failed"
    assert lines[2] == (
        "  busy time per stage: read+decode 3.2 s, embed 1.5 s, write 0.2 s, index 0.5 s"
    )
    assert lines[3:] == [
        "  failed: /img/0.jpg: cannot decode",
        "  failed: /img/1.jpg: cannot decode",
        "  failed: /img/2.jpg: cannot decode",
        "  ... and 1 more",
    ]
    report.nodes = 3
    out = io.StringIO()
    print_summary(report, out)
    assert "  busy time per stage on 3 nodes: read+decode" in out.getvalue()
    assert out.getvalue().count("  failed: ") == 4


def test_output_only_writes_a_parquet_file_of_the_models_embeddings(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    model = FakeModel()
    path = tmp_path / "out" / "embeddings.parquet"
    output = IndexOutput(None, EmbeddingsFile(path, model.info.dim))
    sources = list(sources_for(str(tmp_path / "images")))
    report = embed_sources(sources, output, model, [1, 2, 4], 2, DecodeLimits())
    assert report.indexed == 6 and len(report.failed) == 1
    partial = tmp_path / "out" / ".embeddings.parquet.partial"
    assert partial.exists() and not path.exists()  # no reader sees half a file
    output.finish()
    assert path.exists() and not partial.exists()
    assert os.listdir(tmp_path / "out") == ["embeddings.parquet"]
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), model.info.dim)
    rows = {row["id"]: row for row in table.to_pylist()}
    colours = {
        "reds/0.png": (250, 0, 0),
        "reds/1.png": (200, 30, 30),
        "blues/0.png": (0, 0, 250),
        "blues/1.png": (30, 30, 200),
        "blues/2.png": (10, 10, 150),
    }
    assert sorted(rows) == sorted([*colours, "loose.jpg"])
    for item_id, colour in colours.items():
        pixels = np.full((1, 32, 32, 3), colour, dtype=np.uint8)
        outputs = model.predict(pixels)
        np.testing.assert_allclose(rows[item_id]["embedding"], outputs.embeddings[0], atol=1e-6)
        assert rows[item_id]["label"] == item_id.split("/")[0]
        assert rows[item_id]["class"] == predicted_class(
            split_outputs(outputs, 1)[0], model.info.classes
        )
    assert rows["loose.jpg"]["label"] is None
    assert json.loads(rows["loose.jpg"]["metadata"]) == {}


def test_output_keeps_each_sources_metadata_as_json_text(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    manifest = tmp_path / "images" / "m.jsonl"
    manifest.write_text(json.dumps({"path": "reds/0.png", "id": "r", "metadata": {"sku": 7}}))
    model = FakeModel()
    path = tmp_path / "e.parquet"
    output = IndexOutput(None, EmbeddingsFile(path, model.info.dim))
    embed_sources(list(sources_for(str(manifest))), output, model, [1], 1, DecodeLimits())
    output.finish()
    [row] = pq.read_table(path).to_pylist()
    assert (row["id"], row["label"], json.loads(row["metadata"])) == ("r", None, {"sku": 7})


def test_bulk_indexing_with_crop_views_stores_each_items_views(tmp_path: Path) -> None:
    from batchserve.models.images import decode_item_for
    from batchserve.models.views import CROP_VIEWS
    from batchserve.storage.viewed_index import ViewedIndex

    model = FakeModel(crop_views=True)
    image = np.zeros((60, 80, 3), dtype=np.uint8)
    image[:30, :40] = (250, 0, 0)  # a red corner: the views differ from the whole
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "corner.png").write_bytes(encode_image(image, fmt="PNG"))
    (tmp_path / "images" / "plain.png").write_bytes(encode_image(fmt="PNG", colour=(0, 0, 250)))
    index = ViewedIndex(VectorIndex(model.info.dim, IndexParams()), CROP_VIEWS)
    store = ItemStore(tmp_path, index, model.info.fingerprint(), views=CROP_VIEWS)
    store.open()
    report = run(list(scan_directory(str(tmp_path / "images"))), store, model)
    assert report.indexed == 2
    fids, vectors = next(iter(store.catalog.vectors()))
    assert vectors.shape == (2, 1 + CROP_VIEWS, model.info.dim)
    data = (tmp_path / "images" / "corner.png").read_bytes()
    pictures = decode_item_for(data, model.info, DecodeLimits())
    corner = store.catalog.items_by_fid(fids.tolist())
    row = next(i for i, f in enumerate(fids) if corner[int(f)].id == "corner.png")
    np.testing.assert_allclose(vectors[row], model.predict(pictures).embeddings, atol=1e-6)


def test_a_source_is_decoded_once_for_its_input_and_thumbnail_as_the_server_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchserve.bulk.local import load_source
    from batchserve.models import images

    path = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(path)
    info, limits = FakeModel().info, DecodeLimits()
    opened = []
    open_checked = images._open_checked

    def counting(data: bytes, given: DecodeLimits) -> object:
        opened.append(len(data))
        return open_checked(data, given)

    monkeypatch.setattr(images, "_open_checked", counting)
    loaded = load_source(str(path), None, info, limits)
    assert loaded is not None and len(opened) == 1  # a PNG: one decode, as an upload's add
    server = images.decode_add_for(path.read_bytes(), info, limits)
    assert loaded.thumbnail == server.thumbnail
    np.testing.assert_array_equal(loaded.pixels, server.pictures[0])


def test_progress_counts_images_per_s_from_the_jobs_start_as_the_summary_does() -> None:
    now = [0.0]
    out = io.StringIO()
    progress = Progress(out, 100, clock=lambda: now[0])
    now[0] = 6.0  # the model loads
    progress.start()
    now[0] = 8.0
    progress.update(BulkReport(indexed=20), force=True)
    assert out.getvalue().endswith("10 images/s")  # 20 in the 2 s since the start, not 8


def test_a_rerun_finds_the_local_features_of_items_indexed_without_them(tmp_path: Path) -> None:
    """Indexed with --no-local-features (or before them), then again with them: every item
    is indexed again and has them; a third run skips everything."""
    make_tree(tmp_path / "images")
    model = FakeModel()
    store = open_store(tmp_path / "data", model)
    sources = list(sources_for(str(tmp_path / "images")))
    without = DecodeLimits(local_features=False)
    first = embed_sources(sources, IndexOutput(store, None, False), model, [1, 2], 2, without)
    assert first.indexed == 6 and store.catalog.local_features(range(1, 100)) == {}
    assert run(sources, store, model).indexed == 6  # now finding them: all again
    assert len(store.catalog.local_features(range(1, 100))) == 6
    assert run(sources, store, model).skipped == 6

"""``batchserve dedupe``: the groups of copies among the items of a catalog, from their
embeddings' shortlists verified by their stored local features."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from batchserve.bulk.dedupe import DedupeSettings, Pair, _groups, dedupe
from batchserve.cli import main
from batchserve.errors import ConfigError
from batchserve.models import keypoints
from batchserve.models.verification import VerifyPolicy
from batchserve.storage.data_dir import StoreSettings
from batchserve.storage.records import NewItem
from batchserve.storage.sqlite import SqliteCatalog
from tests.unit.test_verification import grey_zoom, picture, rotated_crop

DIM = 8
FINGERPRINT = {"name": "fake", "weights_sha256": "0" * 64, "dim": DIM, "embedding": {}}


def item(item_id: str, image: Image.Image | None, direction: int, label: str = "") -> NewItem:
    """An item whose embedding points near axis ``direction`` (copies share one), with the
    local features of ``image`` (None: none, as an item added before them)."""
    rng = np.random.default_rng(sum(map(ord, item_id)))
    vector = np.eye(DIM, dtype=np.float32)[direction] + rng.normal(0, 0.05, DIM)
    features = None if image is None else keypoints.extract(image).to_bytes()
    return NewItem(
        item_id,
        (vector / np.linalg.norm(vector)).astype(np.float32),
        label=label or None,
        features=features,
    )


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """Three pictures, two copies of the first (one a copy of the other's zoom), a copy of
    the second, a look-alike near the third's embedding, and a copy without features."""
    catalog = SqliteCatalog(tmp_path / "catalog.sqlite3", DIM)
    catalog.check_model(FINGERPRINT)
    one, two, three = picture(1), picture(2), picture(3)
    catalog.upsert(
        [
            item("one", one, 0, "shop"),
            item("one-turned", rotated_crop(one), 0),
            item("one-grey", grey_zoom(one), 0),
            item("two", two, 1),
            item("two-mirrored", ImageOps.mirror(two).rotate(180), 1),
            item("three", three, 2),
            item("look-alike", picture(4), 2),
            item("three-old", None, 2),
        ]
    )
    catalog.close()
    return tmp_path


def test_copies_are_grouped_and_look_alikes_are_not(data_dir: Path) -> None:
    report = dedupe(StoreSettings(data_dir=str(data_dir)), VerifyPolicy(), DedupeSettings())
    assert report.groups == [["one", "one-grey", "one-turned"]]
    assert report.items == 8 and report.without_features == 1
    # Each pair within an embedding's shortlist once, bar the item without features.
    assert report.pairs_verified == 7 * 6 // 2
    assert all(p.inliers >= 12 for p in report.pairs) and len(report.pairs) >= 2
    # A mirror image turned upside down is no similarity of the upright one: not a copy.
    assert not [p for p in report.pairs if "two" in p.a]


def test_a_copy_of_a_copy_joins_the_originals_group() -> None:
    pairs = [Pair("a", "b", 0.9, 20), Pair("c", "b", 0.8, 15), Pair("x", "y", 0.7, 30)]
    assert _groups(pairs) == [["a", "b", "c"], ["x", "y"]]
    assert _groups([]) == []


def test_the_command_writes_csv_or_json_and_says_what_it_did(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dedupe", "--data-dir", str(data_dir)]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["group"], r["id"], r["label"]) for r in rows] == [
        ("1", "one", "shop"),
        ("1", "one-grey", ""),
        ("1", "one-turned", ""),
    ]
    assert "1 groups of copies (3 of 8 items)" in err and "1 items without local features" in err

    written = data_dir / "groups.json"
    args = ["dedupe", "--data-dir", str(data_dir), "--output", str(written), "--verify-k", "2"]
    assert main(args) == 0
    doc = json.loads(written.read_text())
    assert doc["groups"] == [["one", "one-grey", "one-turned"]] and doc["items"] == 8
    assert {"a", "b", "score", "inliers"} <= set(doc["pairs"][0])


def test_nothing_to_dedupe_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no catalog"):
        dedupe(StoreSettings(data_dir=str(tmp_path)), VerifyPolicy(), DedupeSettings())
    with pytest.raises(ConfigError, match=r"\.csv or \.json"):
        DedupeSettings(output="groups.txt")
    assert main(["dedupe", "--data-dir", str(tmp_path / "none")]) == 2

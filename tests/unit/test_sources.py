"""What ``batchserve index`` reads: class folders and CSV, JSON-lines and Parquet manifests,
local or through a pyarrow filesystem (file:// here: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchserve.bulk.sources import Source, read_bytes, read_manifest, scan_directory, sources_for
from batchserve.errors import InvalidInput, PayloadTooLarge
from batchserve.testing import encode_image


def make_tree(root: Path) -> None:
    """reds/{0,1}.png, reds/dark/2.PNG, blues/0.jpg, loose.webp, and two non-images."""
    (root / "reds" / "dark").mkdir(parents=True)
    (root / "blues").mkdir()
    (root / "reds" / "0.png").write_bytes(encode_image(fmt="PNG", colour=(250, 0, 0)))
    (root / "reds" / "1.png").write_bytes(encode_image(fmt="PNG", colour=(200, 0, 0)))
    (root / "reds" / "dark" / "2.PNG").write_bytes(encode_image(fmt="PNG", colour=(90, 0, 0)))
    (root / "blues" / "0.jpg").write_bytes(encode_image(colour=(0, 0, 250)))
    (root / "loose.webp").write_bytes(encode_image(fmt="WEBP", colour=(0, 250, 0)))
    (root / "notes.txt").write_text("not an image")
    (root / "blues" / "README").write_text("no suffix")


def summary(sources: list[Source]) -> list[tuple[str, str | None, dict[str, object]]]:
    return [(s.id, s.label, s.metadata) for s in sources]


def test_class_folders_label_their_images_and_other_files_are_left_out(tmp_path: Path) -> None:
    make_tree(tmp_path)
    sources = list(scan_directory(str(tmp_path)))
    assert [(s.id, s.label) for s in sources] == [
        ("blues/0.jpg", "blues"),
        ("loose.webp", None),  # in the root: no class folder, no label
        ("reds/0.png", "reds"),
        ("reds/1.png", "reds"),
        ("reds/dark/2.PNG", "reds"),  # the top-level folder is the label, suffix case aside
    ]
    assert sources[0].path == str(tmp_path / "blues" / "0.jpg")
    assert all(s.metadata == {} for s in sources)


def test_a_csv_manifest_gives_path_id_label_and_metadata_of_each_row(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,id,label,metadata\n"
        'a.png,first,cats,"{""sku"": 7, ""tags"": [""x""]}"\n'
        "b.png,,,\n"  # empty id: the path; empty label and metadata: none
    )
    sources = list(read_manifest(str(manifest)))
    assert summary(sources) == [
        ("first", "cats", {"sku": 7, "tags": ["x"]}),
        ("b.png", None, {}),
    ]
    assert [s.path for s in sources] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson"])
def test_a_json_lines_manifest_takes_metadata_as_an_object(tmp_path: Path, suffix: str) -> None:
    manifest = tmp_path / f"m{suffix}"
    rows = [
        {"path": "a.png", "id": "a", "label": "cats", "metadata": {"sku": 1}},
        {"path": "b.png", "metadata": '{"sku": 2}'},  # JSON text works too
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines ignored
    assert summary(list(read_manifest(str(manifest)))) == [
        ("a", "cats", {"sku": 1}),
        ("b.png", None, {"sku": 2}),
    ]


def test_a_parquet_manifest_takes_metadata_as_a_struct_column(tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    table = pa.table(
        {
            "path": ["a.png", "b.png"],
            "id": ["a", None],
            "label": ["cats", None],
            "metadata": [{"sku": 1, "colour": "red"}, {"sku": 2, "colour": "blue"}],
        }
    )
    assert pa.types.is_struct(table.schema.field("metadata").type)
    pq.write_table(table, manifest)
    sources = list(read_manifest(str(manifest)))
    assert summary(sources) == [
        ("a", "cats", {"sku": 1, "colour": "red"}),
        ("b.png", None, {"sku": 2, "colour": "blue"}),
    ]
    assert sources[1].path == str(tmp_path / "b.png")


def test_a_parquet_manifest_takes_metadata_as_json_text(tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "path": ["a.png", "b.png"],
                "metadata": [json.dumps({"sku": 1, "nested": {"k": [1, 2]}}), None],
            }
        ),
        manifest,
    )
    assert summary(list(read_manifest(str(manifest)))) == [
        ("a.png", None, {"sku": 1, "nested": {"k": [1, 2]}}),
        ("b.png", None, {}),
    ]


def test_relative_paths_resolve_beside_the_manifest_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    manifest = tmp_path / "lists" / "m.csv"
    manifest.write_text("path\nimages/a.png\n../b.png\n")
    assert [s.path for s in read_manifest(str(manifest))] == [
        str(tmp_path / "lists" / "images" / "a.png"),
        str(tmp_path / "lists" / ".." / "b.png"),
    ]
    # A manifest named relatively resolves relative to its own folder, too.
    monkeypatch.chdir(tmp_path)
    [first, _] = read_manifest("lists/m.csv")
    assert first.path == str(Path("lists") / "images" / "a.png")
    assert first.id == "images/a.png"


def test_absolute_paths_and_uris_in_a_manifest_are_kept(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    absolute = "/data/shared/a.png"
    uri = "s3://bucket/images/b.png"
    manifest.write_text(
        json.dumps({"path": absolute}) + "\n" + json.dumps({"path": uri, "id": "b"}) + "\n"
    )
    sources = list(read_manifest(str(manifest)))
    assert [(s.path, s.id) for s in sources] == [(absolute, absolute), (uri, "b")]


def test_a_file_uri_folder_gives_the_sources_of_its_local_path(tmp_path: Path) -> None:
    make_tree(tmp_path)
    local = list(scan_directory(str(tmp_path)))
    remote = list(sources_for(tmp_path.as_uri()))
    assert summary(remote) == summary(local)
    assert [s.path for s in remote] == [Path(s.path).as_uri() for s in local]
    # Each URI reads the bytes of its local file, through pyarrow's filesystem.
    assert [read_bytes(s.path) for s in remote] == [read_bytes(s.path) for s in local]


def test_a_file_uri_manifest_resolves_its_rows_beside_it_as_uris(tmp_path: Path) -> None:
    make_tree(tmp_path)
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table(
            {
                "path": ["reds/0.png", str(tmp_path / "blues" / "0.jpg")],
                "label": ["red", "blue"],
            }
        ),
        manifest,
    )
    local = list(read_manifest(str(manifest)))
    remote = list(sources_for(manifest.as_uri()))
    assert (
        summary(remote)
        == summary(local)
        == [
            ("reds/0.png", "red", {}),
            (str(tmp_path / "blues" / "0.jpg"), "blue", {}),
        ]
    )
    assert remote[0].path == (tmp_path / "reds" / "0.png").as_uri()
    assert remote[1].path == str(tmp_path / "blues" / "0.jpg")  # absolute: kept
    assert read_bytes(remote[0].path) == (tmp_path / "reds" / "0.png").read_bytes()


def test_reading_a_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_bytes(str(tmp_path / "gone.png"))
    with pytest.raises(OSError):
        read_bytes((tmp_path / "gone.png").as_uri())


def test_a_row_without_a_path_is_refused_naming_the_row(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\na.png,a\n,b\n")
    with pytest.raises(InvalidInput, match=r"m\.csv row 2 has no path"):
        list(read_manifest(str(manifest)))
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(json.dumps({"path": "a.png"}) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(InvalidInput, match=r"m\.jsonl row 2 has no path"):
        list(read_manifest(str(jsonl)))


def test_a_bad_id_is_refused_naming_the_row(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": "a.png"}, {"path": "b.png", "id": "tab\there"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidInput, match=r"m\.jsonl row 2: id must not hold control"):
        list(read_manifest(str(manifest)))
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.png"], "id": ["x" * 10_000]}), parquet)
    with pytest.raises(InvalidInput, match=r"m\.parquet row 1: id is 10000 characters"):
        list(read_manifest(str(parquet)))


def test_bad_metadata_is_refused_naming_the_row(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text('path,metadata\na.png,"{""ok"": 1}"\nb.png,[1]\n')
    with pytest.raises(InvalidInput, match=r"m\.csv row 2: metadata must be a JSON object"):
        list(read_manifest(str(manifest)))


def test_a_manifest_of_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text("path\na.png\n")
    with pytest.raises(InvalidInput, match=r"must be \.csv, \.jsonl or \.parquet"):
        list(read_manifest(str(manifest)))
    with pytest.raises(InvalidInput, match=r"m\.txt must be \.csv, \.jsonl or \.parquet"):
        list(sources_for(str(manifest)))


def test_sources_for_picks_a_folder_or_a_manifest(tmp_path: Path) -> None:
    make_tree(tmp_path / "images")
    manifest = tmp_path / "images" / "m.csv"
    manifest.write_text("path,label\nreds/0.png,red\n")
    assert len(list(sources_for(str(tmp_path / "images")))) == 5
    assert summary(list(sources_for(str(manifest)))) == [("reds/0.png", "red", {})]


def test_sources_for_a_missing_path_says_it_is_neither_folder_nor_manifest(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(InvalidInput, match="neither a directory nor a manifest file"):
        list(sources_for(str(missing)))
    with pytest.raises(OSError):  # a manifest by its name, but no file to read
        list(sources_for(str(tmp_path / "gone.csv")))


def test_a_struct_metadata_column_keeps_only_each_rows_own_keys(tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"path": ["a.jpg", "b.jpg"], "metadata": [{"sku": 1}, {"colour": "red"}]}),
        manifest,
    )
    assert [s.metadata for s in read_manifest(str(manifest))] == [{"sku": 1}, {"colour": "red"}]


def test_an_integer_id_column_gives_text_ids_and_zero_is_an_id(tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "id": [0, 17]}), manifest)
    assert [s.id for s in read_manifest(str(manifest))] == ["0", "17"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"path": "a.jpg"}\n{"path": \n', "cannot be read"),
        ("[1, 2]\n", "line 1 is not a JSON object"),
    ],
)
def test_a_broken_json_lines_manifest_is_refused_cleanly(
    tmp_path: Path, text: str, reason: str
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(text)
    with pytest.raises(InvalidInput, match=reason):
        list(read_manifest(str(manifest)))


def test_a_manifest_that_is_not_utf8_is_refused_cleanly(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,id\n\xff\xfe.jpg,x\n")
    with pytest.raises(InvalidInput, match="cannot be read"):
        list(read_manifest(str(manifest)))


def test_oversized_metadata_is_refused_naming_the_row(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": "a.jpg"}, {"path": "b.jpg", "metadata": {"blob": "x" * 100_000}}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PayloadTooLarge, match="row 2"):
        list(read_manifest(str(manifest)))

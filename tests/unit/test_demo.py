"""The demo photos indexed on a first start: package data, small, decodable by the server,
each with its source and licence."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from batchserve import demo
from batchserve.models.images import DecodeLimits, decode_image

DEMO_DIR = Path(demo.__file__).parent / "data" / "demo"


def test_every_sample_is_a_small_jpeg_the_server_decodes() -> None:
    photos = demo.sample_photos()
    assert [item_id for item_id, _, _ in photos] == [item_id for item_id, _, _ in demo.SAMPLES]
    assert len({item_id for item_id, _, _ in photos}) == len(photos)
    assert len({label for _, label, _ in photos}) > 1  # the label filter has work to do
    assert sum(len(data) for _, _, data in photos) < 400_000
    for item_id, _label, data in photos:
        assert Image.open(io.BytesIO(data)).format == "JPEG", item_id
        assert max(Image.open(io.BytesIO(data)).size) <= 512, item_id
        assert decode_image(data, (160, 160), DecodeLimits()).shape == (160, 160, 3)


def test_every_sample_file_has_its_source_and_licence_listed() -> None:
    sources = (DEMO_DIR / "SOURCES.md").read_text(encoding="utf-8")
    files = {p.name for p in DEMO_DIR.glob("*.jpg")}
    assert files == {name for _, _, name in demo.SAMPLES}
    for item_id, label, name in demo.SAMPLES:
        assert f"| `{name}` | `{item_id}`, {label} |" in sources, name


def test_the_samples_command_writes_the_photos_a_newcomer_searches_with(tmp_path: Path) -> None:
    from batchserve.cli import main

    assert main(["samples", str(tmp_path / "photos")]) == 0
    for _item_id, _label, name in demo.SAMPLES:
        assert (tmp_path / "photos" / name).read_bytes() == (DEMO_DIR / name).read_bytes()

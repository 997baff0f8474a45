"""Decoding untrusted bytes: formats, orientation, colour modes, limits, bad data."""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from batchserve.models.images import (
    PAD_RGB,
    DecodeLimits,
    decode_image,
    make_thumbnail,
    pad_to_aspect,
    trim_uniform_borders,
)
from batchserve.testing import encode_image

SIZE = (32, 48)  # height, width
LIMITS = DecodeLimits(max_pixels=10_000_000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_accepted_formats_decode_to_rgb_uint8_of_model_size(fmt: str) -> None:
    array = decode_image(encode_image(fmt=fmt, colour=(200, 30, 30)), SIZE, LIMITS)
    assert array.shape == (32, 48, 3)
    assert array.dtype == np.uint8
    assert np.abs(array.reshape(-1, 3).mean(axis=0) - (200, 30, 30)).max() < 12


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "I;16"])
def test_colour_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    data = encode_image(fmt=fmt, colour=(90, 90, 90), mode=mode)
    array = decode_image(data, SIZE, LIMITS)
    assert array.shape == (32, 48, 3)
    if mode != "I;16":
        assert abs(float(array.mean()) - 90) < 8  # palette conversion dithers


def test_transparency_is_flattened_onto_white() -> None:
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    out = io.BytesIO()
    image.save(out, format="PNG")
    array = decode_image(out.getvalue(), SIZE, LIMITS)
    assert (array == 255).all()


def test_exif_orientation_turns_the_image_upright() -> None:
    # Stored landscape, left half black and right half white; EXIF orientation 6 means
    # "rotate 90 degrees clockwise to display", which puts black on top.
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    array = decode_image(out.getvalue(), (80, 40), LIMITS)
    assert array[:30].mean() < 40  # top is black
    assert array[50:].mean() > 215  # bottom is white


def test_large_jpeg_is_decoded_in_draft_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[tuple[str, tuple[int, int]]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str, size: tuple[int, int]) -> object:
        requested.append((mode, size))
        result = original(self, mode, size)  # type: ignore[arg-type]
        requested.append(("scaled_to", self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = encode_image(fmt="JPEG", size=(1600, 1200))
    array = decode_image(data, (160, 160), LIMITS)
    assert array.shape == (160, 160, 3)
    assert requested[0] == ("RGB", (160, 160))
    # libjpeg decoded at 1/4 scale: the largest reduction that still covers 160x160.
    assert requested[1] == ("scaled_to", (400, 300))


def test_image_over_the_pixel_limit_is_refused_before_decoding() -> None:
    # A PNG header declaring 50000x50000 pixels with almost no data behind it.
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
    with pytest.raises(PayloadTooLarge, match="50000x50000"):
        decode_image(bomb + chunk(b"IEND", b""), SIZE, LIMITS)


def test_limit_is_width_times_height() -> None:
    data = encode_image(fmt="PNG", size=(100, 100))
    decode_image(data, SIZE, DecodeLimits(max_pixels=10_000))
    with pytest.raises(PayloadTooLarge):
        decode_image(data, SIZE, DecodeLimits(max_pixels=9_999))


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, world", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\xff\xd8\xff\xe0"],
    ids=["empty", "text", "svg", "jpeg-magic-only"],
)
def test_undecodable_data_is_invalid_input(data: bytes) -> None:
    with pytest.raises(InvalidInput):
        decode_image(data, SIZE, LIMITS)


def test_truncated_jpeg_is_invalid_input() -> None:
    data = encode_image(fmt="JPEG", size=(400, 300), colour=(10, 200, 10))
    with pytest.raises(InvalidInput):
        decode_image(data[: len(data) // 2], SIZE, LIMITS)


def test_unsupported_format_is_unsupported_media_type() -> None:
    with pytest.raises(UnsupportedMediaType, match="TIFF"):
        decode_image(encode_image(fmt="TIFF"), SIZE, LIMITS)


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidInput, match="animated"):
        decode_image(out.getvalue(), SIZE, LIMITS)


def test_a_thumbnail_is_upright_keeps_its_aspect_and_fits_the_side() -> None:
    # A 400 x 200 photo stored on its side: EXIF orientation 6 says to turn it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode_image(size=(400, 200), exif=exif.tobytes())
    with Image.open(io.BytesIO(make_thumbnail(data, DecodeLimits()))) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (128, 256)
    png = encode_image(fmt="PNG", size=(30, 20), mode="RGBA", colour=(0, 0, 0))
    with Image.open(io.BytesIO(make_thumbnail(png, DecodeLimits(), side=64))) as small:
        assert small.size == (30, 20)  # never enlarged


def test_a_thumbnail_of_bad_data_fails_as_decoding_does() -> None:
    with pytest.raises(InvalidInput):
        make_thumbnail(b"not an image", DecodeLimits())
    with pytest.raises(PayloadTooLarge):
        make_thumbnail(encode_image(size=(100, 100)), DecodeLimits(max_pixels=100))


def _framed(core: Image.Image, border: int, fill: tuple[int, int, int]) -> Image.Image:
    return ImageOps.expand(core, border=border, fill=fill)


def _photo(size: tuple[int, int] = (120, 90)) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(40, 215, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("fill", [(255, 255, 255), (0, 0, 0), (250, 248, 252)])
def test_white_or_black_borders_are_trimmed_to_the_picture(fill: tuple[int, int, int]) -> None:
    core = _photo()
    trimmed = trim_uniform_borders(_framed(core, 20, fill))
    assert trimmed.size == core.size
    assert np.array_equal(np.asarray(trimmed), np.asarray(core))


def test_a_coloured_or_graded_backdrop_is_part_of_the_picture() -> None:
    grey = _framed(_photo(), 20, (128, 128, 128))
    assert trim_uniform_borders(grey).size == grey.size
    ramp = np.linspace(200, 120, 90, dtype=np.uint8)[:, None, None].repeat(120, 1).repeat(3, 2)
    graded = Image.fromarray(ramp)
    assert trim_uniform_borders(graded).size == graded.size


def test_trimming_stops_at_two_fifths_of_a_side() -> None:
    page = Image.new("RGB", (100, 100), (255, 255, 255))
    dot = page.copy()
    dot.putpixel((50, 50), (0, 0, 0))
    assert trim_uniform_borders(dot).size == (20, 20)  # 40 lines off each side, no more


def test_letterboxing_pads_to_the_aspect_with_mid_grey_and_keeps_every_pixel() -> None:
    wide = _photo((160, 80))
    padded = pad_to_aspect(wide, 1.0)
    assert padded.size == (160, 160)
    pixels = np.asarray(padded)
    assert (pixels[:40] == PAD_RGB).all() and (pixels[120:] == PAD_RGB).all()
    assert np.array_equal(pixels[40:120], np.asarray(wide))
    assert pad_to_aspect(wide, 2.0) is wide


def test_decode_with_letterbox_and_trimming_ignores_a_frame_and_the_aspect() -> None:
    core = _photo((128, 64))
    framed = _framed(core, 24, (255, 255, 255))

    def decode(image: Image.Image) -> np.ndarray:
        out = io.BytesIO()
        image.save(out, "PNG")
        return decode_image(
            out.getvalue(), (32, 32), DecodeLimits(), letterbox=True, trim_borders=True
        )

    assert np.array_equal(decode(framed), decode(core))
    out = io.BytesIO()
    core.save(out, "PNG")
    squashed = decode_image(out.getvalue(), (32, 32), DecodeLimits())
    assert not (squashed == PAD_RGB).all(axis=2).any()  # squash: no padding at all
    assert (decode(core)[:7] == PAD_RGB).all()  # letterbox: grey bars above and below


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_an_item_decodes_to_its_image_then_its_crop_views_of_the_trimmed_picture() -> None:
    from batchserve.models.images import decode_item_for
    from batchserve.models.views import CROP_VIEWS, crop_boxes
    from batchserve.testing import FakeModel

    core = _photo((120, 90))
    info = FakeModel(input_size=SIZE, crop_views=True).info
    info = dataclasses.replace(info, embedding={**info.embedding, "trim_borders": True})
    pictures = decode_item_for(_png(_framed(core, 16, (255, 255, 255))), info, LIMITS)
    assert pictures.shape == (1 + CROP_VIEWS, *SIZE, 3)
    assert np.array_equal(pictures[0], decode_image(_png(core), SIZE, LIMITS))
    for view, box in zip(pictures[1:], crop_boxes(120, 90), strict=True):
        assert np.array_equal(view, decode_image(_png(core.crop(box)), SIZE, LIMITS))


def _textured_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG of ``size`` (width, height) with texture, so that scales decode differently."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 6, size[0] // 6, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_a_large_jpeg_item_is_its_image_as_decode_for_makes_it_then_sharper_crops() -> None:
    from batchserve.models.images import decode_for, decode_item_for
    from batchserve.models.views import crop_boxes
    from batchserve.testing import FakeModel

    data = _textured_jpeg((320, 320), seed=5)
    info = FakeModel(input_size=(32, 32), crop_views=True).info
    pictures = decode_item_for(data, info, LIMITS)
    assert np.array_equal(pictures[0], decode_for(data, info, LIMITS))  # drafted at 1/8: 40 px
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (46, 46))  # a 0.7 crop of a 32-pixel input needs 46: 1/4, 80 px
        image.load()
        drafted = image.convert("RGB")
    assert drafted.size == (80, 80)
    crop = drafted.crop(crop_boxes(*drafted.size)[0]).resize((32, 32), Image.Resampling.BILINEAR)
    assert np.abs(pictures[1].astype(int) - np.asarray(crop).astype(int)).max() <= 1


def test_the_grey_view_of_an_item_is_its_image_in_greyscale_after_its_crops() -> None:
    from batchserve.models.images import decode_item_for
    from batchserve.testing import FakeModel

    data = _png(_photo((120, 90)))
    both = decode_item_for(
        data, FakeModel(input_size=SIZE, crop_views=True, grey_view=True).info, LIMITS
    )
    crops = decode_item_for(data, FakeModel(input_size=SIZE, crop_views=True).info, LIMITS)
    assert both.shape == (7, *SIZE, 3) and np.array_equal(both[:6], crops)
    grey = np.asarray(Image.fromarray(both[0]).convert("L"))
    assert all(np.array_equal(both[6][:, :, c], grey) for c in range(3))
    alone = decode_item_for(data, FakeModel(input_size=SIZE, grey_view=True).info, LIMITS)
    assert alone.shape == (2, *SIZE, 3) and np.array_equal(alone[1], both[6])


@pytest.mark.parametrize("side", [40, 64, 100, 320, 333, 640, 1000])
def test_the_draft_scale_of_an_item_is_the_one_pillow_decodes_at(side: int) -> None:
    from batchserve.models.images import _draft_scale

    out = io.BytesIO()
    Image.new("RGB", (side, side * 3 // 4), (90, 120, 30)).save(out, "JPEG")
    for wanted in [(32, 32), (46, 46), (160, 160), (229, 229)]:
        with Image.open(io.BytesIO(out.getvalue())) as image:
            scale = _draft_scale(image, wanted)
            image.draft("RGB", wanted)
            assert image.size == (-(-side // scale), -(-(side * 3 // 4) // scale))


def test_an_item_whose_crops_share_its_draft_is_decoded_once_and_the_same() -> None:
    from batchserve.models.images import decode_for, decode_item_for
    from batchserve.testing import FakeModel

    data = _textured_jpeg((640, 480), seed=6)
    info = FakeModel(input_size=(32, 32), crop_views=True, grey_view=True).info
    pictures = decode_item_for(data, info, LIMITS)  # 32 and 46 both draft at 1/8
    assert np.array_equal(pictures[0], decode_for(data, info, LIMITS))
    assert pictures.shape == (7, 32, 32, 3)


def _gif_of_frames(count: int) -> bytes:
    """A GIF of ``count`` one-pixel frames, written by hand (Pillow would take minutes)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    control = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    frame = control + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame * count + b"\x3b"


def test_a_gif_of_many_frames_is_refused_without_walking_them() -> None:
    data = _gif_of_frames(400_000)  # 9 MB; counting its frames takes over a second of CPU
    started = time.process_time()
    with pytest.raises(InvalidInput, match="animated"):
        decode_image(data, SIZE, LIMITS)
    assert time.process_time() - started < 0.25  # the second frame is as far as it looks
    assert decode_image(_gif_of_frames(1), SIZE, LIMITS).shape == (*SIZE, 3)


def test_a_16_bit_image_is_scaled_to_8_bits_without_a_float64_copy() -> None:
    import tracemalloc

    ramp = np.linspace(1000, 60000, 1000 * 600).astype(np.uint16).reshape(600, 1000)
    out = io.BytesIO()
    Image.frombytes("I;16", (1000, 600), ramp.astype("<u2").tobytes()).save(out, "PNG")
    tracemalloc.start()
    try:
        array = decode_image(out.getvalue(), (600, 1000), LIMITS)  # its own size: no resize
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The full range stretched to 0..255, truncated (the oracle may use float64; the decoder
    # may not: a float64 copy of these 0.6 MP alone is 4.8 MB, and that path peaked at 10 MB).
    low, high = float(ramp.min()), float(ramp.max())
    expected = ((ramp - low) * (255.0 / (high - low))).astype(np.uint8)
    assert all(np.array_equal(array[:, :, c], expected) for c in range(3))
    assert peak < 4_500_000, peak  # the RGB result and the bytes it is read from: 3.6 MB


def test_only_the_accepted_formats_plugins_open_an_image(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import TiffImagePlugin

    opened: list[str] = []
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", lambda self: opened.append("TIFF"))
    with pytest.raises(UnsupportedMediaType, match="TIFF"):  # still named, by its signature
        decode_image(encode_image(fmt="TIFF"), SIZE, LIMITS)
    assert opened == []
    ppm = encode_image(fmt="PPM")  # a format Pillow reads, not accepted: never opened
    with pytest.raises(InvalidInput, match="cannot identify"):
        decode_image(ppm, SIZE, LIMITS)


def test_transparency_flattens_onto_white_as_alpha_compositing_does() -> None:
    rng = np.random.default_rng(4)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    out = io.BytesIO()
    rgba.save(out, "PNG")
    assert np.array_equal(decode_image(out.getvalue(), (30, 40), LIMITS), expected)


def _uniform_run_oracle(lines: np.ndarray) -> int:
    """Border trimming's run as first written (int16 and float64, 8 lines at a time)."""
    from batchserve.models import images

    reference = np.median(lines[0], axis=0)
    if not images._white_or_black(reference):
        return 0
    limit = int(len(lines) * images._MAX_TRIM)
    for start in range(0, limit, 8):
        chunk = lines[start : min(start + 8, limit)].astype(np.int16)
        close = (np.abs(chunk - reference).max(axis=2) <= images._BORDER_TOLERANCE).mean(axis=1)
        uniform = close >= images._BORDER_SHARE
        if not uniform.all():
            return start + int(np.argmin(uniform))
    return limit


def test_border_runs_are_those_of_the_first_written_trimming() -> None:
    from batchserve.models.images import _uniform_run

    rng = np.random.default_rng(7)
    for trial in range(150):
        h, w = (int(n) for n in rng.integers(5, 400, 2))
        base = [rng.integers(0, 256, 3), np.full(3, 255), np.zeros(3, dtype=int)][trial % 3]
        pixels = np.clip(base + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)
        edge = int(rng.integers(0, h))
        pixels[edge:] = rng.integers(0, 256, (h - edge, w, 3))
        across = pixels.transpose(1, 0, 2)
        for lines in (pixels, pixels[::-1], across, across[::-1]):
            assert _uniform_run(lines) == _uniform_run_oracle(lines)

"""Decoding untrusted image bytes into model input: RGB uint8 arrays of a fixed size.

Runs on the decode thread pool, never on the reactor. Pillow releases the GIL while it
decodes, so several threads decode in parallel.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from batchserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from batchserve.models.views import CROP_FRACTION, crop_boxes
from batchserve.settings import setting

if TYPE_CHECKING:
    from batchserve.models.spec import ModelInfo

#: Formats accepted as input. Animated images are refused: which frame to embed is ambiguous.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})

#: Longest side of the thumbnail stored with each item (``GET /v1/items/{id}/thumbnail``).
THUMBNAIL_SIDE = 256

#: Pillow's own bomb check would raise before ours could answer 413; ours is explicit.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodeLimits:
    """Limits applied to every image before its pixels are decoded."""

    max_pixels: int = setting(
        40_000_000, "largest image, width times height", name="max_image_pixels", at_least=1
    )


def decode_image(
    data: bytes,
    size: tuple[int, int],
    limits: DecodeLimits,
    *,
    letterbox: bool = False,
    trim_borders: bool = False,
) -> npt.NDArray[np.uint8]:
    """Decode ``data`` into an RGB uint8 array of shape ``(height, width, 3)``.

    ``size`` is ``(height, width)``. The image is turned upright by its EXIF orientation,
    converted to RGB (grayscale, CMYK, palette and alpha included; transparency over white)
    and resized to ``size``. A JPEG is decoded at a reduced scale (draft mode) when it is much
    larger than ``size``, which is several times faster than decoding it whole.

    ``trim_borders`` first cuts off uniform borders (a frame, a white margin, black bars);
    ``letterbox`` then pads to the input's aspect with mid-grey (0 after the model's
    normalisation) instead of stretching the image to it.

    Raises InvalidInput for empty, truncated or corrupt data, UnsupportedMediaType for a
    format not in ACCEPTED_FORMATS, and PayloadTooLarge when the header declares more than
    ``limits.max_pixels`` pixels (checked before any pixel is decoded).
    """
    height, width = size
    with _open_checked(data, limits) as image:
        return _fitted(_picture(image, (width, height), trim_borders), width, height, letterbox)


def decode_for(data: bytes, info: ModelInfo, limits: DecodeLimits) -> npt.NDArray[np.uint8]:
    """``data`` decoded as model ``info``'s input: its size, fit and border trimming."""
    return decode_image(
        data, info.input_size, limits, letterbox=info.letterbox, trim_borders=info.trim_borders
    )


def decode_item_for(data: bytes, info: ModelInfo, limits: DecodeLimits) -> npt.NDArray[np.uint8]:
    """``data`` decoded as an item to store with model ``info``: [1 + views, H, W, 3], the
    image exactly as ``decode_for`` makes it, then its crop views (``views.crop_boxes`` of
    the trimmed image, each fitted the same way from a JPEG draft large enough for a crop),
    then its grey view (the image in greyscale), as ``info.item_views`` asks. One decode
    serves the image and its crops, unless a JPEG's draft for the crops is larger."""
    height, width = info.input_size
    crops = int(info.item_views.get("crops", 0))
    crop_draft = (math.ceil(width / CROP_FRACTION), math.ceil(height / CROP_FRACTION))
    with _open_checked(data, limits) as image:
        shared = not crops or _draft_scale(image, (width, height)) == _draft_scale(
            image, crop_draft
        )
        picture = _picture(image, crop_draft if crops else (width, height), info.trim_borders)
    if shared:
        whole = _fitted(picture, width, height, info.letterbox)
    else:
        whole = decode_for(data, info, limits)
    pictures = [whole] + [
        _fitted(picture.crop(box), width, height, info.letterbox)
        for box in crop_boxes(*picture.size)[:crops]
    ]
    if info.item_views.get("grey"):
        grey = Image.fromarray(whole, "RGB").convert("L").convert("RGB")
        pictures.append(np.asarray(grey, dtype=np.uint8))
    return np.stack(pictures)


def fit_pixels(pixels: npt.NDArray[np.uint8], size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """Already decoded RGB ``pixels`` [H, W, 3] as model input of ``size`` (height, width):
    resized as a decoded image is, when their size differs."""
    height, width = size
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidInput(f"pixels must be uint8 [H, W, 3], not {pixels.dtype} {pixels.shape}")
    if pixels.shape[:2] == (height, width):
        return pixels
    return _fitted(Image.fromarray(pixels, "RGB"), width, height, letterbox=False)


def make_thumbnail(data: bytes, limits: DecodeLimits, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of ``data`` upright, at most ``side`` pixels on its longer side, aspect kept:
    what the catalog stores to show an item. Raises as ``decode_image`` does."""
    with _open_checked(data, limits) as image:
        try:
            if image.format == "JPEG":
                image.draft("RGB", (side, side))
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
            rgb.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
            out = io.BytesIO()
            rgb.save(out, "JPEG", quality=85, optimize=True)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise InvalidInput(f"cannot decode image: {e}") from e
    return out.getvalue()


def _open_checked(data: bytes, limits: DecodeLimits) -> Image.Image:
    """``data`` opened (header only) and checked against the limits and formats."""
    if not data:
        raise InvalidInput("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise InvalidInput(
            "cannot identify the data as an image (JPEG, PNG, WebP, BMP or GIF)"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"cannot read image header: {e}") from e
    try:
        _check(image, limits)
    except Exception:
        image.close()
        raise
    return image


def _check(image: Image.Image, limits: DecodeLimits) -> None:
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(
            f"image format {image.format} is not supported (JPEG, PNG, WebP, BMP, GIF)"
        )
    declared_w, declared_h = image.size
    if declared_w <= 0 or declared_h <= 0:
        raise InvalidInput("image has no pixels")
    if declared_w * declared_h > limits.max_pixels:
        raise PayloadTooLarge(
            f"image is {declared_w}x{declared_h} pixels; the limit is {limits.max_pixels} pixels"
        )
    # is_animated looks for a second frame; n_frames would walk every frame of a GIF (0.7 s
    # of CPU for 200 000 one-pixel frames) only for the answer to be the same refusal.
    if getattr(image, "is_animated", False):
        raise InvalidInput("animated images are not supported; send a single frame")


def _draft_scale(image: Image.Image, size: tuple[int, int]) -> int:
    """The scale (1, 2, 4 or 8) Pillow's JPEG draft mode decodes ``image`` at for ``size``
    (width, height): the largest that keeps both sides at least that size. 1 for other
    formats, which have no draft mode."""
    if image.format != "JPEG":
        return 1
    fits = min(image.size[0] // size[0], image.size[1] // size[1])
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def _picture(image: Image.Image, draft: tuple[int, int], trim: bool) -> Image.Image:
    """``image`` decoded (a JPEG at the smallest draft scale that keeps it at least
    ``draft``, width and height), upright, in RGB, its uniform borders trimmed if ``trim``."""
    try:
        if image.format == "JPEG":
            # Decoding at 1/2, 1/4 or 1/8 scale is several times faster than whole.
            image.draft("RGB", draft)
        image.load()
        rgb = _to_rgb(ImageOps.exif_transpose(image))
        return trim_uniform_borders(rgb) if trim else rgb
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidInput(f"cannot decode image: {e}") from e


def _fitted(rgb: Image.Image, width: int, height: int, letterbox: bool) -> npt.NDArray[np.uint8]:
    """``rgb`` as model input [height, width, 3]: padded to its aspect with ``letterbox``,
    else stretched to it."""
    try:
        if letterbox:
            rgb = pad_to_aspect(rgb, width / height)
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise InvalidInput(f"cannot decode image: {e}") from e
    if array.shape != (height, width, 3):
        raise InvalidInput(f"decoded image has unexpected shape {array.shape}")
    return array


#: A border line's pixels within this of its median colour (0..255 per channel) are border.
_BORDER_TOLERANCE = 24
#: At most this share of a side is trimmed; a line is border when this share of it is.
_MAX_TRIM, _BORDER_SHARE = 0.4, 0.98
#: What letterboxing pads with: 0 after a [-1, 1] normalisation.
PAD_RGB = (127, 127, 127)


def trim_uniform_borders(rgb: Image.Image) -> Image.Image:
    """``rgb`` without white or black bands along its edges (a margin, a frame, letterbox
    bars): each side trimmed while its next line is (nearly) all the colour of its
    outermost line, when that is white or black, at most 40% of the image per side."""
    w, h = rgb.size
    corners = np.array(
        [rgb.getpixel(xy) for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1))]
    )
    light = corners.min(axis=1) >= 255 - _BORDER_TOLERANCE
    dark = corners.max(axis=1) <= _BORDER_TOLERANCE
    if not (light | dark).any():
        return rgb  # most photos: no corner is white or black, so no edge is a border
    pixels = np.asarray(rgb)
    top = _uniform_run(pixels)
    bottom = _uniform_run(pixels[::-1])
    left = _uniform_run(pixels.transpose(1, 0, 2))
    right = _uniform_run(pixels.transpose(1, 0, 2)[::-1])
    if not (top or bottom or left or right):
        return rgb
    return rgb.crop((left, top, w - right, h - bottom))


def _uniform_run(lines: npt.NDArray[np.uint8]) -> int:
    """How many leading lines of ``lines`` [n, length, 3] are the first line's colour, when
    that is white or black. Looks at 8 lines at a time: most photos stop at the first."""
    reference = np.median(lines[0], axis=0)
    if not _white_or_black(reference):
        return 0  # only white or black: a graded backdrop or a sky is part of the picture
    limit = int(len(lines) * _MAX_TRIM)
    for start in range(0, limit, 8):
        chunk = lines[start : min(start + 8, limit)].astype(np.int16)
        close = (np.abs(chunk - reference).max(axis=2) <= _BORDER_TOLERANCE).mean(axis=1)
        uniform = close >= _BORDER_SHARE
        if not uniform.all():
            return start + int(np.argmin(uniform))
    return limit


def _white_or_black(colour: npt.NDArray[np.float64]) -> bool:
    """Whether ``colour`` [3] is white or black."""
    return bool(colour.min() >= 255 - _BORDER_TOLERANCE or colour.max() <= _BORDER_TOLERANCE)


def pad_to_aspect(rgb: Image.Image, aspect: float) -> Image.Image:
    """``rgb`` centred on a mid-grey canvas of width/height ``aspect`` (no pixel lost)."""
    w, h = rgb.size
    if abs(w / h - aspect) < 1e-3:
        return rgb
    size = (max(w, round(h * aspect)), max(h, round(w / aspect)))
    canvas = Image.new("RGB", size, PAD_RGB)
    canvas.paste(rgb, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, flattening transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float grayscale: scale the full range to 8 bits.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")

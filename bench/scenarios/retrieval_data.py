"""The search-quality benchmark's images: a catalog of originals (every real photo the
installed packages ship, and generated photo-like scenes), hard distractors (other crops of
the same photos, other scenes of the same kind), and queries made by editing each original
in one of many ways. Deterministic: the same seed gives the same bytes."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], Image.Image]

#: scikit-image's real photographs that ship in its wheel (``data.cat`` is ``chelsea``; the
#: stereo pair counts once). Grey ones are used as grey RGB.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "camera",
    "moon", "clock", "coins", "text", "page", "brick", "grass", "gravel",
    "immunohistochemistry", "cell",
)  # fmt: skip


@dataclass(frozen=True)
class Picture:
    """One catalog or query image: ``name``, what it is a copy of (``original``, itself for
    an original, None for a distractor) and ``edit`` (the family, for queries)."""

    name: str
    image: Image.Image
    original: str | None
    edit: str = ""


def real_photos() -> list[tuple[str, Image.Image]]:
    """Every real photo the installed packages ship, as RGB."""
    from matplotlib import cbook
    from skimage import data

    photos = []
    for name in SKIMAGE_PHOTOS:
        array = np.asarray(getattr(data, name)())
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        photos.append((f"skimage/{name}", Image.fromarray(array[..., :3].astype(np.uint8))))
    left = data.stereo_motorcycle()[0]  # type: ignore[no-untyped-call]
    photos.append(("skimage/stereo_motorcycle", Image.fromarray(left)))
    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    photos.append(("matplotlib/grace_hopper", Image.open(str(path)).convert("RGB")))
    return photos


def scene(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A photo-like generated scene: a plain or graded background (as in product shots)
    with one to three shaded objects, textured or not, and a soft shadow under each."""
    width, height = size
    top, bottom = rng.integers(120, 256, 3), rng.integers(60, 256, 3)
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(background, (height, width, 3)).copy())
    for _ in range(int(rng.integers(1, 4))):
        _object(image, rng)
    return image.filter(ImageFilter.GaussianBlur(0.6))


def _object(image: Image.Image, rng: np.random.Generator) -> None:
    width, height = image.size
    w, h = int(rng.integers(width // 6, width // 2)), int(rng.integers(height // 6, height // 2))
    x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        draw.ellipse((x, y, x + w, y + h), fill=255)
    elif kind == 1:
        draw.rounded_rectangle((x, y, x + w, y + h), radius=int(min(w, h) * 0.2), fill=255)
    else:
        points = [
            (x + rng.random() * w, y + rng.random() * h) for _ in range(int(rng.integers(3, 7)))
        ]
        draw.polygon(points, fill=255)
    box = (x, y, x + w + 1, y + h + 1)  # the shape's pixels, its outline included
    # The shadow blurred near the shape only: beyond its reach the mask is 0 either way.
    near = (max(x - 64, 0), max(y - 64, 0), min(x + w + 65, width), min(y + h + 65, height))
    shadow = mask.crop(near).filter(ImageFilter.GaussianBlur(12)).point(lambda v: v * 0.45)
    dark = Image.new("RGB", shadow.size, (20, 20, 20))
    image.paste(dark, (near[0] + 8, near[1] + 10), shadow)
    image.paste(Image.fromarray(_fill(rng, image.size, box)), box[:2], mask.crop(box))


def _fill(rng: np.random.Generator, size: tuple[int, int], box: tuple[int, ...]) -> np.ndarray:
    """An object's surface in ``box`` of an image of ``size``: a lit colour gradient
    across the image, with stripes, checks or grain."""
    width, height = size
    left, top, right, bottom = box
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    yy, xx = np.mgrid[top:bottom, left:right]
    angle = rng.random() * np.pi
    scale = width + height
    corners = [(np.cos(angle) * cx + np.sin(angle) * cy) / scale
               for cx in (0, width - 1) for cy in (0, height - 1)]  # fmt: skip
    lowest, span = min(corners), max(max(corners) - min(corners), 1e-9)
    t = ((np.cos(angle) * xx + np.sin(angle) * yy) / scale - lowest) / span
    surface = a * (1 - t[..., None]) + b * t[..., None]
    pattern = int(rng.integers(0, 4))
    period = int(rng.integers(8, 40))
    if pattern == 1:
        surface *= (0.75 + 0.25 * ((xx + yy) // period % 2))[..., None]
    elif pattern == 2:
        surface *= (0.75 + 0.25 * ((xx // period + yy // period) % 2))[..., None]
    elif pattern == 3:  # drawn for the whole image, as the benchmark's figures were
        surface += rng.normal(0, 18, (height, width, 3))[top:bottom, left:right]
    out: np.ndarray = np.clip(surface, 0, 255).astype(np.uint8)
    return out


def crops(image: Image.Image) -> list[Image.Image]:
    """Hard distractors of a photo: its four quarters and four off-centre 60% crops."""
    w, h = image.size
    boxes = [
        (0, 0, w // 2, h // 2),
        (w // 2, 0, w, h // 2),
        (0, h // 2, w // 2, h),
        (w // 2, h // 2, w, h),
    ]
    cw, ch = int(w * 0.6), int(h * 0.6)
    boxes += [(0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    return [image.crop(box) for box in boxes]


def _rotate(degrees: float, fill: tuple[int, int, int]) -> Edit:
    return lambda im, _rng: im.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=fill)


def _crop(fraction: float) -> Edit:
    def edit(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
        w, h = im.size
        cw, ch = int(w * fraction), int(h * fraction)
        return im.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))

    return edit


def _zoom(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    cw, ch = int(w * 0.55), int(h * 0.55)
    x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
    return im.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)


def _border(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    return ImageOps.expand(im, border=max(im.size) // 8, fill=(255, 255, 255))


def _pad(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    canvas = Image.new("RGB", (int(max(w, h) * 16 / 9), max(w, h)), (0, 0, 0))
    canvas.paste(im, ((canvas.width - w) // 2, (canvas.height - h) // 2))
    return canvas


def _aspect(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    return im.resize((int(im.width * 1.6), im.height), Image.Resampling.BICUBIC)


def _thumbnail(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    small = im.copy()
    small.thumbnail((64, 64), Image.Resampling.LANCZOS)
    return small


def _jpeg(quality: int) -> Edit:
    def edit(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
        out = io.BytesIO()
        im.save(out, "JPEG", quality=quality)
        return Image.open(io.BytesIO(out.getvalue())).convert("RGB")

    return edit


def _noise(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 20, (im.height, im.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _text(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    out = im.copy()
    draw = ImageDraw.Draw(out)
    for n in range(3):
        x, y = (
            int(rng.integers(0, max(1, im.width // 2))),
            int(rng.integers(0, max(1, im.height - 20))),
        )
        draw.text((x, y), f"SALE -{20 + 10 * n}% www.example.com", fill=(255, 255, 0))
    return out


def _banner(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    out = im.copy()
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, int(im.height * 0.8), im.width, im.height), fill=(200, 20, 40))
    draw.text((10, int(im.height * 0.85)), "FREE SHIPPING ON ALL ORDERS", fill=(255, 255, 255))
    return out


def _greyed(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


def _flip(im: Image.Image, _rng: np.random.Generator) -> Image.Image:
    return ImageOps.mirror(im)


def _then(first: Edit, second: Edit) -> Edit:
    return lambda im, rng: second(first(im, rng), rng)


#: Each edit family and what it does to an original.
EDITS: dict[str, Edit] = {
    "crop 70%": _crop(0.7),
    "zoom 55%": _zoom,
    "flip": _flip,
    "rotate 10° black": _rotate(10, (0, 0, 0)),
    "rotate 20° white": _rotate(20, (255, 255, 255)),
    "white border": _border,
    "black padding 16:9": _pad,
    "aspect 1.6x": _aspect,
    "thumbnail 64px": _thumbnail,
    "brighter": lambda im, _rng: Image.eval(im, lambda v: min(255, int(v * 1.4 + 20))),
    "low contrast": lambda im, _rng: Image.blend(im, Image.new("RGB", im.size, (128,) * 3), 0.5),
    "greyscale": _greyed,
    "blur": lambda im, _rng: im.filter(ImageFilter.GaussianBlur(3)),
    "noise": _noise,
    "jpeg q10": _jpeg(10),
    "text": _text,
    "banner": _banner,
    "crop + jpeg q10": _then(_crop(0.7), _jpeg(10)),
    "rotate 10° + greyscale": _then(_rotate(10, (0, 0, 0)), _greyed),
    "thumbnail + text": _then(_thumbnail, _text),
    "border + flip": _then(_border, _flip),
}

#: The quick version's edits (the test's): one of each kind of change.
QUICK_EDITS = (
    "crop 70%", "rotate 20° white", "white border", "thumbnail 64px", "greyscale", "jpeg q10",
    "banner", "crop + jpeg q10",
)  # fmt: skip


@dataclass(frozen=True)
class Benchmark:
    catalog: list[Picture]
    queries: list[Picture]


def build(
    scenes: int,
    distractor_scenes: int,
    edits: tuple[str, ...],
    real: int | None = None,
    seed: int = 7,
) -> Benchmark:
    """The catalog (originals, then distractors) and one query per original and edit."""
    rng = np.random.default_rng(seed)
    photos = real_photos()[:real]
    originals = [Picture(name, image, name) for name, image in photos]
    originals += [Picture(f"scene/{n}", scene(rng), f"scene/{n}") for n in range(scenes)]
    distractors = [
        Picture(f"{name}/crop{k}", crop, None)
        for name, image in photos
        for k, crop in enumerate(crops(image))
    ]
    distractors += [Picture(f"other-scene/{n}", scene(rng), None) for n in range(distractor_scenes)]
    queries = [
        Picture(f"{p.name}?{edit}", EDITS[edit](p.image, rng), p.name, edit)
        for p in originals
        for edit in edits
    ]
    return Benchmark(originals + distractors, queries)

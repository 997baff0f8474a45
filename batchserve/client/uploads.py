"""Images as the client sends them: read once from bytes, a path or a binary file, and
named with a content type guessed from their first bytes, as multipart file parts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeAlias, cast


class BinaryFile(Protocol):
    """A file opened for reading bytes (``open(path, "rb")``, ``io.BytesIO``)."""

    def read(self) -> bytes: ...


#: An image to send: its encoded bytes, a path to it (a ``str`` is always a path), or a
#: binary file, read from where it stands.
ImageSource: TypeAlias = bytes | bytearray | str | os.PathLike[str] | BinaryFile

#: A multipart file part as httpx takes it: (field, (filename, content, content type)).
FilePart: TypeAlias = tuple[str, tuple[str, bytes, str]]

#: (content type, filename extension, (offset, bytes) that must all match), for the
#: formats the server decodes.
SIGNATURES: tuple[tuple[str, str, tuple[tuple[int, bytes], ...]], ...] = (
    ("image/jpeg", ".jpg", ((0, b"\xff\xd8\xff"),)),
    ("image/png", ".png", ((0, b"\x89PNG\r\n\x1a\n"),)),
    ("image/webp", ".webp", ((0, b"RIFF"), (8, b"WEBP"))),
    ("image/gif", ".gif", ((0, b"GIF87a"),)),
    ("image/gif", ".gif", ((0, b"GIF89a"),)),
    ("image/bmp", ".bmp", ((0, b"BM"),)),
)
UNKNOWN = ("application/octet-stream", "")


def sniff(data: bytes) -> tuple[str, str]:
    """The content type and filename extension of an encoded image, from its magic bytes;
    ``application/octet-stream`` (the server then decides) when none matches."""
    for content_type, extension, marks in SIGNATURES:
        if all(data[at : at + len(mark)] == mark for at, mark in marks):
            return content_type, extension
    return UNKNOWN


def is_one_image(images: object) -> bool:
    """Whether ``images`` is one image rather than a sequence of them."""
    return isinstance(images, bytes | bytearray | str | os.PathLike) or hasattr(images, "read")


def as_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image or many, as a list; an empty list is refused before anything is sent."""
    if is_one_image(images):
        return [cast(ImageSource, images)]
    found = list(cast(Sequence[ImageSource], images))
    if not found:
        raise ValueError("no images given")
    return found


def read_image(image: ImageSource) -> tuple[bytes, str | None]:
    """The image's bytes, and its file name where it has one. Read once, here, so that a
    retried request sends the same bytes again."""
    if isinstance(image, bytes | bytearray):
        return bytes(image), None
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.read_bytes(), path.name
    name = getattr(image, "name", None)
    return image.read(), os.path.basename(name) if isinstance(name, str) else None


def image_part(image: ImageSource, position: int) -> FilePart:
    """The multipart part (field ``image``) of one image; a nameless one is called by its
    ``position`` and guessed extension (``0.jpg``)."""
    data, name = read_image(image)
    content_type, extension = sniff(data)
    return "image", (name or f"{position}{extension}", data, content_type)


def image_parts(images: Sequence[ImageSource]) -> list[FilePart]:
    return [image_part(image, i) for i, image in enumerate(images)]

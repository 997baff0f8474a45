"""Item views: database-side augmentation of stored items.

With ``--crop-views`` every added item is embedded whole and as five crops (its centre and
its four corners, each ``CROP_FRACTION`` of the width and height); with ``--grey-view``
also as a greyscale copy. An item scores its best view against a query, a view's score
weighed by ``VIEW_WEIGHT``. A query that shows part of a stored image (a crop, a zoom), or
a greyscale copy of it, then meets a view made like it. ``python -m bench retrieval``
measures it: 70% crops of the original are found first 0.99 of the time with crop views
against 0.80 with one vector per item (6x the model time per added item, 6x the index
memory), greyscale copies 1.00 with the grey view against 0.87.
"""

from __future__ import annotations

from typing import Any

#: Crops per item with ``--crop-views``: centre, top left, top right, bottom left, bottom right.
CROP_VIEWS = 5
#: Each crop's share of the image's width and height.
CROP_FRACTION = 0.7
#: A view's score is its cosine times this: a crop (or a grey copy) shows less of the item
#: than the whole image does. Top-1 of crop views on ``python -m bench retrieval``: 0.845 at
#: 1.0, 0.852 at 0.95; a first sweep found it flat from 0.94 to 0.97, and 0.836 at 0.9.
#: Stored as a scale of the view's vector, so FAISS ranks by it and an item's best view is
#: among the rows fetched. Index snapshots record it.
VIEW_WEIGHT = 0.95


def recipe(crops: bool, grey: bool) -> dict[str, Any]:
    """The views of an item as the model fingerprint (and so the catalog) records them:
    what is embedded, not how the index weighs it. Empty without views."""
    out: dict[str, Any] = {"crops": CROP_VIEWS, "side": CROP_FRACTION} if crops else {}
    if grey:
        out["grey"] = True
    return out


def count(views: dict[str, Any]) -> int:
    """How many views of an item ``recipe`` asks for: its crops, then the grey copy."""
    return int(views.get("crops", 0)) + (1 if views.get("grey") else 0)


Box = tuple[int, int, int, int]


def crop_boxes(width: int, height: int, fraction: float = CROP_FRACTION) -> list[Box]:
    """The (left, top, right, bottom) pixel boxes of an item's crop views, in view order."""
    cw, ch = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - cw) // 2, (height - ch) // 2
    corners = [(0, 0), (width - cw, 0), (0, height - ch), (width - cw, height - ch)]
    return [(x, y, x + cw, y + ch) for x, y in [(left, top), *corners]]

"""What a request asks of the serving core: the task of each image (embed, search, add),
a search as read from a request, and the labels a classification gives back. (What storage
gives back, stored items and matches, is in ``storage/records.py``.)

Plain frozen dataclasses: no Twisted, no JSON, numpy only for an add's view embeddings. The
HTTP layer alone turns them into wire documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class EmbedTask:
    """Return the embedding (and class probabilities)."""


@dataclass(frozen=True)
class SearchTask:
    """Find the ``k`` nearest items (cosine similarity at least ``min_score``, with
    ``label`` if given); ``same_class`` searches within the image's predicted class;
    ``verify`` re-ranks them by local features (None: as the server's default says)."""

    k: int = 10
    min_score: float | None = None
    label: str | None = None
    same_class: bool = False
    verify: bool | None = None


@dataclass(frozen=True)
class AddTask:
    """Store the image's embedding under ``id`` (replacing an item of that id), with a
    ``thumbnail`` (JPEG) and its ``features`` (packed local features, keypoints.py) made
    from the image when it was decoded."""

    id: str
    label: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    thumbnail: bytes | None = None
    features: bytes | None = None
    #: float32 [views, dim]: the embeddings of its crop views (``--crop-views``).
    views: npt.NDArray[np.float32] | None = None


Task = EmbedTask | SearchTask | AddTask


@dataclass(frozen=True)
class SearchRequest:
    """A search as read from a request: encoded query ``images``, or query ``vectors`` (JSON
    numbers, not yet checked against the model), and the options for every query."""

    task: SearchTask
    images: list[bytes] = field(default_factory=list)
    vectors: list[list[float]] | None = None


@dataclass(frozen=True)
class Label:
    """A class of the model's classifier head and its probability."""

    label: str
    score: float

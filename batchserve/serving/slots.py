"""Decoded images shared between processes without copies: a ring of fixed-size slots in
one anonymous shared-memory file, each slot one uint8 image [H, W, 3] at the model's input.

The core process makes the file (``memfd_create``: it has no name, so nothing is left in
/dev/shm when a process is killed, and docker's 64 MB /dev/shm does not bound it) and hands
its descriptor to every edge process it starts. Each edge owns a ``Partition`` of the slots:
it writes a decoded image into a free slot of its own on a decode thread, sends the slot's
number over the control channel, and frees the slot once the core has answered for it.
The core reads the slot in place: the batch it builds from the slots is the first copy. A
request that fails while its batch is with the model (its deadline passed, its client hung
up) is answered at once, so its slot may be written again while the model still reads it:
only that failed image's pixels tear, and its result is dropped. Nothing keeps a slot's
view beyond its batch, nor writes to one but the edge that owns it.
A restarted edge gets its predecessor's partition, all free: the core dropped what the dead
edge had sent (and never answers it), so no slot is left taken.

numpy only; thread-safe where it says so (slots are taken on decode threads and given back
on the reactor).
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from batchserve.errors import Overloaded


@dataclass(frozen=True)
class RingShape:
    """``slots`` slots, each an image of ``image_shape`` (H, W, 3) uint8, split into
    ``partitions`` equal parts (one per edge)."""

    image_shape: tuple[int, int, int]
    slots: int
    partitions: int = 1

    @property
    def slot_bytes(self) -> int:
        h, w, c = self.image_shape
        return h * w * c

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.slots

    @property
    def per_partition(self) -> int:
        return self.slots // self.partitions

    @classmethod
    def for_edges(
        cls, image_shape: tuple[int, int, int], in_flight_images: int, edges: int
    ) -> RingShape:
        """Enough slots for ``in_flight_images`` (the queue's bound and the batches the
        model holds) in any one edge, with the rest shared: an edge holds at most its part,
        and an edge whose part is full refuses (503), as the core's full queue would. Edges
        take connections as they are free, so load spreads over them; each gets half the
        bound or more (never less than 64 slots)."""
        per_edge = max(64, in_flight_images if edges == 1 else -(-in_flight_images // 2))
        return cls(image_shape, per_edge * edges, edges)


def make_ring_file(shape: RingShape) -> int:
    """A new anonymous shared-memory file of the ring's size; its descriptor (inheritable,
    so that edge processes started after it can map it)."""
    fd = os.memfd_create("batchserve-slots", 0)
    os.ftruncate(fd, shape.total_bytes)
    os.set_inheritable(fd, True)
    return fd


class SlotRing:
    """The slots of a ring file mapped into this process, as numpy arrays."""

    def __init__(self, fd: int, shape: RingShape) -> None:
        self.shape = shape
        self._map = mmap.mmap(fd, shape.total_bytes)
        self._all = np.frombuffer(self._map, dtype=np.uint8).reshape(
            (shape.slots, *shape.image_shape)
        )

    def image(self, slot: int) -> npt.NDArray[np.uint8]:
        """Slot ``slot``'s image, in place (uint8 [H, W, 3]; no copy)."""
        view: npt.NDArray[np.uint8] = self._all[slot]
        return view

    def images(self, slots: Sequence[int]) -> list[npt.NDArray[np.uint8]]:
        return [self._all[s] for s in slots]

    def slot_of(self, image: npt.NDArray[np.uint8]) -> int | None:
        """The slot ``image`` is a view of, or None when it is not in the ring."""
        if image.base is None or image.shape != self.shape.image_shape:
            return None
        offset = image.ctypes.data - self._all.ctypes.data
        if offset < 0 or offset % self.shape.slot_bytes:
            return None
        slot = offset // self.shape.slot_bytes
        return slot if slot < self.shape.slots else None

    def close(self) -> None:
        """Unmap (every view of a slot must be gone first)."""
        del self._all
        self._map.close()


class Partition:
    """One edge's slots: ``take`` a free one and write an image into it, ``give_back``
    once the core is done with it. Thread-safe."""

    def __init__(self, ring: SlotRing, index: int) -> None:
        per = ring.shape.per_partition
        self.ring = ring
        self.slots = range(index * per, (index + 1) * per)
        self._free = list(reversed(self.slots))
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        return len(self._free)

    def put(self, images: Iterable[npt.NDArray[np.uint8]]) -> list[npt.NDArray[np.uint8]]:
        """Copy each image into a free slot; the slots' views, in order. Takes all or
        none: Overloaded (503) when fewer are free than ``images``."""
        images = list(images)
        with self._lock:
            if len(images) > len(self._free):
                raise Overloaded(
                    f"this edge holds {len(self.slots) - len(self._free)} images already "
                    f"(its {len(self.slots)} shared slots); retry later",
                    retry_after_s=1,
                )
            taken = [self._free.pop() for _ in images]
        views = self.ring.images(taken)
        for view, image in zip(views, images, strict=True):
            view[...] = image
        return views

    def give_back(self, images: Iterable[npt.NDArray[np.uint8]]) -> None:
        """Free the slots these views (from ``put``) are; other arrays are ignored."""
        slots = [s for s in map(self.ring.slot_of, images) if s is not None and s in self.slots]
        with self._lock:
            self._free.extend(slots)

"""The shared slot ring that carries decoded images from edge processes to the core."""

from __future__ import annotations

import os

import numpy as np
import pytest

from batchserve.errors import Overloaded
from batchserve.serving.slots import Partition, RingShape, SlotRing, make_ring_file


def ring(slots: int = 8, partitions: int = 2) -> SlotRing:
    shape = RingShape((4, 4, 3), slots, partitions)
    return SlotRing(make_ring_file(shape), shape)


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


def test_an_image_put_in_a_slot_is_read_in_place_from_another_mapping_of_the_file() -> None:
    shape = RingShape((4, 4, 3), 4, 1)
    fd = make_ring_file(shape)
    edge, core = SlotRing(fd, shape), SlotRing(os.dup(fd), shape)
    (view,) = Partition(edge, 0).put([image(7)])
    slot = edge.slot_of(view)
    assert slot is not None
    assert np.array_equal(core.image(slot), image(7))
    view[0, 0, 0] = 9  # the same memory: no copy between the processes' views
    assert core.image(slot)[0, 0, 0] == 9


def test_each_edge_takes_slots_only_from_its_own_partition() -> None:
    shared = ring(slots=8, partitions=2)
    first, second = Partition(shared, 0), Partition(shared, 1)
    assert list(first.slots) == [0, 1, 2, 3] and list(second.slots) == [4, 5, 6, 7]
    views = second.put([image(i) for i in range(4)])
    assert sorted(shared.slot_of(v) for v in views) == [4, 5, 6, 7]
    assert first.free == 4


def test_a_full_partition_refuses_a_request_whole_and_takes_none_of_its_slots() -> None:
    part = Partition(ring(slots=4, partitions=1), 0)
    part.put([image(1), image(2)])
    with pytest.raises(Overloaded) as refused:
        part.put([image(3), image(4), image(5)])
    assert refused.value.retry_after_s == 1
    assert part.free == 2


def test_slots_given_back_are_taken_again_round_and_round() -> None:
    shared = ring(slots=2, partitions=1)
    part = Partition(shared, 0)
    for value in range(10):
        (view,) = part.put([image(value)])
        assert np.array_equal(view, image(value))
        part.give_back([view])
    assert part.free == 2


def test_arrays_that_are_not_slots_are_not_given_back() -> None:
    part = Partition(ring(slots=2, partitions=1), 0)
    part.put([image(1)])
    part.give_back([image(1), np.zeros((8, 8, 3), np.uint8)])
    assert part.free == 1


def test_a_restarted_edge_finds_its_partition_all_free() -> None:
    shared = ring(slots=4, partitions=2)
    Partition(shared, 1).put([image(1), image(2)])  # the edge dies holding them
    assert Partition(shared, 1).free == 2  # its successor's


def test_the_ring_for_edges_holds_the_in_flight_images_with_at_least_half_per_edge() -> None:
    one = RingShape.for_edges((160, 160, 3), 320, 1)
    assert one.per_partition == 320
    four = RingShape.for_edges((160, 160, 3), 320, 4)
    assert four.per_partition == 160 and four.slots == 640
    assert four.slot_bytes == 160 * 160 * 3
    assert RingShape.for_edges((8, 8, 3), 10, 2).per_partition == 64

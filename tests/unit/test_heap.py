"""heap.py: the heap is frozen when the key cache has grown by a step, and only then, so that a cache filling to
N entries settles O(log N) times and a full one never again."""

import gc

from authz_service.heap import HeapSettler


class Entries:
    """What the key cache holds: objects the collector tracks, one per entry."""

    def __init__(self) -> None:
        self.held: list[dict[str, object]] = []

    def grow(self, n: int) -> None:
        self.held += [{"entry": object()} for _ in range(n)]

    def __len__(self) -> int:
        return len(self.held)


def test_a_growing_cache_is_frozen_out_of_the_collectors_sight_step_by_step():
    entries = Entries()
    settler = HeapSettler(lambda: len(entries), min_step=100, step_ratio=0.25)
    try:
        assert not settler.settle()  # nothing grew
        entries.grow(99)
        assert not settler.settle()  # less than the least step
        entries.grow(1)
        frozen_before = gc.get_freeze_count()
        assert settler.settle()
        # The new entries went out of the collector's sight with the rest.
        assert gc.get_freeze_count() >= frozen_before + 100
        entries.grow(99)
        assert not settler.settle()  # the step is at least min_step...
        entries.grow(1)
        assert settler.settle()
        entries.grow(2000)
        assert settler.settle()
        entries.grow(499)  # ...and a quarter of what was there at the last settling (2,200 -> 550)
        assert not settler.settle()
        entries.grow(51)
        assert settler.settle()
        assert settler.settled == 4
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual


def test_a_full_cache_that_only_churns_never_freezes_again():
    size = 10_000
    settler = HeapSettler(lambda: size, min_step=100)
    try:
        assert settler.settle()
        for _ in range(50):  # entries evicted and replaced: the size stays
            assert not settler.settle()
        assert settler.settled == 1
    finally:
        gc.unfreeze()

"""Keeping Python's full garbage collections off the request path while the key cache fills.

CPython runs a full collection whenever the objects that survived the younger generations have grown by a
quarter since the last one, and a full collection walks every tracked object: with the key cache filling to
100,000 keys (two tracked objects each) that walk took up to 360 ms, during which no check was answered.

What has lived through a young collection after the cache grew is, overwhelmingly, the cache itself: entries
that stay until they are evicted, and are freed by reference counting then (a grant holds no cycle). So once
the cache has grown by a step, the young generations are collected (cheap: only young objects) and everything
left is moved out of the collector's sight (`gc.freeze`); the full collections that follow walk only what was
created since. Steps grow with the cache (a quarter of it, at least `min_step` entries), so a cache that fills
to N entries settles O(log N) times and a full cache (whose size no longer grows) never again: what a freeze
could hide from the collector (a cycle alive at that moment that becomes garbage later) is bounded by those few
moments, not by the process's lifetime.
"""

import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class HeapSettler:
    """`settle()` freezes the heap when `size()` (the cache's entries) has grown by a step since the last time."""

    def __init__(self, size: Callable[[], int], *, min_step: int = 5_000, step_ratio: float = 0.25):
        self._size = size
        self._min_step = min_step
        self._step_ratio = step_ratio
        self._settled_at = 0
        self.settled = 0  # how many times the heap was frozen (for the metrics and the tests)

    def due(self) -> bool:
        grown = self._size() - self._settled_at
        return grown >= max(self._min_step, int(self._settled_at * self._step_ratio))

    def settle(self) -> bool:
        """Freeze the heap if the cache grew by a step; whether it did."""
        if not self.due():
            return False
        gc.collect(1)  # the young generations' garbage (cycles included) is not frozen with the rest
        gc.freeze()
        self._settled_at = self._size()
        self.settled += 1
        log.debug(
            "heap settled at %d cached entries (%d objects out of the collector's sight)",
            self._settled_at,
            gc.get_freeze_count(),
        )
        return True

    async def step(self) -> None:
        self.settle()

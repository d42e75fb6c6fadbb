"""What keys that do not exist may cost the database: look-ups of keys unknown to this replica, rationed overall
and per source address. Pure: a clock in, no I/O.

A look-up reserves one token from the overall bucket and one from its source's bucket before it is sent, and
gives them back when the key turned out to exist. So only look-ups that found nothing are spent: a replica
that starts cold, or a client with many valid keys, looks up as fast as it needs to, while a client inventing
keys (well-formed, with valid checksums, which anyone can compute) gets at most `per_source` look-ups a second
and all such clients together at most `overall`. Reserving before the answer keeps a burst of concurrent
look-ups within the budget too. Each bucket holds `burst_seconds` worth (5 s by default), so that a client
sending its first requests with a few dozen keys at once, as one holding a key per customer does after a
replica restarts, is not refused for the few whose look-ups are still under way.
"""

import time
from collections.abc import Callable

from driftlock_kernel.caches import LruCache


class _Bucket:
    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst_seconds: float, now: float):
        self.rate = rate
        self.capacity = max(1.0, rate * burst_seconds)
        self.tokens = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now


class LookupBudget:
    def __init__(
        self,
        *,
        overall: float,
        per_source: float,
        burst_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 10_000,
    ):
        if overall <= 0 or per_source <= 0 or burst_seconds <= 0:
            raise ValueError("look-up budgets must be positive")
        self._clock = clock
        self._per_source = per_source
        self._burst_seconds = burst_seconds
        self._overall = _Bucket(overall, burst_seconds, clock())
        # An idle source is forgotten first, which gives it a full bucket: as if it had never been seen.
        self._sources: LruCache[str, _Bucket] = LruCache(max_sources)

    def reserve(self, source: str) -> bool:
        """Take a look-up from both budgets; False (and nothing taken) when either is spent."""
        now = self._clock()
        mine = self._sources.get(source)
        if mine is None:
            mine = _Bucket(self._per_source, self._burst_seconds, now)
            self._sources.put(source, mine)
        mine.refill(now)
        self._overall.refill(now)
        if mine.tokens < 1.0 or self._overall.tokens < 1.0:
            return False
        mine.tokens -= 1.0
        self._overall.tokens -= 1.0
        return True

    def refund(self, source: str) -> None:
        """Give back a reservation whose key existed."""
        self._overall.tokens = min(self._overall.capacity, self._overall.tokens + 1.0)
        mine = self._sources.peek(source)
        if mine is not None:
            mine.tokens = min(mine.capacity, mine.tokens + 1.0)

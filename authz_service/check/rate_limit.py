"""Per-key rate limits: a token bucket per key, in this process.

A bucket holds one second's worth of requests (at least one), refilled at the plan's rate: a client may send a
second's worth at once, then the rate. With several authz replicas each keeps its own buckets, unless they
share them through Redis (shared_rate_limit.py), where these buckets are the fallback.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from driftlock_kernel.caches import LruCache


# Not frozen: one is built for every check, and a frozen dataclass's __init__ costs about a microsecond more.
@dataclass(slots=True)
class RateVerdict:
    allowed: bool
    limit: float  # requests per second
    remaining: int  # whole requests left in the bucket after this one
    reset_seconds: int  # until the bucket is full again
    retry_after: int | None  # when denied: seconds until one request fits
    # When denied: exactly how long until one request fits (retry_after is this, rounded up); None when unknown.
    refill_seconds: float | None = None

    def headers(self) -> dict[str, str]:
        limit = int(self.limit) if float(self.limit).is_integer() else self.limit
        return {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(self.reset_seconds),
        }


class SharedLimits(Protocol):
    """Buckets that every replica shares (shared_rate_limit.SharedRateLimiter), asked over the network."""

    async def take(self, key: str, rate: float) -> RateVerdict: ...


def bucket_capacity(rate: float) -> float:
    """Requests a full bucket lets through at once: one second's worth, at least one."""
    return max(1.0, rate)


class RateLimiter:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        # key -> (tokens, updated_at); an idle key is forgotten first (a full bucket, as if never seen).
        self._buckets: LruCache[str, tuple[float, float]] = LruCache(max_keys)

    def take(self, key: str, rate: float) -> RateVerdict:
        now = self._clock()
        capacity = bucket_capacity(rate)
        tokens, updated = self._buckets.peek(key) or (capacity, now)
        tokens = min(capacity, tokens + (now - updated) * rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets.put(key, (tokens, now))
        return RateVerdict(
            allowed=allowed,
            limit=rate,
            remaining=int(tokens),
            reset_seconds=math.ceil((capacity - tokens) / rate),
            retry_after=None if allowed else max(1, math.ceil((1.0 - tokens) / rate)),
            refill_seconds=None if allowed else (1.0 - tokens) / rate,
        )

"""Rate limits shared by every authz replica, through Redis (DRIFTLOCK_REDIS_URL).

One atomic Lua script per check implements GCRA (the generic cell rate algorithm, a token bucket written as one
timestamp per key): the key's "theoretical arrival time" moves one emission interval (1 / rate) forward with
each request allowed, and a request is refused when that would put it more than a bucket's capacity ahead of
now. The bucket has the local limiter's shape (rate_limit.py: a second's worth, at least one), so switching
Redis on or off changes who shares the bucket, not how big it is. Time is Redis's own (`TIME`), so the
replicas' clocks do not matter; an idle key's state expires as its bucket refills.

Redis unreachable, failing or slower than DRIFTLOCK_REDIS_TIMEOUT_SECONDS: the check is limited by this
replica's own buckets instead (fail open to the local limit, never to no limit, never to a refusal), counted in
`driftlock_rate_limit_fallbacks_total`, and Redis is left alone for a second before it is tried again, so an
outage costs each check nothing more than the local bucket.
"""

import asyncio
import logging
import math
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from authz_service import metrics
from authz_service.check.rate_limit import RateLimiter, RateVerdict, bucket_capacity
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)

KEY_PREFIX = "driftlock:ratelimit:"
# After a failure, checks use the local buckets this long before Redis is tried again.
RETRY_AFTER_SECONDS = 1.0
MAX_CONNECTIONS = 64

# KEYS[1]: the key's theoretical arrival time (µs, Redis time). ARGV[1]: emission interval (µs per request).
# ARGV[2]: capacity (requests that fit at once). Returns {allowed, µs the bucket is behind full, µs until one
# more request fits}. Integers only: Redis truncates Lua numbers in replies, and %d keeps 16-digit times exact.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local horizon = now + capacity * interval
if new_tat > horizon then
  return {0, math.floor(tat - now), math.ceil(new_tat - horizon)}
end
redis.call('SET', KEYS[1], string.format('%d', math.ceil(new_tat)), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor(new_tat - now), 0}
"""


def verdict_from_reply(reply: list[int], rate: float) -> RateVerdict:
    """The script's answer as the same verdict the local limiter gives."""
    allowed, behind_us, wait_us = (int(value) for value in reply)
    interval_us = 1e6 / rate
    capacity = bucket_capacity(rate)
    tokens = max(0.0, capacity - behind_us / interval_us)
    return RateVerdict(
        allowed=bool(allowed),
        limit=rate,
        remaining=int(tokens),
        reset_seconds=math.ceil(behind_us / 1e6),
        retry_after=None if allowed else max(1, math.ceil(wait_us / 1e6)),
    )


class SharedRateLimiter:
    def __init__(
        self,
        client: aioredis.Redis,
        fallback: RateLimiter,
        *,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._client = client
        self._script = client.register_script(GCRA_SCRIPT)
        self._fallback = fallback
        self._timeout = timeout
        self._clock = clock
        self._skip_until = 0.0
        self._healthy = True
        self._fallbacks = {
            reason: metrics.RATE_LIMIT_FALLBACKS.labels(reason=reason) for reason in ("timeout", "error", "backoff")
        }
        metrics.expose_redis_state()
        metrics.RATE_LIMIT_REDIS_UP.set(1)

    @classmethod
    def from_url(cls, url: str, fallback: RateLimiter, *, timeout: float) -> "SharedRateLimiter":
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=max(timeout, 0.5),
        )
        return cls(aioredis.Redis(connection_pool=pool), fallback, timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)

    async def take(self, key: str, rate: float) -> RateVerdict:
        if self._clock() < self._skip_until:
            self._fallbacks["backoff"].inc()
            return self._fallback.take(key, rate)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._script(
                    keys=[KEY_PREFIX + key], args=[repr(1e6 / rate), repr(bucket_capacity(rate))]
                )
        except TimeoutError:
            return self._fall_back("timeout", key, rate, None)
        except (RedisError, OSError) as error:
            return self._fall_back("error", key, rate, error)
        if not self._healthy:
            self._healthy = True
            metrics.RATE_LIMIT_REDIS_UP.set(1)
            log.info("rate limits are shared through Redis again")
        return verdict_from_reply(reply, rate)

    def _fall_back(self, reason: str, key: str, rate: float, error: BaseException | None) -> RateVerdict:
        self._fallbacks[reason].inc()
        self._skip_until = self._clock() + RETRY_AFTER_SECONDS
        if self._healthy:
            self._healthy = False
            metrics.RATE_LIMIT_REDIS_UP.set(0)
            detail = one_line(error) if error is not None else f"no answer within {self._timeout:.3f}s"
            log.warning("Redis rate limits unavailable (%s); each replica limits on its own until it answers", detail)
        return self._fallback.take(key, rate)

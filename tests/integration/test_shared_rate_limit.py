"""Rate limits shared through a real Redis: the Lua script's verdicts, two limiters (as two replicas) sharing one
bucket, and the fall back to local buckets when Redis fails or is slow."""

import asyncio
import uuid

import pytest
from prometheus_client import REGISTRY

from authz_service.check.rate_limit import RateLimiter
from authz_service.check.shared_rate_limit import RETRY_AFTER_SECONDS, SharedRateLimiter, verdict_from_reply
from tests.support.net import free_port
from tests.support.redis_server import require_redis


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("driftlock_rate_limit_fallbacks_total", {"reason": reason}) or 0.0


def redis_up() -> float | None:
    return REGISTRY.get_sample_value("driftlock_rate_limit_redis_up")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def shared():
    url = require_redis()
    made = []

    def make(timeout: float = 1.0, clock=None):
        limiter = SharedRateLimiter.from_url(url, RateLimiter(), timeout=timeout)
        if clock is not None:
            limiter._clock = clock
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


def key() -> str:
    return str(uuid.uuid4())


async def test_a_full_bucket_lets_a_seconds_worth_through_then_refuses_with_retry_after(shared):
    limiter, k = shared(), key()
    verdicts = [await limiter.take(k, 5) for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert verdicts[-1].retry_after == 1 and verdicts[-1].limit == 5
    assert verdicts[0].headers() == {"x-ratelimit-limit": "5", "x-ratelimit-remaining": "4", "x-ratelimit-reset": "1"}


async def test_a_slow_rate_waits_whole_intervals(shared):
    limiter, k = shared(), key()
    assert (await limiter.take(k, 0.25)).allowed
    denied = await limiter.take(k, 0.25)
    assert not denied.allowed and denied.retry_after == 4


async def test_two_replicas_share_one_bucket(shared):
    """A broken (per-replica) implementation lets each limiter through once: 2 of 4."""
    first, second, k = shared(), shared(), key()
    allowed = [await limiter.take(k, 1) for limiter in (first, second, first, second)]
    assert allowed[0].allowed
    assert [v.allowed for v in allowed[1:]] == [False, False, False]


async def test_keys_have_buckets_of_their_own(shared):
    limiter, a, b = shared(), key(), key()
    assert (await limiter.take(a, 1)).allowed
    assert (await limiter.take(b, 1)).allowed
    assert not (await limiter.take(a, 1)).allowed


def test_the_reply_reads_like_the_local_limiter():
    # 2 requests per second, one taken half an interval ago: 1.5 tokens left.
    verdict = verdict_from_reply([1, 250_000, 0], 2)
    assert (verdict.allowed, verdict.remaining, verdict.reset_seconds, verdict.retry_after) == (True, 1, 1, None)
    denied = verdict_from_reply([0, 1_000_000, 300_000], 2)
    assert (denied.allowed, denied.remaining, denied.retry_after) == (False, 0, 1)


async def test_unreachable_redis_falls_back_to_the_local_bucket_and_counts_it():
    clock = Clock()
    local = RateLimiter(clock=clock)
    limiter = SharedRateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0", local, timeout=0.5)
    limiter._clock = clock
    errors, backoffs = fallbacks("error"), fallbacks("backoff")
    try:
        k = key()
        first = await limiter.take(k, 1)
        assert first.allowed  # fail open to the local limit ...
        assert not (await limiter.take(k, 1)).allowed  # ... which still limits
        assert fallbacks("error") == errors + 1
        assert fallbacks("backoff") == backoffs + 1  # not asked again within the second
        assert redis_up() == 0
    finally:
        await limiter.close()


async def test_a_redis_that_does_not_answer_in_time_falls_back():
    async def silent(reader, writer):
        await reader.read()  # accept, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = SharedRateLimiter.from_url(f"redis://127.0.0.1:{port}/0", RateLimiter(), timeout=0.05)
    timeouts = fallbacks("timeout")
    try:
        assert (await limiter.take(key(), 1)).allowed
        assert fallbacks("timeout") == timeouts + 1
    finally:
        await limiter.close()
        server.close()


async def test_after_the_backoff_redis_is_used_again(shared):
    clock = Clock()
    limiter = shared(clock=clock)
    limiter._skip_until = clock.now + RETRY_AFTER_SECONDS  # as after a failure
    limiter._healthy = False
    k = key()
    assert (await limiter.take(k, 1)).allowed  # local, during the backoff
    clock.now += RETRY_AFTER_SECONDS
    other = shared()
    assert (await limiter.take(k, 1)).allowed  # Redis: a bucket the local one never touched
    assert not (await other.take(k, 1)).allowed  # ... and shared
    assert redis_up() == 1

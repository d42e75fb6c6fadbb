"""The bounded cache and the single-flight guard every in-process cache is built from."""

import asyncio

import pytest

from driftlock_kernel.caches import LruCache, SingleFlight


def test_lru_cache_forgets_the_least_recently_used_first():
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now "b" is the least recently used
    cache.put("c", 3)
    assert ("a" in cache, "b" in cache, "c" in cache) == (True, False, True)
    assert len(cache) == 2


def test_lru_cache_peek_does_not_refresh_recency():
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.peek("a") == 1
    cache.put("c", 3)
    assert "a" not in cache and cache.pop("b") == 2 and cache.pop("b") is None


def test_lru_cache_refuses_a_size_below_one():
    with pytest.raises(ValueError):
        LruCache(0)


async def test_single_flight_shares_one_look_up_per_key_and_forgets_it_when_done():
    calls = []
    release = asyncio.Event()

    async def look_up() -> str:
        calls.append(1)
        await release.wait()
        return "answer"

    flights: SingleFlight[str, str] = SingleFlight()
    first, joined_first = flights.join_or_start("k", look_up)
    second, joined_second = flights.join_or_start("k", look_up)
    other, _ = flights.join_or_start("other", look_up)
    assert (joined_first, joined_second) == (False, True) and first is second
    release.set()
    assert await first == "answer" and await other == "answer"
    assert len(calls) == 2 and len(flights) == 0
    third, joined_third = flights.join_or_start("k", look_up)
    assert not joined_third and await third == "answer" and len(calls) == 3


async def test_single_flight_is_forgotten_before_its_waiters_wake():
    """A caller woken by a finished look-up that starts another must start a new one, not join the old."""
    flights: SingleFlight[str, int] = SingleFlight()
    seen = []

    async def look_up() -> int:
        return len(seen)

    future, _ = flights.join_or_start("k", look_up)

    def on_done(_future: asyncio.Future) -> None:
        seen.append(flights.running("k"))

    future.add_done_callback(on_done)
    await future
    await asyncio.sleep(0)
    assert seen == [None]


async def test_single_flight_cancel_all_cancels_every_look_up():
    flights: SingleFlight[str, None] = SingleFlight()
    future, _ = flights.join_or_start("k", lambda: asyncio.sleep(60))
    flights.cancel_all()
    with pytest.raises(asyncio.CancelledError):
        await future

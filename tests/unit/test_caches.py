"""The bounded cache and the single-flight guard every in-process cache is built from."""

import asyncio

import pytest

from driftlock_kernel.caches import Batcher, LruCache, SingleFlight


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


def test_lru_cache_oldest_is_the_next_to_be_forgotten():
    cache: LruCache[str, int] = LruCache(3)
    assert cache.oldest() is None
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")
    assert cache.oldest() == ("b", 2)
    assert cache.oldest() == ("b", 2)  # untouched


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
    seen: list[asyncio.Future[int] | None] = []

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


class Store:
    """Stands in for the database: answers batches from a dict, each held until `release` is set."""

    def __init__(self, rows: dict[str, int]):
        self.rows = rows
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.failure: Exception | None = None

    async def look_up(self, keys):
        self.batches.append(list(keys))
        await self.release.wait()
        if self.failure is not None:
            raise self.failure
        return {key: self.rows[key] for key in keys if key in self.rows}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_batcher_sends_a_lone_key_at_once_and_alone():
    store = Store({"a": 1})
    store.release.set()
    batcher: Batcher[str, int] = Batcher(store.look_up, max_batch=10, max_in_flight=2)
    assert await batcher.get("a") == 1
    assert await batcher.get("missing") is None
    assert store.batches == [["a"], ["missing"]]


async def test_batcher_sends_keys_queued_behind_the_batches_in_flight_together():
    store = Store({f"k{i}": i for i in range(10)})
    batcher: Batcher[str, int] = Batcher(store.look_up, max_batch=5, max_in_flight=2)
    waiting = [asyncio.ensure_future(batcher.get(f"k{i}")) for i in range(10)] + [
        asyncio.ensure_future(batcher.get("k3")),  # asked twice: sent once
        asyncio.ensure_future(batcher.get("nobody")),
    ]
    await settle()
    assert store.batches == [["k0"], ["k1"]] and batcher.in_flight == 2
    store.release.set()
    assert await asyncio.gather(*waiting) == [*range(10), 3, None]
    assert store.batches[2:] == [["k2", "k3", "k4", "k5", "k6"], ["k7", "k8", "k9", "nobody"]]
    assert batcher.in_flight == 0


async def test_batcher_drops_a_caller_that_gave_up_and_answers_the_others():
    store = Store({"a": 1, "b": 2, "c": 3})
    batcher: Batcher[str, int] = Batcher(store.look_up, max_batch=10, max_in_flight=1)
    first = asyncio.ensure_future(batcher.get("a"))
    await settle()
    gave_up = asyncio.ensure_future(batcher.get("b"))
    kept = asyncio.ensure_future(batcher.get("c"))
    await settle()
    gave_up.cancel()
    store.release.set()
    assert (await first, await kept) == (1, 3)
    assert gave_up.cancelled()
    assert store.batches == [["a"], ["c"]]


async def test_batcher_fails_every_caller_of_a_failed_batch_and_goes_on():
    store = Store({"a": 1, "b": 2})
    store.failure = ConnectionResetError("database went away")
    batcher: Batcher[str, int] = Batcher(store.look_up, max_batch=10, max_in_flight=1)
    both = [asyncio.ensure_future(batcher.get(key)) for key in ("a", "b")]
    await settle()
    store.release.set()
    for caller in both:
        with pytest.raises(ConnectionResetError):
            await caller
    store.failure = None
    assert await batcher.get("b") == 2


async def test_batcher_times_a_batch_out_for_each_of_its_callers():
    store = Store({"a": 1})  # never released
    batcher: Batcher[str, int] = Batcher(store.look_up, max_batch=10, max_in_flight=1, timeout=0.05)
    with pytest.raises(TimeoutError):
        await batcher.get("a")
    assert batcher.in_flight == 0

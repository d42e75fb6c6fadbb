"""The in-memory index of every key's hash prefix, and the key cache with it: real keys are never rationed as if
invented, invented keys are refused without a query (issue 23, item 1). A fake load stands in for the database."""

import asyncio
import hashlib

import pytest

from authz_service.check.grants import CacheResult, GrantStore, LookupRationed
from authz_service.check.key_index import KeyIndex, prefix_of, sorted_prefixes
from authz_service.check.lookup_budget import LookupBudget
from tests.unit.test_grant_store import Clock, Source, grant


def key_hash(n: int) -> bytes:
    return hashlib.sha256(f"key-{n}".encode()).digest()


class Table:
    """The api_keys table as the index loads it: prefixes sorted as bytes, concatenated."""

    def __init__(self, hashes=()):
        self.hashes = list(hashes)
        self.loads = 0
        self.gate: asyncio.Event | None = None
        self.failing = False

    async def load(self) -> bytes:
        self.loads += 1
        snapshot = list(self.hashes)
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionRefusedError("database down")
        return b"".join(sorted(h[:8] for h in snapshot))


class From:
    def __init__(self, source: str):
        self.source = source


def test_prefixes_keep_the_order_of_their_bytes():
    hashes = [bytes([255] * 8), bytes(8), bytes([1, 0, 0, 0, 0, 0, 0, 0]), bytes([0, 0, 0, 0, 0, 0, 0, 1])]
    loaded = sorted_prefixes(b"".join(sorted(hashes)))
    assert list(loaded) == sorted(prefix_of(h) for h in hashes) and loaded.itemsize == 8
    with pytest.raises(ValueError):
        sorted_prefixes(b"123")


async def test_a_loaded_index_holds_every_key_and_no_other():
    table = Table(key_hash(n) for n in range(1000))
    index = KeyIndex(table.load)
    index.listener_connected()
    await index.wait_loaded()
    assert index.ready and len(index) == 1000
    assert all(index.may_contain(key_hash(n)) for n in range(1000))
    assert not any(index.may_contain(key_hash(n)) for n in range(1000, 2000))


def is_ready(index: KeyIndex) -> bool:
    """The property read afresh: each call changes it, which an inline `index.ready` would hide from mypy."""
    return index.ready


async def test_a_key_notified_while_loading_is_kept_and_the_index_is_ready_only_while_listening():
    table = Table([key_hash(1)])
    index = KeyIndex(table.load)
    table.gate = asyncio.Event()
    index.listener_connected()
    await asyncio.sleep(0)
    assert table.loads == 1 and not is_ready(index)
    table.hashes.append(key_hash(2))  # created after the load's snapshot: only its notification tells
    assert index.add_hex(key_hash(2)[:8].hex())
    table.gate.set()
    await index.wait_loaded()
    assert is_ready(index) and index.may_contain(key_hash(1)) and index.may_contain(key_hash(2))
    index.listener_lost()
    assert not is_ready(index)  # a key created now may never be notified
    assert not index.add_hex("nothex") and not index.add_hex(None) and not index.add_hex("ab")


async def test_a_load_without_the_listener_fills_the_index_but_is_not_trusted():
    table = Table([key_hash(1)])
    index = KeyIndex(table.load)
    index.reload_soon()
    await index.wait_loaded()
    assert index.may_contain(key_hash(1)) and not index.ready


def store_with(index, source, clock, results, **budget):
    return GrantStore(
        source.fetch,
        ttl=30.0,
        negative_ttl=5.0,
        stale_for=300.0,
        max_entries=100,
        fetch_timeout=1.0,
        clock=clock,
        on_result=results.append,
        budget=LookupBudget(burst_seconds=1, clock=clock, **budget),
        index=index,
    )


async def test_real_keys_are_never_rationed_and_invented_ones_cost_no_query_once_the_budget_is_spent():
    real = {key_hash(n): grant(f"k{n}") for n in range(50)}
    table, source, clock = Table(real), Source(real), Clock()
    results: list[CacheResult] = []
    index = KeyIndex(table.load)
    index.listener_connected()
    await index.wait_loaded()
    store = store_with(index, source, clock, results, overall=5, per_source=2)
    flood = [From(f"127.0.{n // 250}.{n % 250}") for n in range(60)]
    for n in range(600):  # invented keys from 60 addresses: the overall budget is spent in the first few
        assert await store.get(key_hash(10_000 + n), flood[n % 60]) is None
    assert source.calls == 5
    assert results.count(CacheResult.NOT_ISSUED) == 595
    # Every real key, from one more address, while the budget stays spent: served, none rationed.
    for key, expected in real.items():
        assert await store.get(key, From("198.51.100.7")) == expected
    assert CacheResult.RATIONED not in results


async def test_a_key_created_during_a_flood_serves_as_soon_as_its_notification_arrives():
    table, clock = Table(), Clock()
    results: list[CacheResult] = []
    source = Source()
    index = KeyIndex(table.load)
    index.listener_connected()
    await index.wait_loaded()
    store = store_with(index, source, clock, results, overall=1, per_source=1)
    attacker = From("203.0.113.9")
    for n in range(20):
        await store.get(key_hash(10_000 + n), attacker)
    new = key_hash(7)
    source.rows[new] = grant("k7")
    index.add_hex(new[:8].hex())  # what the api_keys trigger's notification carries
    store.forget_key("k7")
    assert await store.get(new, From("198.51.100.7")) == grant("k7")


async def test_without_a_ready_index_unknown_keys_are_rationed_as_before():
    real = {key_hash(1): grant()}
    table, source, clock = Table(real), Source(real), Clock()
    results: list[CacheResult] = []
    index = KeyIndex(table.load)
    index.reload_soon()  # loaded, but the listener is not connected: a new key could be missing
    await index.wait_loaded()
    store = store_with(index, source, clock, results, overall=1, per_source=1)
    assert await store.get(key_hash(99), From("203.0.113.9")) is None
    with pytest.raises(LookupRationed):
        await store.get(key_hash(98), From("203.0.113.9"))

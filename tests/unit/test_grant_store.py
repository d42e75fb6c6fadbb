"""The key cache, driven by a fake clock and a fetch function that counts calls (no database needed)."""

import asyncio
from typing import Any

import pytest

from authz_service.check.decision import Grant
from authz_service.check.grants import CacheResult, GrantStore, LookupRationed, StoreUnavailable
from authz_service.check.lookup_budget import LookupBudget
from driftlock_kernel.billing import BillingStatus
from driftlock_kernel.keys import Environment, Scope


def grant(key_id: str = "k1", org_id: str = "o1", plan: str = "free") -> Grant:
    return Grant(
        key_id, org_id, Environment.LIVE, frozenset({Scope.DETECT}), None, False, False, plan, BillingStatus.NONE
    )


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """Stands in for the database: a dict of rows, a call count, and a switch to make it fail or stall."""

    def __init__(self, rows=None):
        self.rows = dict(rows or {})
        self.calls = 0
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def fetch(self, key_hash: bytes):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionRefusedError("database down")
        return self.rows.get(key_hash)


def make_store(source: Source, clock: Clock, results: list[CacheResult] | None = None, **overrides: Any) -> GrantStore:
    options: dict[str, Any] = dict(ttl=30.0, negative_ttl=5.0, stale_for=300.0, max_entries=100, fetch_timeout=1.0)
    options.update(overrides)
    return GrantStore(
        source.fetch, clock=clock, on_result=(results.append if results is not None else lambda r: None), **options
    )


async def test_second_lookup_is_served_from_cache_until_ttl():
    source, clock = Source({b"h1": grant()}), Clock()
    results: list[CacheResult] = []
    store = make_store(source, clock, results)
    assert await store.get(b"h1") == grant()
    assert await store.get(b"h1") == grant()
    assert source.calls == 1
    clock.now += 30.0
    await store.get(b"h1")
    assert source.calls == 2
    assert results == [CacheResult.MISS, CacheResult.HIT, CacheResult.MISS]


async def test_unknown_key_is_cached_negatively_for_the_shorter_ttl():
    source, clock = Source(), Clock()
    store = make_store(source, clock)
    assert await store.get(b"nope") is None
    assert await store.get(b"nope") is None
    assert source.calls == 1
    clock.now += 5.0
    source.rows[b"nope"] = grant()
    assert await store.get(b"nope") == grant()


async def test_concurrent_misses_on_one_key_share_one_query():
    source, clock = Source({b"h1": grant()}), Clock()
    results: list[CacheResult] = []
    source.gate = asyncio.Event()
    store = make_store(source, clock, results)
    waiters = [asyncio.create_task(store.get(b"h1")) for _ in range(50)]
    await asyncio.sleep(0)
    source.gate.set()
    assert await asyncio.gather(*waiters) == [grant()] * 50
    assert source.calls == 1
    assert results.count(CacheResult.COALESCED) == 49


async def test_a_cancelled_waiter_does_not_cancel_the_shared_query():
    source, clock = Source({b"h1": grant()}), Clock()
    source.gate = asyncio.Event()
    store = make_store(source, clock)
    first = asyncio.create_task(store.get(b"h1"))
    second = asyncio.create_task(store.get(b"h1"))
    await asyncio.sleep(0)
    first.cancel()
    source.gate.set()
    assert await second == grant()


@pytest.mark.parametrize(
    ("forget", "argument", "survivor"),
    [("forget_key", "k1", b"h2"), ("forget_org", "o1", b"h2")],
)
async def test_invalidation_drops_only_matching_entries(forget, argument, survivor):
    rows = {b"h1": grant("k1", "o1", "free"), b"h2": grant("k2", "o2", "pro")}
    source, clock = Source(rows), Clock()
    store = make_store(source, clock)
    await store.get(b"h1")
    await store.get(b"h2")
    getattr(store, forget)(argument)
    source.rows[b"h1"] = grant("k1", "o1", "changed")
    assert await plan_of(store, b"h1") == "changed"
    await store.get(survivor)
    assert source.calls == 3


async def test_a_result_read_before_an_invalidation_is_not_cached():
    source, clock = Source({b"h1": grant()}), Clock()
    source.gate = asyncio.Event()
    store = make_store(source, clock)
    pending = asyncio.create_task(store.get(b"h1"))
    await asyncio.sleep(0)
    store.forget_key("k1")  # e.g. revoked while the query was in flight
    source.gate.set()
    await pending
    source.gate = None
    await store.get(b"h1")
    assert source.calls == 2


async def plan_of(store: GrantStore, key_hash: bytes) -> str:
    found = await store.get(key_hash)
    assert found is not None
    return found.plan


async def straddle(store: GrantStore, source: Source, key_hash: bytes, invalidate) -> None:
    """Look `key_hash` up with `invalidate()` happening while the query is in flight."""
    source.gate = asyncio.Event()
    pending = asyncio.create_task(store.get(key_hash))
    await asyncio.sleep(0)
    invalidate()
    source.gate.set()
    await pending
    source.gate = None


async def test_a_result_that_straddles_an_invalidation_of_another_key_or_org_is_cached():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)

    def forget_others() -> None:
        store.forget_key("k2")
        store.forget_org("o2")

    await straddle(store, source, b"h1", forget_others)
    await store.get(b"h1")
    assert source.calls == 1


async def test_a_result_that_straddles_its_organisations_invalidation_is_not_cached():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)
    await straddle(store, source, b"h1", lambda: store.forget_org("o1"))
    await store.get(b"h1")
    assert source.calls == 2


async def test_an_unknown_key_that_straddles_any_key_invalidation_is_not_cached_as_unknown():
    """It may be the very key just created (the insert's NOTIFY is a key invalidation)."""
    source, clock = Source({}), Clock()
    store = make_store(source, clock)
    await straddle(store, source, b"new", lambda: store.forget_key("k9"))
    source.rows[b"new"] = grant("k9")
    assert await store.get(b"new") == grant("k9")


async def test_a_result_that_straddles_a_reconnection_is_kept_as_stale_for_an_outage():
    source, clock = Source({b"h1": grant()}), Clock()
    results: list[CacheResult] = []
    store = make_store(source, clock, results)
    await straddle(store, source, b"h1", store.expire_all)
    source.failing = True
    assert await store.get(b"h1") == grant()  # asked again (not trusted as fresh), served as the fallback
    assert source.calls == 2 and results[-1] is CacheResult.STALE


async def test_outage_serves_a_recently_verified_key_but_not_an_unknown_one():
    source, clock = Source({b"h1": grant()}), Clock()
    results: list[CacheResult] = []
    store = make_store(source, clock, results)
    await store.get(b"h1")
    source.failing = True
    clock.now += 31.0
    assert await store.get(b"h1") == grant()
    assert results[-1] is CacheResult.STALE
    with pytest.raises(StoreUnavailable):
        await store.get(b"never-seen")


async def test_outage_fallback_ends_after_the_stale_window():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)
    await store.get(b"h1")
    source.failing = True
    clock.now += 300.0
    with pytest.raises(StoreUnavailable):
        await store.get(b"h1")


async def test_forgotten_entry_is_not_used_as_outage_fallback():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)
    await store.get(b"h1")
    store.forget_key("k1")
    source.failing = True
    with pytest.raises(StoreUnavailable):
        await store.get(b"h1")


async def test_expire_all_forces_a_query_but_keeps_the_fallback():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)
    await store.get(b"h1")
    store.expire_all()
    await store.get(b"h1")
    assert source.calls == 2
    store.expire_all()
    source.failing = True
    assert await store.get(b"h1") == grant()


async def test_slow_database_counts_as_unavailable():
    source, clock = Source({b"h1": grant()}), Clock()
    source.gate = asyncio.Event()  # never set
    store = make_store(source, clock, fetch_timeout=0.05)
    with pytest.raises(StoreUnavailable):
        await store.get(b"h1")


async def test_cache_is_bounded_and_evicts_the_least_recently_used():
    rows = {f"h{i}".encode(): grant(f"k{i}") for i in range(4)}
    source, clock = Source(rows), Clock()
    store = make_store(source, clock, max_entries=3)
    for i in range(3):
        await store.get(f"h{i}".encode())
    await store.get(b"h0")  # h0 is now the most recently used
    await store.get(b"h3")  # evicts h1
    assert len(store) == 3
    calls = source.calls
    await store.get(b"h0")
    assert source.calls == calls
    await store.get(b"h1")
    assert source.calls == calls + 1


# --- keys nobody holds: a cache of their own, and a budget for looking them up ---------------------------------


class From:
    def __init__(self, source: str):
        self.source = source


async def test_unknown_keys_never_evict_verified_ones():
    """2,500 invented keys through a cache of 2,000 verified ones, then the database goes: every verified key is
    still served from what was cached (the documented outage fallback)."""
    rows = {f"k{i}".encode(): grant(f"k{i}") for i in range(2000)}
    source, clock = Source(rows), Clock()
    store = make_store(source, clock, max_entries=2000, max_unknown_entries=500)
    for key_hash in rows:
        await store.get(key_hash)
    for n in range(2500):
        assert await store.get(f"invented-{n}".encode()) is None
    assert store.verified_entries == 2000
    source.failing = True
    clock.now += 31.0  # past the TTL: each verified key asks the database, which is down
    for key_hash, expected in rows.items():
        assert await store.get(key_hash) == expected


async def test_cache_sizes_are_exported_and_unknown_keys_stay_within_their_cap():
    from prometheus_client import REGISTRY

    from authz_service import metrics

    source, clock = Source({b"k1": grant()}), Clock()
    store = make_store(source, clock, max_unknown_entries=50)
    metrics.watch_key_cache(store)
    await store.get(b"k1")
    for n in range(120):
        await store.get(f"invented-{n}".encode())

    def entries(cache: str) -> float | None:
        return REGISTRY.get_sample_value("driftlock_authz_key_cache_entries", {"cache": cache})

    assert (store.verified_entries, store.unknown_entries) == (1, 50)
    assert (entries("verified"), entries("unknown")) == (1.0, 50.0)


async def test_lookups_of_unknown_keys_are_rationed_per_source():
    source, clock = Source(), Clock()
    results: list[CacheResult] = []
    store = make_store(
        source, clock, results, budget=LookupBudget(burst_seconds=1, overall=1000, per_source=5, clock=clock)
    )
    flooder = From("203.0.113.9")
    rationed = 0
    for n in range(100):
        try:
            await store.get(f"invented-{n}".encode(), flooder)
        except LookupRationed:
            rationed += 1
    assert source.calls == 5 and rationed == 95
    assert results.count(CacheResult.RATIONED) == 95
    # Another client is not held back by the flooder's spending.
    assert await store.get(b"someone-else", From("198.51.100.7")) is None
    assert source.calls == 6


async def test_a_rationed_lookup_is_unavailable_not_invalid():
    source, clock = Source({b"valid": grant()}), Clock()
    store = make_store(source, clock, budget=LookupBudget(burst_seconds=1, overall=1000, per_source=1, clock=clock))
    await store.get(b"invented", From("203.0.113.9"))
    with pytest.raises(StoreUnavailable):  # the key may well be valid: we did not ask
        await store.get(b"valid", From("203.0.113.9"))


async def test_keys_that_exist_do_not_spend_the_budget():
    """A replica starting cold, or a client with many keys, looks all of them up."""
    rows = {f"k{i}".encode(): grant(f"k{i}") for i in range(200)}
    source, clock = Source(rows), Clock()
    store = make_store(source, clock, budget=LookupBudget(burst_seconds=1, overall=10, per_source=2, clock=clock))
    client = From("198.51.100.7")
    for key_hash, expected in rows.items():
        assert await store.get(key_hash, client) == expected
    assert source.calls == 200


async def test_a_verified_key_is_looked_up_again_whatever_the_budget():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock, budget=LookupBudget(burst_seconds=1, overall=1, per_source=1, clock=clock))
    client = From("198.51.100.7")
    await store.get(b"h1", client)
    await store.get(b"invented", client)  # spends the source's (and the overall) budget
    clock.now += 30.0
    assert await store.get(b"h1", client) == grant()  # its TTL asks the database again, unrationed
    assert source.calls == 3


async def test_joining_a_lookup_under_way_costs_nothing():
    source, clock = Source(), Clock()
    source.gate = asyncio.Event()
    store = make_store(source, clock, budget=LookupBudget(burst_seconds=1, overall=1000, per_source=1, clock=clock))
    client = From("203.0.113.9")
    waiters = [asyncio.create_task(store.get(b"invented", client)) for _ in range(20)]
    await asyncio.sleep(0)
    source.gate.set()
    assert await asyncio.gather(*waiters) == [None] * 20
    assert source.calls == 1


async def test_a_key_that_disappears_moves_to_the_unknown_cache():
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)
    await store.get(b"h1")
    del source.rows[b"h1"]
    clock.now += 30.0
    assert await store.get(b"h1") is None
    assert store.verified_entries == 0
    assert await store.get(b"h1") is None  # answered from the unknown cache
    assert source.calls == 2


# --- what a cached key costs ------------------------------------------------------------------------------------


def row(key_id: str, scopes: list[str]) -> dict:
    """A row of the look-up as asyncpg gives it: a new string object per column of each row."""
    return {
        "key_id": key_id,
        "org_id": "".join(["0b5c1f5e-0000-4000-8000-", "00000000000a"]),
        "environment": "live",
        "scopes": scopes,
        "expires_at": None,
        "revoked": False,
        "org_suspended": False,
        "plan": "".join(["pr", "o"]),
        "billing_status": "".join(["act", "ive"]),
        "past_due_since": None,
        "period_start": None,
        "period_end": None,
        "stripe_customer": None,
    }


def test_cached_grants_of_one_organisation_share_what_they_have_in_common():
    """100,000 cached keys hold one copy of each organisation's id, plan, billing status and scope set, not one
    per key (about a third of a cached key's memory)."""
    from authz_service.check.grants import grant_from_row

    first = grant_from_row(row("k1", ["detect", "read"]))
    second = grant_from_row(row("k2", ["read", "detect"]))
    assert first.org_id is second.org_id
    assert first.plan is second.plan and first.billing_status is second.billing_status
    assert first.scopes is second.scopes and first.scopes == {"detect", "read"}
    assert (first.key_id, second.key_id) == ("k1", "k2")


async def test_a_refresh_that_finds_nothing_changed_keeps_the_cached_grant():
    """No new long-lived objects per key and TTL: they would make the garbage collector rescan a full cache."""
    source, clock = Source({b"h1": grant()}), Clock()
    store = make_store(source, clock)
    cached = await store.get(b"h1")
    source.rows[b"h1"] = grant()  # equal, another object (as a new row is)
    clock.now += 30.0
    assert await store.get(b"h1") is cached
    assert source.calls == 2
    source.rows[b"h1"] = grant(plan="pro")
    clock.now += 30.0
    assert await plan_of(store, b"h1") == "pro"
    assert await plan_of(store, b"h1") == "pro"
    assert source.calls == 3

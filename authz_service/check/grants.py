"""Key grants: a bounded in-process cache in front of PostgreSQL, kept honest by push invalidation.

- A looked-up key is trusted for `ttl` seconds; an unknown key stays unknown for `negative_ttl`.
- Verified keys and unknown keys live in two bounded caches: keys made up by a client (as many as it likes)
  only ever evict other unknown keys, never a verified one, so they cannot flush the entries that carry
  customers through a database outage.
- With a `KeyIndex` (every key's hash prefix, in memory) that is ready, a key it holds is looked up unrationed,
  whatever floods the replica; a key it does not hold was never issued: it is looked up only while the budget
  lasts (in case it was created a moment ago and its notification is still on its way), and past the budget it
  is unknown at once, from memory.
- Without a ready index, looking up a key this replica has not verified is rationed (`LookupBudget`: overall and
  per source address, spent only by look-ups that find nothing); past the budget the answer is
  `LookupRationed`, a kind of `StoreUnavailable`, without a query. A verified key is looked up again whenever
  its TTL asks, unrationed.
- Many requests missing on the same key at once share one database query, and misses on different keys that
  queue behind the look-ups under way go together in the next one (`database_fetch`).
- A change pushed by the database (revocation, suspension, billing change) drops the affected entries at once.
  When the push channel reconnects, everything is marked stale, since changes may have been missed.
- When the database cannot be reached, a key verified within `stale_for` seconds keeps working; anything else
  raises `StoreUnavailable`. An unverified key is never allowed.
"""

import asyncio
import functools
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Protocol

import asyncpg

from authz_service.check.decision import Grant
from authz_service.check.key_index import KeyIndex
from authz_service.check.lookup_budget import LookupBudget
from authz_service.check.networks import AllowedNetworks
from driftlock_kernel import db
from driftlock_kernel.billing import BillingStatus
from driftlock_kernel.caches import Batcher, LruCache, SingleFlight
from driftlock_kernel.errors import one_line
from driftlock_kernel.keys import Environment, Scope
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)

Fetch = Callable[[bytes], Awaitable[Grant | None]]


class StoreUnavailable(Exception):
    """The key is not in the cache (or too old to trust) and the database did not answer."""


class LookupRationed(StoreUnavailable):
    """The key is unknown to this replica and the budget for looking up unknown keys is spent (for its source,
    or overall): no query was sent."""


class Requester(Protocol):
    """Who asks: only the look-up of a key unknown to this replica reads `source`."""

    @property
    def source(self) -> str: ...


class CacheResult(StrEnum):
    HIT = "hit"
    NEGATIVE_HIT = "negative_hit"
    MISS = "miss"
    COALESCED = "coalesced"
    STALE = "stale"
    ERROR = "error"
    RATIONED = "rationed"
    NOT_ISSUED = "not_issued"  # not in the key index, and the look-up budget spent: unknown, from memory


@dataclass(slots=True)
class _Entry:
    grant: Grant | None
    fetched_at: float
    fresh_until: float


class GrantStore:
    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl: float,
        negative_ttl: float,
        stale_for: float,
        max_entries: int,
        fetch_timeout: float,
        max_unknown_entries: int = 10_000,
        budget: LookupBudget | None = None,
        index: KeyIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_result: Callable[[CacheResult], None] = lambda result: None,
    ):
        self._fetch = fetch
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._stale_for = stale_for
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._on_result = on_result
        self._budget = budget
        self._index = index
        self._known: LruCache[bytes, _Entry] = LruCache(max_entries)
        self._unknown: LruCache[bytes, _Entry] = LruCache(max_unknown_entries)
        self._fetches: SingleFlight[bytes, Grant | None] = SingleFlight()
        # The invalidations of late, numbered: a fetch that straddles one of its own key or organisation may have
        # read the old row, so its answer serves the requests waiting for it but is not cached; one that straddles
        # a reconnection of the listener (when changes may have been missed) is cached as stale.
        self._invalidations = 0
        self._recent: deque[tuple[int, _Invalidated, str]] = deque(maxlen=_RECENT_INVALIDATIONS)
        self._failures = RepeatedLog(log)

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    @property
    def verified_entries(self) -> int:
        return len(self._known)

    @property
    def unknown_entries(self) -> int:
        return len(self._unknown)

    async def get(self, key_hash: bytes, requester: Requester | None = None) -> Grant | None:
        known = self._known.get(key_hash)
        if known is not None and self._clock() < known.fresh_until:
            self._on_result(CacheResult.HIT)
            return known.grant
        if known is None:
            unknown = self._unknown.get(key_hash)
            if unknown is not None and self._clock() < unknown.fresh_until:
                self._on_result(CacheResult.NEGATIVE_HIT)
                return None
        pending = self._fetches.running(key_hash)
        if pending is not None:
            self._on_result(CacheResult.COALESCED)
        else:
            # A key this replica has not verified: the look-up is paid from the budget, unless the key exists.
            source = None
            issued = known is not None or (
                self._index is not None and self._index.ready and self._index.may_contain(key_hash)
            )
            if not issued and self._budget is not None:
                source = requester.source if requester is not None else ""
                if not self._budget.reserve(source):
                    if self._index is not None and self._index.ready:
                        # Never issued (or issued within the last moment, its notification not yet here: the
                        # client's retry finds it): refused from memory, not cached, no query.
                        self._on_result(CacheResult.NOT_ISSUED)
                        return None
                    self._on_result(CacheResult.RATIONED)
                    raise LookupRationed("the budget for looking up unknown keys is spent")
            since = self._invalidations
            pending, _joined = self._fetches.join_or_start(key_hash, lambda: self._refresh(key_hash, since, source))
        # shield: a caller that gives up (Envoy's deadline) must not cancel the query others wait on.
        return await asyncio.shield(pending)

    async def _refresh(self, key_hash: bytes, since: int, rationed_source: str | None) -> Grant | None:
        try:
            grant = await asyncio.wait_for(self._fetch(key_hash), self._fetch_timeout)
        except db.DATABASE_ERRORS as error:
            return self._fallback(key_hash, error)
        self._on_result(CacheResult.MISS)
        if grant is not None and rationed_source is not None and self._budget is not None:
            self._budget.refund(rationed_source)
        straddled = self._straddled(since, grant)
        if straddled is None:
            grant = self._store(key_hash, grant)
        elif straddled is _Invalidated.ALL and grant is not None:
            grant = self._store(key_hash, grant, fresh=False)
        return grant

    def _straddled(self, since: int, grant: Grant | None) -> "_Invalidated | None":
        """The invalidation since `since` that concerns this answer (the most severe), or None."""
        if since == self._invalidations:
            return None
        if not self._recent or self._recent[0][0] > since + 1:
            return _Invalidated.KEY  # lost track of what happened meanwhile: trust nothing
        found = None
        for number, kind, row_id in self._recent:
            if number <= since:
                continue
            if kind is _Invalidated.ALL:
                found = kind
            elif grant is None or row_id in (grant.key_id, grant.org_id):
                # An unknown key may be the very key just created: its insert is an invalidation too.
                return kind
        return found

    def _fallback(self, key_hash: bytes, error: BaseException) -> Grant | None:
        entry = self._known.peek(key_hash) or self._unknown.peek(key_hash)
        if entry is not None and self._clock() - entry.fetched_at < self._stale_for:
            self._on_result(CacheResult.STALE)
            return entry.grant
        self._on_result(CacheResult.ERROR)
        # During an outage this happens for every unknown key: one line now, then a count a minute.
        self._failures.warning(
            type(error).__name__,
            "key look-up failed and no recent answer is cached: %s: %s",
            type(error).__name__,
            one_line(error),
        )
        raise StoreUnavailable(str(error)) from error

    def _store(self, key_hash: bytes, grant: Grant | None, *, fresh: bool = True) -> Grant | None:
        """Cache the answer; returns the grant as cached."""
        now = self._clock()
        if grant is None:
            self._known.pop(key_hash)
            self._unknown.put(key_hash, _Entry(None, fetched_at=now, fresh_until=now + self._negative_ttl))
            return None
        self._unknown.pop(key_hash)
        fresh_until = now + self._ttl if fresh else 0.0
        entry = self._known.get(key_hash)
        if entry is not None and entry.grant == grant:
            # The TTL's look-up found nothing changed: the cached objects stay. Otherwise a full cache refreshing
            # every TTL makes two new long-lived objects per key each time, and whenever a quarter of it has been
            # replaced Python's collector scans all of it again: up to 400 ms at 100,000 keys on a busy 2-core
            # machine (bench/memory.py), during which no check is answered.
            entry.fetched_at, entry.fresh_until = now, fresh_until
            return entry.grant
        self._known.put(key_hash, _Entry(grant, fetched_at=now, fresh_until=fresh_until))
        return grant

    # --- invalidation ---------------------------------------------------------------------------------------

    def _note(self, kind: "_Invalidated", row_id: str) -> None:
        self._invalidations += 1
        self._recent.append((self._invalidations, kind, row_id))

    def _forget(self, matches: Callable[[Grant], bool]) -> None:
        doomed = [h for h, e in self._known.items() if e.grant is not None and matches(e.grant)]
        for key_hash in doomed:
            self._known.pop(key_hash)

    def forget_key(self, key_id: str) -> None:
        self._note(_Invalidated.KEY, key_id)
        self._forget(lambda grant: grant.key_id == key_id)

    def forget_org(self, org_id: str) -> None:
        self._note(_Invalidated.ORG, org_id)
        self._forget(lambda grant: grant.org_id == org_id)

    def expire_all(self) -> None:
        """Ask the database again before trusting any entry, but keep them as the fallback for an outage."""
        self._note(_Invalidated.ALL, "")
        for cache in (self._known, self._unknown):
            for entry in cache.values():
                entry.fresh_until = 0.0


class _Invalidated(Enum):
    KEY = "key"
    ORG = "org"
    ALL = "all"  # the listener (re)connected: anything may have changed meanwhile


# How many invalidations are remembered for the fetches under way; a fetch that saw more go by trusts nothing.
_RECENT_INVALIDATIONS = 10_000


_GRANTS_QUERY = """
    SELECT k.key_hash, k.id::text AS key_id, k.org_id::text AS org_id, k.environment, k.scopes,
           extract(epoch FROM k.expires_at)::float8 AS expires_at, k.revoked_at IS NOT NULL AS revoked,
           o.suspended_at IS NOT NULL AS org_suspended, o.plan_name AS plan, o.billing_status,
           extract(epoch FROM o.past_due_since)::float8 AS past_due_since,
           extract(epoch FROM o.period_start)::float8 AS period_start,
           extract(epoch FROM o.period_end)::float8 AS period_end, o.stripe_customer_id AS stripe_customer,
           o.max_overage_units, k.max_units_per_period AS max_units, k.rate_limit_rps, k.rate_limit_above_plan,
           k.allowed_cidrs, k.products
    FROM driftlock.api_keys k
    JOIN driftlock.organizations o ON o.id = k.org_id
    WHERE k.key_hash = ANY($1::bytea[])
"""
# Keys per statement, and statements under way at once. One at a time: keys missed meanwhile wait at most one
# round trip and then go together (bench/cold.py: about a third of the statements of two at a time, at no
# less throughput), and a cold cache leaves the rest of authz's pool to the meter's flushes and usage loads.
LOOKUP_BATCH = 128
LOOKUPS_IN_FLIGHT = 1


def database_fetch(pool: asyncpg.Pool, *, timeout: float | None = None) -> Fetch:
    """Each key's grant, from the database. Keys missed while look-ups are under way go together in the next
    statement (`Batcher`): a cold cache under load sends a statement per batch of keys, not one per key."""

    async def fetch_many(key_hashes: Sequence[bytes]) -> dict[bytes, Grant]:
        rows = await pool.fetch(_GRANTS_QUERY, key_hashes)
        return {bytes(row["key_hash"]): grant_from_row(row) for row in rows}

    return Batcher(fetch_many, max_batch=LOOKUP_BATCH, max_in_flight=LOOKUPS_IN_FLIGHT, timeout=timeout).get


def grant_from_row(row: db.Row) -> Grant:
    """A grant as the cache keeps it: what every key of an organisation shares (its id, plan and billing
    status, the set of scopes) is one object, not one copy per key. A cache of 100,000 keys holds them all;
    the copies were about a third of a cached key's memory."""
    return Grant(
        key_id=row["key_id"],
        org_id=sys.intern(row["org_id"]),
        environment=Environment(row["environment"]),
        scopes=_scope_set(tuple(sorted(row["scopes"]))),
        expires_at=_shared_time(row["expires_at"]),
        revoked=row["revoked"],
        org_suspended=row["org_suspended"],
        plan=sys.intern(row["plan"]),
        billing_status=BillingStatus(row["billing_status"]),
        past_due_since=_shared_time(row["past_due_since"]),
        period_start=_shared_time(row["period_start"]),
        period_end=_shared_time(row["period_end"]),
        stripe_customer=sys.intern(row["stripe_customer"]) if row["stripe_customer"] is not None else None,
        **_controls(row),
    )


def _controls(row: db.Row) -> dict:
    """The customer controls of the key and its organisation (migration 0013), as the grant holds them; a row
    without those columns (a fetch written before them) has none."""
    keys = row.keys()
    if "max_units" not in keys:
        return {}
    cidrs, products = row["allowed_cidrs"], row["products"]
    return {
        "max_overage_units": row["max_overage_units"],
        "max_units": row["max_units"],
        "rate_limit_rps": row["rate_limit_rps"],
        "rate_limit_above_plan": row["rate_limit_above_plan"],
        "allowed_networks": AllowedNetworks(cidrs) if cidrs is not None else None,
        "products": _product_set(tuple(sorted(products))) if products is not None else None,
    }


@functools.lru_cache(maxsize=8)
def _product_set(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(sys.intern(name) for name in names)


# One float object per distinct time: every key of an organisation has the same period (and often the same
# expiry), and a float is 24 bytes a copy. Cleared when full, so a stream of distinct times cannot grow it.
_SHARED_TIMES: dict[float, float] = {}
MAX_SHARED_TIMES = 50_000


def _shared_time(value: float | None) -> float | None:
    if value is None:
        return None
    shared = _SHARED_TIMES.get(value)
    if shared is None:
        if len(_SHARED_TIMES) >= MAX_SHARED_TIMES:
            _SHARED_TIMES.clear()
        shared = _SHARED_TIMES[value] = value
    return shared


@functools.lru_cache(maxsize=64)  # sorted: at most 7 sets of three scopes
def _scope_set(names: tuple[str, ...]) -> frozenset[Scope]:
    return frozenset(Scope(name) for name in names)

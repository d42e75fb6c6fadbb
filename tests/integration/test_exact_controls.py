"""A spend cap and a key's unit cap across replicas against real PostgreSQL (issue 20): two authorizers (two
replicas' pipelines, each with its own meters and pool) race past each cap. Far from a cap they count in
memory; within the exact margin every call is reserved in the database first. Together they serve exactly the
cap: the overshoot printed is what was measured."""

import asyncio
import dataclasses
import uuid

from authz_service.check.assembly import CheckParts, assemble_authorizer
from authz_service.check.authorizer import AccessRequest, Authorizer
from authz_service.check.decision import DenyCode, Grant
from authz_service.check.grants import GrantStore
from authz_service.check.plan_book import PlanBook, database_load
from authz_service.usage.meter_store import KEY_TABLES, TEST_TABLES, MeterStore
from authz_service.usage.metering import Meter
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel import api_keys, db, plans
from driftlock_kernel.billing import BillingStatus
from driftlock_kernel.keys import Environment, Scope
from driftlock_kernel.settings import Settings
from tests.support.authz_requests import STREAM_DETECT
from tests.support.usage import stored_usage


async def replica(database_url, grant: Grant, margin: int, transaction_pooler: bool | None):
    pool = await db.create_pool(
        database_url, application_name="tests-exact-controls", max_size=4, transaction_pooler=transaction_pooler
    )

    async def fetch(_key_hash):
        return grant

    store = GrantStore(fetch, ttl=60, negative_ttl=5, stale_for=60, max_entries=10, fetch_timeout=2)
    name = f"r-{uuid.uuid4().hex[:6]}"
    meter = Meter(UsageLedger(), MeterStore(pool, replica=name))
    key_meter = Meter(UsageLedger(), MeterStore(pool, replica=name, tables=KEY_TABLES), live=False)
    test_meter = Meter(UsageLedger(), MeterStore(pool, replica=name, tables=TEST_TABLES), live=False)
    authorizer = assemble_authorizer(
        CheckParts(store, PlanBook(database_load(pool)), meter, test_meter, key_meter=key_meter),
        # Reservations wait long enough on a loaded machine: one without an answer is counted as if the database
        # were down (the outage path, tested elsewhere), which is not what these tests measure.
        Settings(quota_exact_margin_units=margin, database_lookup_timeout_seconds=10),
    )
    return authorizer, (meter, key_meter), pool


async def race(replicas, secret: str, waves: int = 8, per_wave: int = 100) -> list[DenyCode | None]:
    async def call(authorizer: Authorizer, i: int):
        access = AccessRequest(f"r-{i}", "POST", "/", {"authorization": f"Bearer {secret}"}, STREAM_DETECT)
        return (await authorizer.check(access)).decision.code

    codes = []
    for wave in range(waves):  # waves with flushes between them: the far path first, then the near one
        codes += await asyncio.gather(*(call(replicas[i % 2][0], wave * per_wave + i) for i in range(per_wave)))
        for _authorizer, meters, _pool in replicas:
            for meter in meters:
                await meter.flush_cycle()
    return codes


async def setup(pool, make_org, grant_changes: dict, **plan):
    name = f"ctl-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, name, **plan)
    org = await make_org(plan=name)
    async with pool.acquire() as conn:
        key, secret = await api_keys.create_key(conn, org.id, scopes=(Scope.DETECT,))
    grant = Grant(str(key.id), str(org.id), Environment.LIVE, frozenset({Scope.DETECT}), None, False, False, name,
                  BillingStatus.NONE)  # fmt: skip
    return org, key, secret, dataclasses.replace(grant, **grant_changes)


async def test_two_replicas_stop_exactly_at_the_spend_cap(database_url, transaction_pooler, pool, make_org):
    org, _key, secret, grant = await setup(
        pool, make_org, {"max_overage_units": 100}, included_units=200, overage="soft"
    )
    replicas = [await replica(database_url, grant, 100, transaction_pooler) for _ in range(2)]
    try:
        codes = await race(replicas, secret)
        served = codes.count(None)
        print(f"\nspend cap: 2 replicas, included 200 + cap 100, margin 100, 800 calls: {served} served, "
              f"overshoot {served - 300}")  # fmt: skip
        assert served == 300
        assert set(codes) == {None, DenyCode.SPEND_CAP_REACHED}
        assert sum((await stored_usage(pool, org.id)).values()) == 300
    finally:
        for _authorizer, _meters, replica_pool in replicas:
            await replica_pool.close()


async def test_two_replicas_stop_exactly_at_a_keys_unit_cap(database_url, transaction_pooler, pool, make_org):
    org, key, secret, grant = await setup(pool, make_org, {"max_units": 250}, included_units=100_000, overage="soft")
    replicas = [await replica(database_url, grant, 100, transaction_pooler) for _ in range(2)]
    try:
        codes = await race(replicas, secret)
        served = codes.count(None)
        print(f"\nkey cap: 2 replicas, cap 250, margin 100, 800 calls: {served} served, overshoot {served - 250}")
        assert served == 250
        assert set(codes) == {None, DenyCode.KEY_QUOTA_EXCEEDED}
        assert sum((await stored_usage(pool, org.id)).values()) == 250
        key_total = await pool.fetchval("SELECT sum(units) FROM driftlock.key_usage_totals WHERE org_id = $1", key.id)
        key_counted = await pool.fetchval(
            "SELECT sum(units) FROM driftlock.key_usage_counters WHERE org_id = $1", key.id
        )
        assert key_total == key_counted == 250
    finally:
        for _authorizer, _meters, replica_pool in replicas:
            await replica_pool.close()


async def test_a_keys_reserved_units_are_given_back_when_the_org_cap_refuses(
    database_url, transaction_pooler, pool, make_org
):
    """Both caps near: the key's reservation counts first; the calls the organisation's block cap then refuses
    give the key its units back, so the key's stored usage is what was served."""
    org, key, secret, grant = await setup(pool, make_org, {"max_units": 400}, included_units=300, overage="block")
    replicas = [await replica(database_url, grant, 1000, transaction_pooler) for _ in range(2)]
    try:
        codes = await race(replicas, secret, waves=4)
        served = codes.count(None)
        print(f"\nkey cap 400 over a block cap 300, 2 replicas, 400 calls: {served} served")
        assert served == 300
        assert sum((await stored_usage(pool, org.id)).values()) == 300
        key_total = await pool.fetchval("SELECT sum(units) FROM driftlock.key_usage_totals WHERE org_id = $1", key.id)
        assert key_total == 300
    finally:
        for _authorizer, _meters, replica_pool in replicas:
            await replica_pool.close()

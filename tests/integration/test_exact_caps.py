"""Block caps across replicas against real PostgreSQL: two authorizers (two replicas' pipelines, each with its
own meter and pool) race one organisation past its cap. Far from the cap they count in memory; within the exact
margin every call is reserved in the database first. Together they serve exactly the cap."""

import asyncio
import uuid

from authz_service.check.assembly import CheckParts, assemble_authorizer
from authz_service.check.authorizer import AccessRequest, Authorizer
from authz_service.check.decision import DenyCode, Grant
from authz_service.check.grants import GrantStore
from authz_service.check.plan_book import PlanBook, database_load
from authz_service.usage.meter_store import TEST_TABLES, MeterStore
from authz_service.usage.metering import Meter
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel import api_keys, db, plans
from driftlock_kernel.billing import BillingStatus, Overage
from driftlock_kernel.keys import Environment, Scope
from driftlock_kernel.settings import Settings
from tests.support.authz_requests import STREAM_DETECT
from tests.support.usage import stored_usage


async def replica(database_url, grant: Grant, margin: int, transaction_pooler: bool | None):
    pool = await db.create_pool(
        database_url, application_name="tests-exact-caps", max_size=4, transaction_pooler=transaction_pooler
    )

    async def fetch(_key_hash):
        return grant

    store = GrantStore(fetch, ttl=60, negative_ttl=5, stale_for=60, max_entries=10, fetch_timeout=2)
    meter = Meter(UsageLedger(), MeterStore(pool, replica=f"r-{uuid.uuid4().hex[:6]}"))
    test_meter = Meter(UsageLedger(), MeterStore(pool, replica="tests", tables=TEST_TABLES), live=False)
    authorizer = assemble_authorizer(
        CheckParts(store, PlanBook(database_load(pool)), meter, test_meter), Settings(quota_exact_margin_units=margin)
    )
    return authorizer, meter, pool


async def test_two_replicas_serve_exactly_the_cap_through_far_and_near_paths(
    database_url, transaction_pooler, pool, make_org
):
    name = f"cap-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, name, included_units=300, overage=Overage.BLOCK)
    org = await make_org(plan=name)
    async with pool.acquire() as conn:
        _key, secret = await api_keys.create_key(conn, org.id, scopes=(Scope.DETECT,))
    grant = Grant(
        "k", str(org.id), Environment.LIVE, frozenset({Scope.DETECT}), None, False, False, name, BillingStatus.NONE
    )
    replicas = [await replica(database_url, grant, 100, transaction_pooler) for _ in range(2)]
    try:

        async def call(authorizer: Authorizer, i: int):
            access = AccessRequest(f"r-{i}", "POST", "/", {"authorization": f"Bearer {secret}"}, STREAM_DETECT)
            return (await authorizer.check(access)).decision.code

        codes = []
        for wave in range(8):  # waves with flushes between them: the far path first, then the near one
            codes += await asyncio.gather(*(call(replicas[i % 2][0], wave * 100 + i) for i in range(100)))
            for _authorizer, meter, _pool in replicas:
                await meter.flush_cycle()
        served = codes.count(None)
        print(f"\n2 replicas, cap 300, margin 100, 800 calls: {served} served")
        assert served == 300
        assert set(codes) == {None, DenyCode.QUOTA_EXCEEDED}
        assert sum((await stored_usage(pool, org.id)).values()) == 300
        # The pooled total the reservations check against moved with the counters, unit for unit.
        total = await pool.fetchval("SELECT sum(units) FROM driftlock.usage_totals WHERE org_id = $1", org.id)
        assert total == 300
        statements = await pool.fetchval(
            "SELECT count(*) FROM driftlock.meter_flushes WHERE replica = ANY($1::text[])",
            [meter._store._replica for _a, meter, _p in replicas],
        )
        assert statements > 50  # the last units (within the margin) were reserved, one statement each
    finally:
        for _authorizer, _meter, replica_pool in replicas:
            await replica_pool.close()

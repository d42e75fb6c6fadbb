"""Retention: rows past their table's retention go, recent ones stay, deduplication still holds inside the
window, `deferred` Stripe events are kept, and one replica at a time runs each interval's pruning.

On a database of its own: the shared session database has authz replicas whose own pruners may run."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from authz_service.server import authz_pruner
from authz_service.usage.meter_store import MeterStore
from authz_service.usage.refunds import NO_TERMS
from authz_service.usage.usage_ledger import Batch, Report
from billing_webhooks.app import webhook_pruner
from driftlock_kernel import db, migrate, orgs, retention
from driftlock_kernel.settings import Settings
from tests.support.cli import run_cli

OLD = timedelta(days=400)
RECENT = timedelta(hours=1)
KEEP = {"meter_flushes": timedelta(days=30), "usage_reports": timedelta(days=35), "audit_log": timedelta(days=90),
        "stripe_events": timedelta(days=90)}  # fmt: skip


@pytest.fixture
async def retention_db(fresh_database_url, transaction_pooler):
    async with db.connection(fresh_database_url, transaction_pooler=transaction_pooler) as conn:
        await migrate.migrate(conn)
    pool = await db.create_pool(
        fresh_database_url, application_name="retention-tests", max_size=4, transaction_pooler=transaction_pooler
    )
    yield fresh_database_url, pool
    await pool.close()


async def plant(conn, org_id, age: timedelta) -> dict[str, str]:
    """One row of each pruned table, `age` old; returns their keys."""
    at = datetime.now(UTC) - age
    flush_id, request_id, event_id = uuid.uuid4(), f"req-{uuid.uuid4()}", f"evt_{uuid.uuid4().hex}"
    await conn.execute(
        "INSERT INTO driftlock.meter_flushes (flush_id, replica, units, flushed_at) VALUES ($1, 'r', 1, $2)",
        flush_id,
        at,
    )
    await conn.execute(
        """INSERT INTO driftlock.usage_reports (request_id, org_id, period_start, product, units, reported_at)
           VALUES ($1, $2, $3, 'stream', 1, $4)""",
        request_id,
        org_id,
        at,
        at,
    )
    audit_id = await conn.fetchval(
        "INSERT INTO driftlock.audit_log (at, decision, code) VALUES ($1, 'deny', 'invalid_api_key') RETURNING id",
        at,
    )
    await conn.execute(
        """INSERT INTO driftlock.stripe_events (id, type, created, payload, outcome, received_at)
           VALUES ($1, 'invoice.paid', $2, '{}'::jsonb, 'applied', $2)""",
        event_id,
        at,
    )
    return {"meter_flushes": str(flush_id), "usage_reports": request_id, "audit_log": str(audit_id),
            "stripe_events": event_id}  # fmt: skip


async def present(conn, keys: dict[str, str]) -> set[str]:
    found = set()
    for name, key in keys.items():
        table = retention.TABLES[name]
        if await conn.fetchval(f"SELECT count(*) FROM {table.table} WHERE {table.key_column}::text = $1", key):
            found.add(name)
    return found


def pruner(pool, replica: str = "replica-a") -> retention.Pruner:
    return retention.Pruner(pool, dict(KEEP), interval=3600, replica=replica, batch=2)


async def test_old_rows_go_recent_rows_stay(retention_db):
    _url, pool = retention_db
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "Retention")
        old = [await plant(conn, org.id, OLD) for _ in range(3)]  # more than one batch of 2
        recent = await plant(conn, org.id, RECENT)
    deleted = await pruner(pool).run_once()
    assert deleted == dict.fromkeys(KEEP, 3)
    async with pool.acquire() as conn:
        assert [await present(conn, keys) for keys in old] == [set()] * 3
        assert await present(conn, recent) == set(KEEP)
        detail = await conn.fetchval("SELECT detail FROM driftlock.maintenance_runs WHERE task = 'prune'")
    assert detail == {"deleted": deleted}


async def test_deduplication_still_holds_inside_the_window(retention_db):
    _url, pool = retention_db
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "Dedupe")
        old = await plant(conn, org.id, OLD)
        recent = await plant(conn, org.id, timedelta(days=20))
    await pruner(pool).run_once()
    store = MeterStore(pool, replica="replica-a")
    period = datetime(2026, 1, 1, tzinfo=UTC)
    # A flush retried with an id the table still holds adds nothing ...
    again = await store.flush(Batch(uuid.UUID(recent["meter_flushes"]), {(str(org.id), period, "stream", NO_TERMS): 5}))
    assert not again.applied
    # ... nor does a backend report sent again with a request id still kept.
    report = Report(recent["usage_reports"], str(org.id), period, "stream", 7)
    await store.flush(Batch(uuid.uuid4(), {}, [report]))
    assert await store.stored_by_product(str(org.id), period) == {}
    # A pruned flush id is unknown again: that is why retention is far longer than any retry.
    assert (
        await store.flush(Batch(uuid.UUID(old["meter_flushes"]), {(str(org.id), period, "stream", NO_TERMS): 1}))
    ).applied


async def test_deferred_stripe_events_are_kept(retention_db):
    _url, pool = retention_db
    async with pool.acquire() as conn:
        await conn.execute(
            """INSERT INTO driftlock.stripe_events (id, type, created, payload, outcome, received_at)
               VALUES ('evt_waiting', 'customer.subscription.updated', now() - interval '400 days', '{}'::jsonb,
                       'deferred', now() - interval '400 days')"""
        )
    await pruner(pool).run_once()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT outcome FROM driftlock.stripe_events WHERE id = 'evt_waiting'") == "deferred"


async def test_one_replica_runs_each_intervals_pruning(retention_db):
    _url, pool = retention_db
    results = await asyncio.gather(*(pruner(pool, f"replica-{i}").run_once() for i in range(4)))
    assert sum(result is not None for result in results) == 1
    assert await pruner(pool, "replica-late").run_once() is None  # claimed within the interval
    async with pool.acquire() as conn:
        await conn.execute("UPDATE driftlock.maintenance_runs SET started_at = now() - interval '2 hours'")
    assert await pruner(pool, "replica-late").run_once() is not None


async def test_a_retention_below_the_minimum_is_refused():
    with pytest.raises(retention.RetentionError, match="at least 3d"):
        retention.check_retention(retention.TABLES["stripe_events"], timedelta(days=2))


async def test_the_prune_command_prunes_each_table_or_all(retention_db):
    url, pool = retention_db
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "CLI")
        old = await plant(conn, org.id, OLD)
        recent = await plant(conn, org.id, timedelta(days=10))
    one = await asyncio.to_thread(run_cli, "prune", "meter-flushes", "--older-than", "5d", "--json", database_url=url)
    assert one.code == 0, one.stderr
    assert one.json()["deleted"] == {"meter_flushes": 2}  # the old row and the 10-day-old one
    everything = await asyncio.to_thread(
        run_cli, "prune", "all", "--json", database_url=url, env={"DRIFTLOCK_RETENTION_AUDIT_LOG": "off"}
    )
    assert everything.code == 0, everything.stderr
    deleted = {"meter_flushes": 0, "usage_reports": 1, "audit_denials": 0, "stripe_events": 1, "events": 0}
    deleted |= {"usage_hours": 0, "usage_key_hours": 0, "usage_days": 0, "usage_key_days": 0}
    assert everything.json() == {"deleted": deleted, "kept": ["audit_log"]}
    async with pool.acquire() as conn:
        assert await present(conn, old) == {"audit_log"}
        assert await present(conn, recent) == {"usage_reports", "audit_log", "stripe_events"}
    too_short = await asyncio.to_thread(run_cli, "prune", "stripe-events", "--older-than", "1d", database_url=url)
    assert too_short.code == 1 and "at least 3d" in too_short.stderr and "\n" not in too_short.stderr.strip()


async def test_each_service_prunes_the_tables_it_writes_and_prune_all_covers_them_all(retention_db):
    _url, pool = retention_db
    settings = Settings()
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "Owners")
        old = await plant(conn, org.id, OLD)
    authz_deleted = await authz_pruner(pool, settings, "authz-1").run_once()
    assert authz_deleted is not None and "stripe_events" not in authz_deleted
    async with pool.acquire() as conn:
        assert await present(conn, old) == {"stripe_events"}
    # The webhook service's run is its own: authz's claim of this interval does not stop it.
    assert await webhook_pruner(pool, settings, "webhooks-1").run_once() == {"stripe_events": 1}
    async with pool.acquire() as conn:
        assert await present(conn, old) == set()
        tasks = await conn.fetch("SELECT task, replica FROM driftlock.maintenance_runs ORDER BY task")
    assert [tuple(row) for row in tasks] == [("prune", "authz-1"), ("prune-webhooks", "webhooks-1")]
    assert set(retention.AUTHZ_TABLES) | set(retention.WEBHOOK_TABLES) == set(retention.TABLES)
    assert not set(retention.AUTHZ_TABLES) & set(retention.WEBHOOK_TABLES)


async def plant_buckets(conn, org_id, age: timedelta) -> None:
    """One bucket in each usage-history table, `age` old."""
    at = datetime.now(UTC) - age
    key_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO driftlock.usage_hours (org_id, period_start, hour, product, units) VALUES ($1, $2, $2, 's', 1)",
        org_id,
        at,
    )
    await conn.execute(
        """INSERT INTO driftlock.usage_key_hours (org_id, period_start, hour, key_id, product, units)
           VALUES ($1, $2, $2, $3, 's', 1)""",
        org_id,
        at,
        key_id,
    )
    await conn.execute(
        "INSERT INTO driftlock.usage_days (org_id, day, product, units) VALUES ($1, $2, 's', 1)", org_id, at
    )
    await conn.execute(
        "INSERT INTO driftlock.usage_key_days (org_id, day, key_id, product, units) VALUES ($1, $2, $3, 's', 1)",
        org_id,
        at,
        key_id,
    )


async def bucket_counts(conn, org_id) -> dict[str, int]:
    return {
        table: await conn.fetchval(f"SELECT count(*) FROM driftlock.{table} WHERE org_id = $1", org_id)
        for table in ("usage_hours", "usage_key_hours", "usage_days", "usage_key_days")
    }


async def test_usage_history_keeps_hours_90_days_and_days_2_years_by_default(retention_db):
    url, pool = retention_db
    defaults = Settings()
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "History retention")
        for age in (timedelta(days=10), timedelta(days=100), timedelta(days=800)):
            await plant_buckets(conn, org.id, age)
    keep = retention.usage_history_retentions(defaults.retention_usage_hours, defaults.retention_usage_days)
    deleted = await retention.Pruner(pool, keep, interval=3600, replica="r", batch=1).run_once()
    assert deleted == {"usage_hours": 2, "usage_key_hours": 2, "usage_days": 1, "usage_key_days": 1}
    async with pool.acquire() as conn:
        assert await bucket_counts(conn, org.id) == {
            "usage_hours": 1,
            "usage_key_hours": 1,
            "usage_days": 2,
            "usage_key_days": 2,
        }
    # `prune all` follows the settings too.
    shorter = {"DRIFTLOCK_RETENTION_USAGE_HOURS": "5d", "DRIFTLOCK_RETENTION_USAGE_DAYS": "90d"}
    pruned = await asyncio.to_thread(run_cli, "prune", "all", "--json", database_url=url, env=shorter)
    assert pruned.code == 0, pruned.stderr
    assert {k: v for k, v in pruned.json()["deleted"].items() if "usage_" in k and "reports" not in k} == {
        "usage_hours": 1,
        "usage_key_hours": 1,
        "usage_days": 1,
        "usage_key_days": 1,
    }

import asyncio
import re

import pytest

from driftlock_kernel import migrate
from driftlock_kernel.billing import BILLING_STATUSES, FREE_PLAN, Overage, SubscriptionStatus
from driftlock_kernel.keys import Environment, Scope
from tests.support import database
from tests.support.cli import run_cli


async def tables(url: str) -> set[str]:
    async with database.connection(url) as conn:
        rows = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'driftlock'")
    return {row["table_name"] for row in rows}


async def test_migrate_creates_the_schema_outside_public_and_seeds_free(fresh_database_url):
    async with database.connection(fresh_database_url) as conn:
        applied = await migrate.migrate(conn)
        assert applied == [m.version for m in migrate.load_migrations()]
        free = await conn.fetchrow("SELECT * FROM driftlock.plans WHERE name = 'free'")
        public = await conn.fetchval("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
    assert {"plans", "organizations", "api_keys", "schema_migrations"} <= await tables(fresh_database_url)
    assert free is not None and free["included_units"] == migrate.FREE_PLAN_DEFAULTS["included_units"]
    assert public == 0


async def test_migrate_twice_applies_nothing_the_second_time(fresh_database_url):
    async with database.connection(fresh_database_url) as conn:
        assert await migrate.migrate(conn)
        assert await migrate.migrate(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM driftlock.plans WHERE name = 'free'") == 1


async def test_migrate_keeps_an_existing_free_plan(fresh_database_url):
    async with database.connection(fresh_database_url) as conn:
        await migrate.migrate(conn)
        await conn.execute("UPDATE driftlock.plans SET included_units = 42 WHERE name = 'free'")
        await migrate.migrate(conn)
        assert await conn.fetchval("SELECT included_units FROM driftlock.plans WHERE name = 'free'") == 42


async def test_concurrent_migrations_apply_each_version_once(fresh_database_url):
    connections = [await database.connect(fresh_database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate.migrate(conn) for conn in connections))
        versions = await connections[0].fetch("SELECT version FROM driftlock.schema_migrations")
    finally:
        for conn in connections:
            await conn.close()
    every = [m.version for m in migrate.load_migrations()]
    assert sorted(results, key=len) == [[], [], [], every]
    assert sorted(row["version"] for row in versions) == every


def test_two_cli_processes_migrating_at_once_both_succeed(fresh_database_url):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_cli("migrate", "--json", database_url=fresh_database_url), range(2)))
    assert [r.code for r in runs] == [0, 0], [r.stderr for r in runs]
    applied = sorted((r.json()["applied"] for r in runs), key=len)
    assert applied[0] == []
    assert applied[1] == [m.version for m in migrate.load_migrations()]


async def test_an_edited_released_migration_is_refused(fresh_database_url):
    originals = migrate.load_migrations()
    edited = [migrate.Migration(originals[0].version, originals[0].sql + "\n-- edited\n"), *originals[1:]]
    async with database.connection(fresh_database_url) as conn:
        await migrate.migrate(conn, originals)
        with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
            await migrate.migrate(conn, edited)


async def test_a_failing_migration_leaves_nothing_behind(fresh_database_url):
    broken = [*migrate.load_migrations(), migrate.Migration("9999_broken", "CREATE TABLE driftlock.x (); SELECT 1/0;")]
    async with database.connection(fresh_database_url) as conn:
        with pytest.raises(Exception, match="division by zero"):
            await migrate.migrate(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('driftlock.plans')") is None


def _quoted_values(check: str) -> set[str]:
    return set(re.findall(r"'([^']*)'", check))


async def _check_of(conn, table: str, column: str) -> str:
    """The CHECK constraint of driftlock.<table> on <column> alone, as PostgreSQL prints it (a constraint over
    several columns, such as stripe_subscription_history's one_kind, is not it)."""
    checks = await conn.fetch(
        """SELECT pg_get_constraintdef(c.oid) AS definition
           FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
           JOIN pg_attribute a ON a.attrelid = t.oid AND a.attname = $2
           WHERE n.nspname = 'driftlock' AND t.relname = $1 AND c.contype = 'c' AND c.conkey = ARRAY[a.attnum]""",
        table,
        column,
    )
    (definition,) = [row["definition"] for row in checks]
    return definition


async def test_the_schema_accepts_exactly_the_billing_vocabulary_of_the_code(database_url):
    """The CHECK constraints of the migrations and the enums of driftlock_kernel say the same thing."""
    async with database.connection(database_url) as conn:
        assert _quoted_values(await _check_of(conn, "organizations", "billing_status")) == BILLING_STATUSES
        assert _quoted_values(await _check_of(conn, "stripe_subscriptions", "status")) == set(SubscriptionStatus)
        # Each event's word on a status (migration 0004) takes the same statuses as the subscription it folds into.
        history_status = await _check_of(conn, "stripe_subscription_history", "status")
        assert _quoted_values(history_status) == set(SubscriptionStatus)
        assert _quoted_values(await _check_of(conn, "plans", "overage")) == set(Overage)
        assert _quoted_values(await _check_of(conn, "api_keys", "environment")) == set(Environment)
        assert _quoted_values(await _check_of(conn, "api_keys", "scopes")) == set(Scope)
        default_plan = await conn.fetchval(
            """SELECT column_default FROM information_schema.columns
               WHERE table_schema = 'driftlock' AND table_name = 'organizations' AND column_name = 'plan_name'"""
        )
    assert _quoted_values(default_plan) == {FREE_PLAN}

"""The shared connection pool: what each pooled statement costs in round trips to the database."""

import re
from pathlib import Path

import asyncpg
import pytest

from authz_service.check.grants import _GRANTS_QUERY
from driftlock_kernel import db

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("authz_service", "billing_webhooks", "driftlock_kernel", "driftlock_cli")


@pytest.fixture
async def one_connection_pool(database_url, transaction_pooler):
    pool = await db.create_pool(
        database_url, application_name="tests-pool", max_size=1, transaction_pooler=transaction_pooler
    )
    yield pool
    await pool.close()


async def sent_by(pool, statements: int) -> list[str]:
    """What the pool's connection sent for `statements` pooled SELECTs, each on a connection of its own."""
    sent: list[str] = []
    async with pool.acquire() as conn:
        conn.add_query_logger(lambda record: sent.append(record.query))
    sent.clear()  # whatever the release of this first acquisition sent
    for n in range(statements):
        assert await pool.fetchval("SELECT $1::int", n) == n
    return sent


async def test_a_pooled_statement_is_one_round_trip_not_two(one_connection_pool):
    """asyncpg resets a connection on its way back to the pool with a query of its own (RESET ALL, UNLISTEN *,
    CLOSE ALL, pg_advisory_unlock_all()): a second round trip, and 4 more statements, for every key look-up."""
    assert await sent_by(one_connection_pool, 3) == ["SELECT $1::int"] * 3


async def test_a_transaction_left_open_is_still_rolled_back_on_release(one_connection_pool, expect_loop_exception):
    # asyncpg reports the open transaction to the loop's exception handler as it resets the connection.
    with expect_loop_exception("Resetting connection with an active transaction"):
        async with one_connection_pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMPORARY TABLE left_open (n int)")
    async with one_connection_pool.acquire() as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.left_open')") is None


async def test_a_new_connection_knows_every_array_type_before_its_first_statement(one_connection_pool):
    """asyncpg asks the server for an array type's codec the first time a connection meets it, and behind a
    transaction pooler that question ran with JIT on (1.7 s on PostgreSQL 15): the first key look-up on a new
    connection timed out. The pool's connections learn them as they connect, so a statement sends only itself."""
    sent: list[str] = []
    async with one_connection_pool.acquire() as conn:
        conn.add_query_logger(lambda record: sent.append(record.query))
        await conn.fetch(_GRANTS_QUERY, [b"\x00" * 32])  # bytea[] in, cidr[] out
        await conn.fetchval("SELECT $1::uuid[], $2::bigint[], $3::timestamptz[]", [], [], [])
    assert len(sent) == 2, sent


async def test_connecting_leaves_the_sessions_jit_setting_as_the_server_has_it(direct_database_url):
    raw = await asyncpg.connect(direct_database_url)
    try:
        server_default = await raw.fetchval("SHOW jit")
    finally:
        await raw.close()
    async with db.connection(direct_database_url) as conn:
        assert await conn.fetchval("SHOW jit") == server_default


# How the project's SQL spells an array type, and the type asyncpg learns for it.
_SPELLINGS = {"bigint": "int8", "int": "int4", "integer": "int4", "boolean": "bool", "double precision": "float8"}


def test_every_array_type_the_project_casts_to_is_learned_on_connect():
    sources = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    cast = re.compile(r"::\s*([a-z_ ]+?)\s*\[\]")
    used = {_SPELLINGS.get(name, name) for path in sources for name in cast.findall(path.read_text())}
    assert used, "no array casts found: the pattern no longer matches the project's SQL"
    assert used - {"text"} <= set(db._ARRAY_TYPES), used - {"text"} - set(db._ARRAY_TYPES)

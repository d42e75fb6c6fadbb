"""The shared connection pool: what each pooled statement costs in round trips to the database."""

import pytest

from driftlock_kernel import db


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

"""Key look-ups against real PostgreSQL: what a cold cache costs the database when many new keys arrive at once."""

import asyncio
from typing import cast

import asyncpg

from authz_service.check.grants import GrantStore, StoreUnavailable, database_fetch
from driftlock_kernel import db
from driftlock_kernel.keys import Environment, generate_key, hash_key


class CountingPool:
    """The pool, counting the statements sent through it (it stands in for an asyncpg.Pool: only fetch and
    fetchrow are called)."""

    def __init__(self, pool):
        self._pool = pool
        self.statements = 0

    async def fetch(self, query, *args):
        self.statements += 1
        return await self._pool.fetch(query, *args)

    async def fetchrow(self, query, *args):
        self.statements += 1
        return await self._pool.fetchrow(query, *args)


async def test_many_new_keys_at_once_cost_fewer_statements_than_keys(pool, make_org, make_key):
    """A cold replica under load (a restart, a flood of new customers): 64 keys never seen, asked for at once.
    One statement per key would be a round trip each, queued for 4 connections; keys that queue go together."""
    org = await make_org()
    keys = [await make_key(org.id) for _ in range(60)]
    made_up = [generate_key(Environment.LIVE).secret for _ in range(4)]
    counting = CountingPool(pool)
    store = GrantStore(
        database_fetch(cast(asyncpg.Pool, counting)),
        ttl=60,
        negative_ttl=5,
        stale_for=60,
        max_entries=1000,
        fetch_timeout=5,
    )
    secrets = [secret for _key, secret in keys] + made_up
    grants = await asyncio.gather(*(store.get(hash_key(secret)) for secret in secrets))
    assert [grant.key_id if grant else None for grant in grants] == [str(key.id) for key, _ in keys] + [None] * 4
    assert counting.statements <= 4, f"{counting.statements} statements for 64 keys"


async def test_a_look_up_that_times_out_is_unavailable_not_unknown(database_url, transaction_pooler, make_org):
    slow = await db.create_pool(
        database_url, application_name="tests-slow-lookups", max_size=1, transaction_pooler=transaction_pooler
    )
    try:
        store = GrantStore(
            database_fetch(slow, timeout=0.2), ttl=60, negative_ttl=5, stale_for=60, max_entries=10, fetch_timeout=5
        )
        async with slow.acquire() as conn:  # the only connection: the look-up waits for it past its timeout
            look_up = asyncio.ensure_future(store.get(hash_key(generate_key(Environment.LIVE).secret)))
            done, _ = await asyncio.wait({look_up}, timeout=2)
            assert done, "the look-up did not time out"
            await conn.fetchval("SELECT 1")
        assert isinstance(look_up.exception(), StoreUnavailable)
    finally:
        await slow.close()

"""Test databases: a fresh, migrated database per test session (or per test, where the test needs one)."""

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from driftlock_kernel import db


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


class DatabaseFactory:
    """Creates throw-away databases on one server; drops them at the end."""

    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.created: list[str] = []

    async def can_create(self) -> bool:
        try:
            async with db.connection(self.admin_url) as conn:
                return bool(
                    await conn.fetchval("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
                )
        except db.DatabaseUnavailable:
            return False

    async def create(self, prefix: str = "driftlock_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        async with db.connection(self.admin_url) as conn:
            await conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return with_database(self.admin_url, name)

    async def drop_all(self) -> None:
        async with db.connection(self.admin_url) as conn:
            for name in self.created:
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                except asyncpg.PostgresError:
                    pass
        self.created.clear()


def transaction_pooler() -> bool | None:
    """Whether the tests run behind PgBouncer (the `pooler` fixture sets DRIFTLOCK_DB_TRANSACTION_POOLER for every
    process): the tests' own connections then turn prepared statements off, as the services do."""
    return True if os.environ.get("DRIFTLOCK_DB_TRANSACTION_POOLER") == "true" else None


def connection(url: str):
    return db.connection(url, transaction_pooler=transaction_pooler())


async def connect(url: str):
    return await db.connect(url, transaction_pooler=transaction_pooler())

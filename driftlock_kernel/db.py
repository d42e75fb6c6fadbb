"""Connections to PostgreSQL: one way to open them, whatever sits in between (direct, or a Supabase pooler).

Every statement in the project names its tables schema-qualified (`driftlock.api_keys`), so nothing depends on
a session's search_path, which a transaction pooler does not keep between transactions.
"""

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import asyncpg

from driftlock_kernel.errors import OperatorError

SCHEMA = "driftlock"
CONNECT_TIMEOUT_SECONDS = 5.0
# Supabase's (and PgBouncer's usual) transaction-pooler port. Behind it a session may change with every
# transaction, so named prepared statements and LISTEN do not work.
TRANSACTION_POOLER_PORT = 6543


class DatabaseUnavailable(OperatorError):
    """The database could not be reached; the message names where (never the password) and why."""


def describe(url: str) -> str:
    """Where a DSN points, without its credentials: `host:port/dbname`."""
    try:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        host = parts.hostname or (query.get("host") or ["localhost"])[0]
        port = parts.port or int((query.get("port") or ["5432"])[0])
        dbname = parts.path.lstrip("/") or "postgres"
    except ValueError:
        return "(unparseable DATABASE_URL)"
    return f"{host}:{port}/{dbname}"


def uses_transaction_pooler(url: str) -> bool:
    forced = os.environ.get("DRIFTLOCK_DB_TRANSACTION_POOLER", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    try:
        return urlsplit(url).port == TRANSACTION_POOLER_PORT
    except ValueError:
        return False


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


def _connect_kwargs(url: str, application_name: str) -> dict:
    kwargs: dict = {
        "dsn": url,
        "timeout": CONNECT_TIMEOUT_SECONDS,
        "server_settings": {"application_name": application_name},
    }
    if uses_transaction_pooler(url):
        # Named prepared statements do not survive a change of server session between transactions.
        kwargs["statement_cache_size"] = 0
    return kwargs


def _unavailable(url: str, error: BaseException) -> DatabaseUnavailable:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DatabaseUnavailable(f"cannot connect to the database at {describe(url)}: {reason}")


CONNECTION_ERRORS = (
    OSError,
    socket.gaierror,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.CannotConnectNowError,
)


# A statement failed because the database could not be reached, timed out, or refused it: what a service
# survives by keeping its work and trying again (as opposed to a bug).
QUERY_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def connect(url: str, *, application_name: str = "driftlock-gateway") -> asyncpg.Connection:
    try:
        conn = await asyncpg.connect(**_connect_kwargs(url, application_name))
    except CONNECTION_ERRORS as error:
        raise _unavailable(url, error) from error
    await _init_connection(conn)
    return conn


@contextlib.asynccontextmanager
async def connection(url: str, *, application_name: str = "driftlock-gateway") -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(url, application_name=application_name)
    try:
        yield conn
    finally:
        await conn.close()


async def create_pool(
    url: str,
    *,
    application_name: str,
    min_size: int = 0,
    max_size: int = 4,
    command_timeout: float | None = 10.0,
) -> asyncpg.Pool:
    """A pool that connects lazily (min_size 0 by default), so a service can start while the database is down."""
    try:
        return await asyncpg.create_pool(
            **_connect_kwargs(url, application_name),
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            init=_init_connection,
        )
    except CONNECTION_ERRORS as error:
        raise _unavailable(url, error) from error

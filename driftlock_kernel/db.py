"""Connections to PostgreSQL: one way to open them, whatever sits in between (direct, or a Supabase pooler).

Every statement in the project names its tables schema-qualified (`driftlock.api_keys`), so nothing depends on
a session's search_path, which a transaction pooler does not keep between transactions.
"""

import contextlib
import dataclasses
import enum
import json
import types
import typing
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
import asyncpg.pool

from driftlock_kernel.errors import OperatorError, one_line

# A connection of its own or one lent by a pool: what every store function takes.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

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


def uses_transaction_pooler(url: str, configured: bool | None = None) -> bool:
    """Whether `url` goes through a transaction pooler: as configured (DRIFTLOCK_DB_TRANSACTION_POOLER), else
    guessed from Supabase's pooler port."""
    if configured is not None:
        return configured
    try:
        return urlsplit(url).port == TRANSACTION_POOLER_PORT
    except ValueError:
        return False


# The array types the project's statements send or read (text[] needs nothing: asyncpg knows it). asyncpg learns
# any other array type's codec by asking the server, once per connection, the first time a statement meets it.
# The planner costs that question at about 3.4 million, far past PostgreSQL's jit_above_cost (100,000), so asyncpg
# turns JIT off around it, in statements of their own: behind a transaction pooler each may reach a different
# server session, and the question ran with JIT on, 1.7 s on the PostgreSQL 15 here (10 ms without): longer than
# a key look-up may wait, so a replica's first look-ups on new connections answered 503. A new connection asks
# once, for all of them, in one transaction: the pooler keeps one server session for a transaction.
_ARRAY_TYPES = ("bytea", "cidr", "inet", "uuid", "int8", "int4", "float8", "bool", "timestamptz", "date", "numeric")
_LEARN_ARRAY_TYPES = "SELECT " + ", ".join(f"NULL::{name}[] AS {name}" for name in _ARRAY_TYPES)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    async with conn.transaction():
        await conn.fetchrow(_LEARN_ARRAY_TYPES)


def _connect_kwargs(url: str, application_name: str, transaction_pooler: bool | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dsn": url,
        "timeout": CONNECT_TIMEOUT_SECONDS,
        "server_settings": {"application_name": application_name},
    }
    if uses_transaction_pooler(url, transaction_pooler):
        # Named prepared statements do not survive a change of server session between transactions.
        kwargs["statement_cache_size"] = 0
    return kwargs


def _unavailable(url: str, error: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"cannot connect to the database at {describe(url)}: {one_line(error)}")


# The database could not be reached, was shut down, ran out of resources, gave up on a transaction (deadlock,
# serialisation) or refused the connection itself: the same work may succeed later, so a service keeps it and
# tries again, and a webhook answers 5xx.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS
    TimeoutError,
    DatabaseUnavailable,
    asyncpg.InterfaceError,  # the connection was closed under the statement
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.InsufficientResourcesError,
    asyncpg.TransactionRollbackError,  # deadlock or serialisation failure
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)
# Any failure of the database to do a statement: unavailable, or refusing it (a constraint, a missing table).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, asyncpg.PostgresError)


async def connect(
    url: str, *, application_name: str = "driftlock-gateway", transaction_pooler: bool | None = None
) -> asyncpg.Connection:
    try:
        conn = await asyncpg.connect(**_connect_kwargs(url, application_name, transaction_pooler))
    except UNAVAILABLE_ERRORS as error:
        raise _unavailable(url, error) from error
    await _init_connection(conn)
    return conn


@contextlib.asynccontextmanager
async def connection(
    url: str, *, application_name: str = "driftlock-gateway", transaction_pooler: bool | None = None
) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(url, application_name=application_name, transaction_pooler=transaction_pooler)
    try:
        yield conn
    finally:
        await conn.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection needs on its way back to the pool beyond what asyncpg always does (roll back a
    transaction left open, drop listener callbacks): nothing. asyncpg's default reset is a query of its own
    (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN, RESET ALL), a second round trip after every pooled statement,
    for state nothing here leaves on a pooled session: advisory locks are transaction-scoped
    (pg_advisory_xact_lock), no statement SETs a session variable, cursors live in transactions, and LISTEN has
    connections of its own (driftlock_kernel.listener). Keep it that way: session state set on a pooled connection
    would reach the next borrower. Behind a transaction pooler the reset meant nothing anyway."""


async def create_pool(
    url: str,
    *,
    application_name: str,
    min_size: int = 0,
    max_size: int = 4,
    command_timeout: float | None = 10.0,
    transaction_pooler: bool | None = None,
) -> asyncpg.Pool:
    """A pool that connects lazily (min_size 0 by default), so a service can start while the database is down."""
    try:
        return await asyncpg.create_pool(
            **_connect_kwargs(url, application_name, transaction_pooler),
            min_size=min_size,
            max_size=max_size,
            command_timeout=command_timeout,
            init=_init_connection,
            reset=_keep_session,
        )
    except UNAVAILABLE_ERRORS as error:
        raise _unavailable(url, error) from error


# --- rows to dataclasses ------------------------------------------------------------------------------------

T = TypeVar("T")


class Row(Protocol):
    """What a row gives: asyncpg's Record, or any mapping of column names."""

    def keys(self) -> Iterable[str]: ...
    def __getitem__(self, key: str, /) -> Any: ...


def _converter(annotation: Any) -> Callable[[Any], Any] | None:
    """How a column's value becomes a field's: enums by value, arrays as tuples or frozensets (of enums)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        convert = _converter(inner[0]) if len(inner) == 1 else None
        return None if convert is None else lambda value: None if value is None else convert(value)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation
    if origin in (tuple, frozenset):
        item = _converter(typing.get_args(annotation)[0]) or (lambda value: value)
        return lambda values: origin(item(value) for value in values or ())
    return None


_COLUMNS: dict[type, tuple[tuple[str, Callable[[Any], Any] | None], ...]] = {}


def _columns_of(cls: type) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """Each field of the dataclass with its converter, worked out once per class."""
    columns = _COLUMNS.get(cls)
    if columns is None:
        hints = typing.get_type_hints(cls)
        columns = _COLUMNS[cls] = tuple((f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls))
    return columns


def from_row(cls: type[T], row: Row) -> T:
    """A dataclass from a row, field by field by column name (alias columns in SQL where names differ).
    Columns the dataclass lacks are ignored; a field the row lacks keeps its default."""
    present = set(row.keys())
    values = {}
    for name, convert in _columns_of(cls):
        if name in present:
            value = row[name]
            values[name] = convert(value) if convert is not None else value
    return cls(**values)


def returned(row: T | None) -> T:
    """The row an INSERT or UPDATE ... RETURNING always gives."""
    if row is None:
        raise RuntimeError("a RETURNING statement returned no row")
    return row

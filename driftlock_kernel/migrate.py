"""Schema migrations: numbered plain SQL files, applied in order, once each, under an advisory lock.

The whole run is one transaction holding a transaction-scoped advisory lock, so two replicas starting at once
serialise (the second finds nothing left to do), a failed migration leaves nothing half-applied, and it works
through a transaction pooler, where a session-scoped lock could be taken and released on different sessions.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from driftlock_kernel import db
from driftlock_kernel.billing import FREE_PLAN, Overage
from driftlock_kernel.errors import OperatorError

# Any fixed 64-bit number; it names "the driftlock migration lock" among this database's advisory locks.
MIGRATION_LOCK_ID = 0x0D21F7_10C6

# What the free plan is when `migrate` has to create it (an operator's own changes to it are kept).
FREE_PLAN_DEFAULTS = {"included_units": 1_000, "overage": Overage.BLOCK, "rate_limit_rps": 10.0}


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(OperatorError):
    pass


def load_migrations() -> list[Migration]:
    files = sorted((Path(__file__).parent / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    return [Migration(version=f.name.removesuffix(".sql"), sql=f.read_text()) for f in files]


async def migrate(conn: db.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply what is missing; return the versions applied by this call (empty when up to date)."""
    migrations = load_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute("CREATE SCHEMA IF NOT EXISTS driftlock")
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS driftlock.schema_migrations (
                   version     text PRIMARY KEY,
                   checksum    text NOT NULL,
                   applied_at  timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, checksum FROM driftlock.schema_migrations")
        done = {row["version"]: row["checksum"] for row in rows}
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version} was changed after it was applied; "
                        "add a new migration instead of editing a released one"
                    )
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO driftlock.schema_migrations (version, checksum) VALUES ($1, $2)",
                migration.version,
                migration.checksum,
            )
            applied_now.append(migration.version)
        await conn.execute(
            """INSERT INTO driftlock.plans (name, included_units, overage, rate_limit_rps)
               VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING""",
            FREE_PLAN,
            FREE_PLAN_DEFAULTS["included_units"],
            str(FREE_PLAN_DEFAULTS["overage"]),
            FREE_PLAN_DEFAULTS["rate_limit_rps"],
        )
    return applied_now

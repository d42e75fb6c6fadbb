"""API keys: the store behind `keys create|list|revoke`. Only a key's hash is ever written."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import asyncpg

from driftlock_kernel.keys import Environment, generate_key
from driftlock_kernel.orgs import NotFound, get_org


class Scope(StrEnum):
    DETECT = "detect"
    INGEST = "ingest"
    READ = "read"


ALL_SCOPES = tuple(Scope)


def parse_scopes(text: str) -> tuple[Scope, ...]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("at least one scope is needed: detect, ingest or read")
    unknown = [name for name in names if name not in Scope.__members__.values()]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}: choose from detect, ingest, read")
    return tuple(dict.fromkeys(Scope(name) for name in names))


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: uuid.UUID
    org_id: uuid.UUID
    name: str | None
    prefix: str
    environment: Environment
    scopes: tuple[str, ...]
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> "ApiKey":
        return cls(
            id=row["id"],
            org_id=row["org_id"],
            name=row["name"],
            prefix=row["display_prefix"],
            environment=Environment(row["environment"]),
            scopes=tuple(row["scopes"]),
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            created_at=row["created_at"],
        )

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "org_id": self.org_id,
            "name": self.name,
            "prefix": self.prefix,
            "environment": self.environment.value,
            "scopes": list(self.scopes),
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "created_at": self.created_at,
        }


async def create_key(
    conn: asyncpg.Connection,
    org_id: uuid.UUID,
    *,
    name: str | None = None,
    scopes: tuple[Scope, ...] = ALL_SCOPES,
    expires_in: timedelta | None = None,
    environment: Environment = Environment.LIVE,
) -> tuple[ApiKey, str]:
    """Store a new key; return it with its secret, which exists nowhere else from now on."""
    await get_org(conn, org_id)
    new = generate_key(environment)
    row = await conn.fetchrow(
        """INSERT INTO driftlock.api_keys (org_id, name, key_hash, display_prefix, environment, scopes, expires_at)
           VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval)
           RETURNING *""",
        org_id,
        name,
        new.hash,
        new.display_prefix,
        environment.value,
        [str(scope) for scope in scopes],
        expires_in,
    )
    return ApiKey.from_row(row), new.secret


async def list_keys(conn: asyncpg.Connection, org_id: uuid.UUID) -> list[ApiKey]:
    await get_org(conn, org_id)
    rows = await conn.fetch("SELECT * FROM driftlock.api_keys WHERE org_id = $1 ORDER BY created_at, id", org_id)
    return [ApiKey.from_row(row) for row in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: uuid.UUID) -> ApiKey:
    """Revoke the key; revoking it again keeps the first revocation time."""
    row = await conn.fetchrow(
        """UPDATE driftlock.api_keys SET revoked_at = now()
           WHERE id = $1 AND revoked_at IS NULL RETURNING *""",
        key_id,
    )
    if row is None:
        row = await conn.fetchrow("SELECT * FROM driftlock.api_keys WHERE id = $1", key_id)
        if row is None:
            raise NotFound(f"no API key with id {key_id}")
    return ApiKey.from_row(row)

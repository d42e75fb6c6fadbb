"""API keys: the store behind `keys create|list|revoke`. Only a key's hash is ever written."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from driftlock_kernel import db
from driftlock_kernel.keys import ALL_SCOPES, Environment, Scope, generate_key
from driftlock_kernel.orgs import NotFound, get_org


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: uuid.UUID
    org_id: uuid.UUID
    name: str | None
    display_prefix: str  # the first characters of the key, to tell keys apart
    environment: Environment
    scopes: tuple[Scope, ...]
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "org_id": self.org_id,
            "name": self.name,
            "prefix": self.display_prefix,
            "environment": self.environment.value,
            "scopes": list(self.scopes),
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "created_at": self.created_at,
        }


async def create_key(
    conn: db.Connection,
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
    return db.from_row(ApiKey, db.returned(row)), new.secret


async def list_keys(conn: db.Connection, org_id: uuid.UUID) -> list[ApiKey]:
    await get_org(conn, org_id)
    rows = await conn.fetch("SELECT * FROM driftlock.api_keys WHERE org_id = $1 ORDER BY created_at, id", org_id)
    return [db.from_row(ApiKey, row) for row in rows]


async def revoke_key(conn: db.Connection, key_id: uuid.UUID) -> ApiKey:
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
    return db.from_row(ApiKey, row)

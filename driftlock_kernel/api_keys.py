"""API keys: the store behind `keys create|list|update|roll|revoke` and the management API. Only a key's hash is
ever written; its secret exists in the answer to create and roll, and nowhere else."""

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from driftlock_kernel import db
from driftlock_kernel.keys import ALL_SCOPES, Environment, Scope, generate_key
from driftlock_kernel.orgs import NotFound, check_name, get_org, has_control_characters
from driftlock_kernel.paging import Cursor
from driftlock_kernel.plans import UNCHANGED, Unchanged

# What the caller may keep on a key, as compact JSON.
MAX_METADATA_BYTES = 4096
# How long a rolled key may keep working beside its successor.
MAX_ROLL_OVERLAP = timedelta(days=30)


class KeyStateError(Exception):
    """The key cannot do what was asked in its present state (revoked, expired, already rolled)."""


class InvalidMetadata(ValueError):
    pass


def _check_metadata_text(value: Any, path: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or has_control_characters(key):
                raise InvalidMetadata(f"metadata keys must not contain control characters (at {path or 'the top'})")
            _check_metadata_text(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_metadata_text(item, f"{path}[{index}]")
    elif isinstance(value, str) and "\x00" in value:
        raise InvalidMetadata(f"metadata values must not contain NUL characters (at {path})")


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
    metadata: dict[str, Any] | None = None
    rolled_to: uuid.UUID | None = None
    updated_at: datetime | None = None
    last_used_at: datetime | None = None  # written in batches by authz: a few seconds behind at most

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
            "updated_at": self.updated_at,
            "last_used_at": self.last_used_at,
            "metadata": self.metadata or {},
            "rolled_to": self.rolled_to,
        }


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata as stored: a JSON object of at most MAX_METADATA_BYTES; InvalidMetadata otherwise."""
    if not isinstance(metadata, Mapping):
        raise InvalidMetadata("metadata must be a JSON object")
    try:
        size = len(json.dumps(metadata, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        raise InvalidMetadata("metadata must be plain JSON") from None
    if size > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")
    _check_metadata_text(metadata, "")
    return dict(metadata)


_SELECT = """
    SELECT k.*, u.last_used_at
    FROM driftlock.api_keys k LEFT JOIN driftlock.api_key_last_used u ON u.key_id = k.id
"""


async def create_key(
    conn: db.Connection,
    org_id: uuid.UUID,
    *,
    name: str | None = None,
    scopes: tuple[Scope, ...] = ALL_SCOPES,
    expires_in: timedelta | None = None,
    environment: Environment = Environment.LIVE,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; return it with its secret, which exists nowhere else from now on."""
    if name is not None:
        check_name(name)
    await get_org(conn, org_id)
    new = generate_key(environment)
    row = await conn.fetchrow(
        """INSERT INTO driftlock.api_keys
               (org_id, name, key_hash, display_prefix, environment, scopes, expires_at, metadata)
           VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval, $8)
           RETURNING *""",
        org_id,
        name,
        new.hash,
        new.display_prefix,
        environment.value,
        [str(scope) for scope in scopes],
        expires_in,
        check_metadata(metadata or {}),
    )
    return db.from_row(ApiKey, db.returned(row)), new.secret


async def get_key(conn: db.Connection, key_id: uuid.UUID) -> ApiKey:
    row = await conn.fetchrow(_SELECT + " WHERE k.id = $1", key_id)
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return db.from_row(ApiKey, row)


async def list_keys(conn: db.Connection, org_id: uuid.UUID) -> list[ApiKey]:
    await get_org(conn, org_id)
    rows = await conn.fetch(_SELECT + " WHERE k.org_id = $1 ORDER BY k.created_at, k.id", org_id)
    return [db.from_row(ApiKey, row) for row in rows]


async def list_keys_page(
    conn: db.Connection, org_id: uuid.UUID, *, limit: int, after: Cursor | None = None
) -> tuple[list[ApiKey], Cursor | None]:
    """Up to `limit` keys in creation order after `after`; with the cursor of the next page, None on the last."""
    await get_org(conn, org_id)
    rows = await conn.fetch(
        _SELECT
        + """ WHERE k.org_id = $1 AND ($2::timestamptz IS NULL OR (k.created_at, k.id) > ($2, $3))
                      ORDER BY k.created_at, k.id LIMIT $4""",
        org_id,
        after.created_at if after else None,
        after.id if after else None,
        limit + 1,
    )
    found = [db.from_row(ApiKey, row) for row in rows[:limit]]
    more = len(rows) > limit
    return found, Cursor(found[-1].created_at, found[-1].id) if more and found else None


async def update_key(
    conn: db.Connection,
    key_id: uuid.UUID,
    *,
    name: str | Unchanged | None = UNCHANGED,
    scopes: Sequence[Scope] | Unchanged = UNCHANGED,
    expires_in: timedelta | Unchanged | None = UNCHANGED,
    metadata: Mapping[str, Any] | Unchanged = UNCHANGED,
) -> ApiKey:
    """Change what is given, keep the rest (expires_in None: never expires). Every replica drops its cached
    grant for the key within a second (the table's trigger), so a narrower scope applies at once."""
    checked = UNCHANGED if metadata is UNCHANGED else check_metadata(metadata)
    if name is not UNCHANGED and name is not None:
        check_name(name)
    if expires_in is not UNCHANGED:
        # A revoked key, or one whose secret was rolled away, must never serve again: giving it a later expiry
        # (or none) would bring its old secret back beside its successor. Locked, so a roll or revocation
        # cannot slip in between this look and the update.
        state = await conn.fetchrow(
            "SELECT revoked_at, rolled_to FROM driftlock.api_keys WHERE id = $1 FOR UPDATE", key_id
        )
        if state is None:
            raise NotFound(f"no API key with id {key_id}")
        if state["revoked_at"] is not None:
            raise KeyStateError(f"key {key_id} is revoked; its expiry cannot change (create a new key instead)")
        if state["rolled_to"] is not None:
            raise KeyStateError(
                f"key {key_id} was rolled to {state['rolled_to']}; its expiry cannot change (update that key instead)"
            )
    row = await conn.fetchrow(
        """UPDATE driftlock.api_keys SET
               name = CASE WHEN $2 THEN $3 ELSE name END,
               scopes = coalesce($4::text[], scopes),
               expires_at = CASE WHEN $5 THEN now() + $6::interval ELSE expires_at END,
               metadata = coalesce($7::jsonb, metadata),
               updated_at = now()
           WHERE id = $1 RETURNING id""",
        key_id,
        name is not UNCHANGED,
        None if name is UNCHANGED else name,
        None if scopes is UNCHANGED else [str(scope) for scope in scopes],
        expires_in is not UNCHANGED,
        None if expires_in is UNCHANGED else expires_in,
        None if checked is UNCHANGED else checked,
    )
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return await get_key(conn, key_id)


async def revoke_key(conn: db.Connection, key_id: uuid.UUID) -> ApiKey:
    """Revoke the key; revoking it again keeps the first revocation time."""
    row = await conn.fetchrow(
        """UPDATE driftlock.api_keys SET revoked_at = now(), updated_at = now()
           WHERE id = $1 AND revoked_at IS NULL RETURNING id""",
        key_id,
    )
    if row is None:
        await get_key(conn, key_id)  # NotFound, or revoked already
    return await get_key(conn, key_id)


async def roll_key(conn: db.Connection, key_id: uuid.UUID, *, overlap: timedelta) -> tuple[ApiKey, str, ApiKey]:
    """Replace the key by a new one (new id and secret; same organisation, name, scopes, environment, expiry
    and metadata). The old key keeps working until `overlap` from now (or its own expiry, if sooner), then
    answers expired_api_key. Returns (new key, its secret, old key)."""
    if not timedelta(0) <= overlap <= MAX_ROLL_OVERLAP:
        raise ValueError(f"the overlap must be from 0 to {MAX_ROLL_OVERLAP.days} days")
    async with conn.transaction():
        old = await conn.fetchrow(
            """SELECT *, expires_at IS NOT NULL AND expires_at <= now() AS expired
               FROM driftlock.api_keys WHERE id = $1 FOR UPDATE""",
            key_id,
        )
        if old is None:
            raise NotFound(f"no API key with id {key_id}")
        if old["revoked_at"] is not None:
            raise KeyStateError(f"key {key_id} is revoked; create a new key instead")
        if old["expired"]:
            raise KeyStateError(f"key {key_id} has expired; create a new key instead")
        if old["rolled_to"] is not None:
            raise KeyStateError(f"key {key_id} was rolled already, to {old['rolled_to']}; roll that key instead")
        environment = Environment(old["environment"])
        new = generate_key(environment)
        new_id = await conn.fetchval(
            """INSERT INTO driftlock.api_keys
                   (org_id, name, key_hash, display_prefix, environment, scopes, expires_at, metadata)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               RETURNING id""",
            old["org_id"],
            old["name"],
            new.hash,
            new.display_prefix,
            environment.value,
            old["scopes"],
            old["expires_at"],
            old["metadata"],
        )
        await conn.execute(
            """UPDATE driftlock.api_keys
               SET rolled_to = $2, expires_at = least(expires_at, now() + $3::interval), updated_at = now()
               WHERE id = $1""",
            key_id,
            new_id,
            overlap,
        )
        return await get_key(conn, new_id), new.secret, await get_key(conn, key_id)


async def record_last_used(conn: db.Connection, used: Mapping[str, datetime]) -> None:
    """Store when each key (by id) was last used, never moving a time backwards. Keys in id order, so that two
    replicas writing overlapping batches lock rows in the same order (no deadlock)."""
    ids = sorted(used)
    await conn.execute(
        """INSERT INTO driftlock.api_key_last_used (key_id, last_used_at)
           SELECT u.key_id, u.at FROM unnest($1::uuid[], $2::timestamptz[]) AS u (key_id, at)
           JOIN driftlock.api_keys k ON k.id = u.key_id
           ORDER BY u.key_id
           ON CONFLICT (key_id) DO UPDATE
           SET last_used_at = greatest(driftlock.api_key_last_used.last_used_at, EXCLUDED.last_used_at)""",
        ids,
        [used[key_id] for key_id in ids],
    )

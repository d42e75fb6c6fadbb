"""API keys: the store behind `keys create|list|update|roll|revoke` and the management API. Only a key's hash is
ever written; its secret exists in the answer to create and roll, and nowhere else."""

import ipaddress
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from driftlock_kernel import db
from driftlock_kernel.keys import ALL_SCOPES, Environment, Scope, generate_key
from driftlock_kernel.orgs import NotFound, check_name, get_org, has_control_characters
from driftlock_kernel.paging import Cursor
from driftlock_kernel.plans import UNCHANGED, Unchanged, check_products

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


class InvalidLimit(ValueError):
    """A per-key limit that cannot be stored; the message says why, for the caller."""


# How many networks one key's allow-list may name.
MAX_ALLOWED_CIDRS = 100
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_cidrs(texts: Sequence[str]) -> tuple[Network, ...]:
    """An allow-list as stored: IPv4 or IPv6 networks ("203.0.113.0/24", "2001:db8::/32"; a bare address is
    one host). Host bits set below the prefix are cleared; InvalidLimit for anything else."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise InvalidLimit(
                f"allowed_cidrs: {text!r} is not an IPv4 or IPv6 network (e.g. 203.0.113.0/24)"
            ) from None
    if not 1 <= len(networks) <= MAX_ALLOWED_CIDRS:
        raise InvalidLimit(f"allowed_cidrs must name 1 to {MAX_ALLOWED_CIDRS} networks")
    return tuple(dict.fromkeys(networks))


def check_key_products(names: Sequence[str]) -> tuple[str, ...]:
    try:
        return check_products(names)
    except ValueError as error:
        raise InvalidLimit(str(error)) from None


def check_max_units(units: int) -> int:
    if not 0 <= units <= 2**62:
        raise InvalidLimit("max_units_per_period must be a whole number from 0")
    return units


def check_rate_limit(rps: float) -> float:
    if not 0 < rps <= 1_000_000:
        raise InvalidLimit("rate_limit_rps must be more than 0 (requests per second) and at most 1000000")
    return float(rps)


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
    # Per-key limits (None: not set); see migration 0013.
    max_units_per_period: int | None = None
    rate_limit_rps: float | None = None
    rate_limit_above_plan: bool = False  # the rate was set by an operator, above the plan's
    allowed_cidrs: tuple[Any, ...] | None = None  # ipaddress networks
    products: tuple[str, ...] | None = None

    @property
    def limits(self) -> dict[str, Any]:
        return {
            "max_units_per_period": self.max_units_per_period,
            "rate_limit_rps": self.rate_limit_rps,
            "allowed_cidrs": [str(n) for n in self.allowed_cidrs] if self.allowed_cidrs is not None else None,
            "products": list(self.products) if self.products is not None else None,
        }

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
            **self.limits,
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
    max_units_per_period: int | None = None,
    rate_limit_rps: float | None = None,
    rate_limit_above_plan: bool = False,
    allowed_cidrs: Sequence[str] | None = None,
    products: Sequence[str] | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; return it with its secret, which exists nowhere else from now on. The limits are
    checked here (InvalidLimit); whether the caller may set a rate above the plan's is the caller's to decide."""
    if name is not None:
        check_name(name)
    await get_org(conn, org_id)
    limits = _checked_limits(max_units_per_period, rate_limit_rps, allowed_cidrs, products)
    lists = _checked_lists(allowed_cidrs, products)
    new = generate_key(environment)
    row = await conn.fetchrow(
        """INSERT INTO driftlock.api_keys
               (org_id, name, key_hash, display_prefix, environment, scopes, expires_at, metadata,
                max_units_per_period, rate_limit_rps, rate_limit_above_plan, allowed_cidrs, products)
           VALUES ($1, $2, $3, $4, $5, $6, now() + $7::interval, $8, $9, $10, $11, $12, $13)
           RETURNING *""",
        org_id,
        name,
        new.hash,
        new.display_prefix,
        environment.value,
        [str(scope) for scope in scopes],
        expires_in,
        check_metadata(metadata or {}),
        *limits,
        rate_limit_above_plan and rate_limit_rps is not None,
        *lists,
    )
    return db.from_row(ApiKey, db.returned(row)), new.secret


def _checked_limits(
    max_units: int | None, rps: float | None, cidrs: Sequence[str] | None, products: Sequence[str] | None
) -> tuple[int | None, float | None]:
    return (
        None if max_units is None else check_max_units(max_units),
        None if rps is None else check_rate_limit(rps),
    )


def _checked_lists(
    cidrs: Sequence[str] | None, products: Sequence[str] | None
) -> tuple[list[Network] | None, list[str] | None]:
    return (
        None if cidrs is None else list(check_cidrs(cidrs)),
        None if products is None else list(check_key_products(products)),
    )


async def get_key(conn: db.Connection, key_id: uuid.UUID) -> ApiKey:
    # A key of an erased organisation is gone with it (orgs.delete_org).
    row = await conn.fetchrow(
        _SELECT
        + """ WHERE k.id = $1
              AND NOT EXISTS (SELECT 1 FROM driftlock.organizations o
                              WHERE o.id = k.org_id AND o.deleted_at IS NOT NULL)""",
        key_id,
    )
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
    max_units_per_period: int | Unchanged | None = UNCHANGED,
    rate_limit_rps: float | Unchanged | None = UNCHANGED,
    rate_limit_above_plan: bool = False,
    allowed_cidrs: Sequence[str] | Unchanged | None = UNCHANGED,
    products: Sequence[str] | Unchanged | None = UNCHANGED,
) -> ApiKey:
    """Change what is given, keep the rest (expires_in None: never expires; a limit None: removed). Every
    replica drops its cached grant for the key within a second (the table's trigger), so a narrower scope or a
    new limit applies at once."""
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
    limits: dict[str, tuple[bool, Any]] = {
        "max_units_per_period": _change(max_units_per_period, check_max_units),
        "rate_limit_rps": _change(rate_limit_rps, check_rate_limit),
        "allowed_cidrs": _change(allowed_cidrs, lambda v: list(check_cidrs(v))),
        "products": _change(products, lambda v: list(check_key_products(v))),
    }
    row = await conn.fetchrow(
        """UPDATE driftlock.api_keys SET
               name = CASE WHEN $2 THEN $3 ELSE name END,
               scopes = coalesce($4::text[], scopes),
               expires_at = CASE WHEN $5 THEN now() + $6::interval ELSE expires_at END,
               metadata = coalesce($7::jsonb, metadata),
               max_units_per_period = CASE WHEN $8 THEN $9::bigint ELSE max_units_per_period END,
               rate_limit_rps = CASE WHEN $10 THEN $11::float8 ELSE rate_limit_rps END,
               rate_limit_above_plan = CASE WHEN $10 THEN $12 AND $11::float8 IS NOT NULL
                                            ELSE rate_limit_above_plan END,
               allowed_cidrs = CASE WHEN $13 THEN $14::cidr[] ELSE allowed_cidrs END,
               products = CASE WHEN $15 THEN $16::text[] ELSE products END,
               updated_at = now()
           WHERE id = $1 RETURNING id""",
        key_id,
        name is not UNCHANGED,
        None if name is UNCHANGED else name,
        None if scopes is UNCHANGED else [str(scope) for scope in scopes],
        expires_in is not UNCHANGED,
        None if expires_in is UNCHANGED else expires_in,
        None if checked is UNCHANGED else checked,
        *limits["max_units_per_period"],
        *limits["rate_limit_rps"],
        rate_limit_above_plan,
        *limits["allowed_cidrs"],
        *limits["products"],
    )
    if row is None:
        raise NotFound(f"no API key with id {key_id}")
    return await get_key(conn, key_id)


async def plan_rate_limit(conn: db.Connection, org_id: uuid.UUID) -> float | None:
    """The rate limit of the organisation's plan (None: none), against which a key's own is above or below."""
    return await conn.fetchval(
        """SELECT p.rate_limit_rps FROM driftlock.organizations o JOIN driftlock.plans p ON p.name = o.plan_name
           WHERE o.id = $1""",
        org_id,
    )


def _change(value: Any, check: Callable[[Any], Any]) -> tuple[bool, Any]:
    """(whether the column changes, its new value): UNCHANGED keeps it, None clears it."""
    if value is UNCHANGED:
        return False, None
    return True, None if value is None else check(value)


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
                   (org_id, name, key_hash, display_prefix, environment, scopes, expires_at, metadata,
                    max_units_per_period, rate_limit_rps, rate_limit_above_plan, allowed_cidrs, products)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
               RETURNING id""",
            old["org_id"],
            old["name"],
            new.hash,
            new.display_prefix,
            environment.value,
            old["scopes"],
            old["expires_at"],
            old["metadata"],
            old["max_units_per_period"],
            old["rate_limit_rps"],
            old["rate_limit_above_plan"],
            old["allowed_cidrs"],
            old["products"],
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

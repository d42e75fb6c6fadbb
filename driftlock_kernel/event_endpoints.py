"""Organisations' event endpoints and what was delivered to them: the store behind `events endpoints …`,
`events deliveries list` and the management API's EventEndpointService."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from driftlock_kernel import db, events
from driftlock_kernel.events import EventType
from driftlock_kernel.orgs import NotFound, get_org

DELIVERY_STATES = ("pending", "delivered", "failed")
MAX_ENDPOINTS_PER_ORG = 20


class TooManyEndpoints(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class EventEndpoint:
    """A row of driftlock.event_endpoints without its secret (shown once, when created)."""

    id: uuid.UUID
    org_id: uuid.UUID
    url: str
    event_types: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    failing_since: datetime | None = None
    disabled_at: datetime | None = None
    disabled_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "org_id": self.org_id,
            "url": self.url,
            "event_types": list(self.event_types),
            "enabled": self.disabled_at is None,
            "disabled_at": self.disabled_at,
            "disabled_reason": self.disabled_reason,
            "failing_since": self.failing_since,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    event_id: str
    event_type: str
    org_id: uuid.UUID | None
    endpoint_id: uuid.UUID | None  # None: the operator's endpoint
    state: str
    attempts: int
    next_attempt_at: datetime
    created_at: datetime
    last_attempt_at: datetime | None = None
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None
    url: str | None = field(default=None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "org_id": self.org_id,
            "endpoint_id": self.endpoint_id,
            "url": self.url,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at if self.state == "pending" else None,
            "last_attempt_at": self.last_attempt_at,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "delivered_at": self.delivered_at,
            "created_at": self.created_at,
        }


COLUMNS = "id, org_id, url, event_types, created_at, updated_at, failing_since, disabled_at, disabled_reason"


async def create_endpoint(
    conn: db.Connection, org_id: uuid.UUID, url: str, event_types: Sequence[str], *, allow_private: bool
) -> tuple[EventEndpoint, str]:
    """A new endpoint and its secret. UrlRefused for a URL events may not go to; ValueError for an unknown type."""
    types = events.parse_event_types(event_types)
    await events.check_url(url, allow_private=allow_private)
    await get_org(conn, org_id)
    count = await conn.fetchval("SELECT count(*) FROM driftlock.event_endpoints WHERE org_id = $1", org_id)
    if count >= MAX_ENDPOINTS_PER_ORG:
        raise TooManyEndpoints(f"an organisation has at most {MAX_ENDPOINTS_PER_ORG} event endpoints")
    secret = events.new_secret()
    row = await conn.fetchrow(
        f"""INSERT INTO driftlock.event_endpoints (org_id, url, secret, event_types) VALUES ($1, $2, $3, $4)
            RETURNING {COLUMNS}""",
        org_id,
        url,
        secret,
        list(types),
    )
    return _endpoint(row), secret


def _endpoint(row: Any) -> EventEndpoint:
    return EventEndpoint(**{**dict(row), "event_types": tuple(row["event_types"])})


async def get_endpoint(conn: db.Connection, endpoint_id: uuid.UUID) -> EventEndpoint:
    row = await conn.fetchrow(f"SELECT {COLUMNS} FROM driftlock.event_endpoints WHERE id = $1", endpoint_id)
    if row is None:
        raise NotFound(f"no event endpoint with id {endpoint_id}")
    return _endpoint(row)


async def list_endpoints(conn: db.Connection, org_id: uuid.UUID) -> list[EventEndpoint]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM driftlock.event_endpoints WHERE org_id = $1 ORDER BY created_at, id", org_id
    )
    return [_endpoint(row) for row in rows]


async def update_endpoint(
    conn: db.Connection,
    endpoint_id: uuid.UUID,
    *,
    url: str | None = None,
    event_types: Sequence[str] | None = None,
    allow_private: bool,
) -> EventEndpoint:
    """Change what is given; any update enables the endpoint again (its failures are forgotten), and its
    deliveries still pending are sent from now on."""
    types = events.parse_event_types(event_types) if event_types is not None else None
    if url is not None:
        await events.check_url(url, allow_private=allow_private)
    async with conn.transaction():
        row = await conn.fetchrow(
            f"""UPDATE driftlock.event_endpoints
                SET url = coalesce($2, url), event_types = coalesce($3, event_types), disabled_at = NULL,
                    disabled_reason = NULL, failing_since = NULL, updated_at = now()
                WHERE id = $1 RETURNING {COLUMNS}""",
            endpoint_id,
            url,
            list(types) if types is not None else None,
        )
        if row is None:
            raise NotFound(f"no event endpoint with id {endpoint_id}")
        await conn.execute(
            """UPDATE driftlock.event_deliveries SET next_attempt_at = now()
               WHERE endpoint_id = $1 AND state = 'pending'""",
            endpoint_id,
        )
    return _endpoint(row)


async def delete_endpoint(conn: db.Connection, endpoint_id: uuid.UUID) -> EventEndpoint:
    row = await conn.fetchrow(f"DELETE FROM driftlock.event_endpoints WHERE id = $1 RETURNING {COLUMNS}", endpoint_id)
    if row is None:
        raise NotFound(f"no event endpoint with id {endpoint_id}")
    return _endpoint(row)


async def send_test(conn: db.Connection, endpoint: EventEndpoint) -> str:
    """Queue an `event_endpoint.test` event for this endpoint alone; its id."""
    async with conn.transaction():
        event_id: str = await conn.fetchval(
            """INSERT INTO driftlock.events (type, org_id, data, fanned_out_at)
               VALUES ($1, $2, jsonb_build_object('org_id', $3::text, 'endpoint_id', $4::text), now())
               RETURNING id""",
            EventType.ENDPOINT_TEST.value,
            endpoint.org_id,
            str(endpoint.org_id),
            str(endpoint.id),
        )
        await conn.execute(
            "INSERT INTO driftlock.event_deliveries (event_id, endpoint_id) VALUES ($1, $2)", event_id, endpoint.id
        )
        await conn.execute("SELECT pg_notify('driftlock_events', json_build_object('id', $1::text)::text)", event_id)
    return event_id


async def list_deliveries(
    conn: db.Connection,
    *,
    org_id: uuid.UUID | None = None,
    endpoint_id: uuid.UUID | None = None,
    state: str | None = None,
    limit: int = 100,
) -> list[Delivery]:
    """Newest first. An organisation's are those to its own endpoints (the operator's copies are not its)."""
    if state is not None and state not in DELIVERY_STATES:
        raise ValueError(f"state must be one of {', '.join(DELIVERY_STATES)}")
    rows = await conn.fetch(
        """SELECT d.id, d.event_id, e.type AS event_type, e.org_id, d.endpoint_id, d.state, d.attempts,
                  d.next_attempt_at, d.created_at, d.last_attempt_at, d.last_status, d.last_error, d.delivered_at,
                  ep.url
           FROM driftlock.event_deliveries d
           JOIN driftlock.events e ON e.id = d.event_id
           LEFT JOIN driftlock.event_endpoints ep ON ep.id = d.endpoint_id
           WHERE ($1::uuid IS NULL OR (ep.org_id = $1 AND d.endpoint_id IS NOT NULL))
             AND ($2::uuid IS NULL OR d.endpoint_id = $2)
             AND ($3::text IS NULL OR d.state = $3)
           ORDER BY d.id DESC
           LIMIT $4""",
        org_id,
        endpoint_id,
        state,
        limit,
    )
    return [db.from_row(Delivery, row) for row in rows]

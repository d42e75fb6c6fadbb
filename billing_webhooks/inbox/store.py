"""SQL of the webhook service: the event inbox, the subscription rows and the organisation billing columns.

Every statement names its schema and takes its values as parameters. Functions take a connection that is
already inside the caller's transaction.
"""

import dataclasses
import json
import uuid
from collections.abc import Iterable
from datetime import datetime

import asyncpg

from billing_webhooks.inbox.decisions import EventOutcome, OrgBilling, Position, StatusReport, SubscriptionState
from billing_webhooks.inbox.events import Envelope, contains_nul
from driftlock_kernel import db
from driftlock_kernel.billing import SubscriptionStatus

# --- the inbox ---------------------------------------------------------------------------------------------


async def insert_event(conn: db.Connection, event: Envelope, payload: dict, raw: str | None = None) -> bool:
    """Store a new event, or take back one stored as `failed` to apply it again (a resend from Stripe's Dashboard
    carries the same id); False when its id is stored with any other outcome (a duplicate). A concurrent insert
    of the same id waits for the first transaction and then decides on what it left.

    A payload with U+0000 in a string, which jsonb refuses, is kept as the text received (`raw`, else as
    re-encoded), losslessly."""
    as_text = contains_nul(payload)
    inserted = await conn.fetchval(
        """INSERT INTO driftlock.stripe_events (id, type, api_version, created, livemode, payload, payload_text)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (id) DO UPDATE SET
               payload = EXCLUDED.payload, payload_text = EXCLUDED.payload_text,
               attempts = driftlock.stripe_events.attempts + 1, replayed_at = now()
           WHERE driftlock.stripe_events.outcome = 'failed'
           RETURNING id""",
        event.id,
        event.type,
        event.api_version,
        event.created,
        event.livemode,
        None if as_text else payload,
        (raw if raw is not None else json.dumps(payload)) if as_text else None,
    )
    return inserted is not None


def _storable(text: str | None) -> str | None:
    # A detail may quote what an event carried; text columns refuse U+0000.
    return None if text is None else text.replace("\x00", "\\u0000")


async def finish_event(
    conn: db.Connection, event_id: str, outcome: EventOutcome, detail: str | None, org_id: uuid.UUID | None
) -> None:
    await conn.execute(
        """UPDATE driftlock.stripe_events
           SET outcome = $2, detail = $3, org_id = $4, processed_at = now()
           WHERE id = $1""",
        event_id,
        outcome.value,
        _storable(detail),
        org_id,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class StoredEvent:
    id: str
    type: str
    outcome: str
    detail: str | None
    payload: dict


async def lock_stored_event(conn: db.Connection, event_id: str) -> StoredEvent | None:
    """A stored event with its payload, locked until the transaction ends (a delivery of it waits)."""
    row = await conn.fetchrow(
        """SELECT id, type, outcome, detail, payload, payload_text FROM driftlock.stripe_events
           WHERE id = $1 FOR UPDATE""",
        event_id,
    )
    if row is None:
        return None
    payload = row["payload"] if row["payload"] is not None else json.loads(row["payload_text"])
    return StoredEvent(row["id"], row["type"], row["outcome"], row["detail"], payload)


async def record_replay(conn: db.Connection, event_id: str) -> None:
    await conn.execute(
        "UPDATE driftlock.stripe_events SET attempts = attempts + 1, replayed_at = now() WHERE id = $1", event_id
    )


async def event_ids(conn: db.Connection, *, outcome: str, received_since: datetime | None, limit: int) -> list[str]:
    """Stored events with this outcome, oldest first (by Stripe's time), so that a replay keeps their order."""
    rows = await conn.fetch(
        """SELECT id FROM driftlock.stripe_events
           WHERE outcome = $1 AND ($2::timestamptz IS NULL OR received_at >= $2)
           ORDER BY created, id
           LIMIT $3""",
        outcome,
        received_since,
        limit,
    )
    return [row["id"] for row in rows]


async def latest_applied_checkout(
    conn: db.Connection, org_id: uuid.UUID, *, other_than: str
) -> tuple[datetime, str] | None:
    row = await conn.fetchrow(
        """SELECT created, id FROM driftlock.stripe_events
           WHERE org_id = $1 AND type = 'checkout.session.completed' AND outcome = 'applied' AND id <> $2
           ORDER BY created DESC, id DESC
           LIMIT 1""",
        org_id,
        other_than,
    )
    return (row["created"], row["id"]) if row else None


async def list_events(
    conn: db.Connection,
    *,
    org_id: uuid.UUID | None = None,
    outcome: str | None = None,
    event_type: str | None = None,
    limit: int = 50,
) -> list[dict]:
    """The most recently received events (without their payloads), newest first."""
    rows = await conn.fetch(
        """SELECT id, type, api_version, created, outcome, detail, org_id, received_at, processed_at, attempts,
                  replayed_at
           FROM driftlock.stripe_events
           WHERE ($1::uuid IS NULL OR org_id = $1)
             AND ($2::text IS NULL OR outcome = $2)
             AND ($3::text IS NULL OR type = $3)
           ORDER BY received_at DESC, id
           LIMIT $4""",
        org_id,
        outcome,
        event_type,
        limit,
    )
    return [dict(row) for row in rows]


# --- serialising one customer's events -----------------------------------------------------------------------


async def lock_customer(conn: db.Connection, customer_id: str) -> None:
    """Hold, until the transaction ends, the lock that serialises the events of one Stripe customer.

    Every handler takes it first (before any organisation row), so two events about one customer never decide
    from the same stale state, and locks are always taken in the same order. Transaction-scoped, so it works
    through a transaction pooler.
    """
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"driftlock.stripe_customer:{customer_id}"
    )


async def lock_org(conn: db.Connection, org_id: uuid.UUID) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"driftlock.org_billing:{org_id}")


# --- subscriptions -----------------------------------------------------------------------------------------


def _position(row: asyncpg.Record, prefix: str) -> Position | None:
    at = row[f"{prefix}_at"]
    if at is None:
        return None
    return Position(at, row[f"{prefix}_rank"], row[f"{prefix}_event_id"])


def _subscription(row: asyncpg.Record) -> SubscriptionState:
    return dataclasses.replace(
        db.from_row(SubscriptionState, row),
        status_position=_position(row, "status"),
        snapshot_position=_position(row, "snapshot"),
    )


async def load_subscription(conn: db.Connection, subscription_id: str) -> SubscriptionState | None:
    """The subscription with its status history (the row locked until the transaction ends)."""
    row = await conn.fetchrow("SELECT * FROM driftlock.stripe_subscriptions WHERE id = $1 FOR UPDATE", subscription_id)
    if row is None:
        return None
    reports = await conn.fetch(
        """SELECT at, rank, event_id, status, payment_succeeded FROM driftlock.stripe_subscription_history
           WHERE subscription_id = $1 ORDER BY at, rank, event_id""",
        subscription_id,
    )
    history = tuple(
        StatusReport(
            Position(r["at"], r["rank"], r["event_id"]),
            status=SubscriptionStatus(r["status"]) if r["status"] is not None else None,
            payment_succeeded=r["payment_succeeded"],
        )
        for r in reports
    )
    return dataclasses.replace(_subscription(row), history=history)


async def add_report(conn: db.Connection, subscription_id: str, report: StatusReport) -> None:
    """Keep what an event said about the subscription's status (once per event id)."""
    await conn.execute(
        """INSERT INTO driftlock.stripe_subscription_history
               (subscription_id, event_id, at, rank, status, payment_succeeded)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (subscription_id, event_id) DO NOTHING""",
        subscription_id,
        report.at.event_id,
        report.at.created,
        report.at.rank,
        report.status,
        report.payment_succeeded,
    )


async def subscriptions_of_org(conn: db.Connection, org_id: uuid.UUID) -> list[SubscriptionState]:
    rows = await conn.fetch("SELECT * FROM driftlock.stripe_subscriptions WHERE org_id = $1", org_id)
    return [_subscription(row) for row in rows]


async def save_subscription(conn: db.Connection, sub: SubscriptionState) -> None:
    status, snapshot = sub.status_position, sub.snapshot_position
    await conn.execute(
        """INSERT INTO driftlock.stripe_subscriptions AS s (
               id, customer_id, org_id, status, past_due_since, status_at, status_rank, status_event_id,
               price_ids, period_start, period_end, trial_end, cancel_at_period_end, ended,
               snapshot_at, snapshot_rank, snapshot_event_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
           ON CONFLICT (id) DO UPDATE SET
               customer_id = EXCLUDED.customer_id, org_id = EXCLUDED.org_id, status = EXCLUDED.status,
               past_due_since = EXCLUDED.past_due_since, status_at = EXCLUDED.status_at,
               status_rank = EXCLUDED.status_rank, status_event_id = EXCLUDED.status_event_id,
               price_ids = EXCLUDED.price_ids, period_start = EXCLUDED.period_start,
               period_end = EXCLUDED.period_end, trial_end = EXCLUDED.trial_end,
               cancel_at_period_end = EXCLUDED.cancel_at_period_end, ended = EXCLUDED.ended,
               snapshot_at = EXCLUDED.snapshot_at,
               snapshot_rank = EXCLUDED.snapshot_rank, snapshot_event_id = EXCLUDED.snapshot_event_id,
               updated_at = now()""",
        sub.id,
        sub.customer_id,
        sub.org_id,
        sub.status,
        sub.past_due_since,
        status.created if status else None,
        status.rank if status else None,
        status.event_id if status else None,
        list(sub.price_ids),
        sub.period_start,
        sub.period_end,
        sub.trial_end,
        sub.cancel_at_period_end,
        sub.ended,
        snapshot.created if snapshot else None,
        snapshot.rank if snapshot else None,
        snapshot.event_id if snapshot else None,
    )


async def claim_subscription(conn: db.Connection, subscription_id: str, customer_id: str, org_id: uuid.UUID) -> None:
    """Record that a checkout named this subscription for this organisation (a row with only its id if no event
    of it has arrived yet)."""
    await conn.execute(
        """INSERT INTO driftlock.stripe_subscriptions (id, customer_id, org_id) VALUES ($1, $2, $3)
           ON CONFLICT (id) DO UPDATE SET org_id = coalesce(driftlock.stripe_subscriptions.org_id, EXCLUDED.org_id),
                                          updated_at = now()""",
        subscription_id,
        customer_id,
        org_id,
    )


async def link_customer_subscriptions(conn: db.Connection, customer_id: str, org_id: uuid.UUID) -> list[str]:
    """Link the customer's subscriptions that no organisation claimed yet; return their ids."""
    rows = await conn.fetch(
        """UPDATE driftlock.stripe_subscriptions SET org_id = $2, updated_at = now()
           WHERE customer_id = $1 AND org_id IS NULL
           RETURNING id""",
        customer_id,
        org_id,
    )
    return sorted(row["id"] for row in rows)


# --- organisations -----------------------------------------------------------------------------------------

_ORG_COLUMNS = (
    "plan_name",
    "billing_status",
    "past_due_since",
    "stripe_customer_id",
    "stripe_subscription_id",
    "period_start",
    "period_end",
    "trial_end",
    "cancel_at_period_end",
)


async def load_org(conn: db.Connection, org_id: uuid.UUID) -> OrgBilling | None:
    row = await conn.fetchrow(
        f"SELECT id, {', '.join(_ORG_COLUMNS)} FROM driftlock.organizations WHERE id = $1 FOR UPDATE", org_id
    )
    return db.from_row(OrgBilling, row) if row else None


async def org_exists(conn: db.Connection, org_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM driftlock.organizations WHERE id = $1)", org_id))


async def org_of_customer(conn: db.Connection, customer_id: str) -> uuid.UUID | None:
    return await conn.fetchval("SELECT id FROM driftlock.organizations WHERE stripe_customer_id = $1", customer_id)


async def org_of_subscription(conn: db.Connection, subscription_id: str) -> uuid.UUID | None:
    return await conn.fetchval(
        "SELECT id FROM driftlock.organizations WHERE stripe_subscription_id = $1", subscription_id
    )


async def update_org(conn: db.Connection, org_id: uuid.UUID, changes: dict[str, object]) -> None:
    """Write the changed billing columns (and so wake every authz replica, through the table's trigger)."""
    if not changes:
        return
    unknown = set(changes) - set(_ORG_COLUMNS)
    if unknown:
        raise ValueError(f"not an organisation billing column: {sorted(unknown)}")
    columns = sorted(changes)
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(columns, start=2))
    await conn.execute(
        f"UPDATE driftlock.organizations SET {assignments}, updated_at = now() WHERE id = $1",
        org_id,
        *(changes[column] for column in columns),
    )


async def plans_by_price(conn: db.Connection, price_ids: Iterable[str]) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT stripe_price_id, plan_name FROM driftlock.plan_prices WHERE stripe_price_id = ANY($1::text[])",
        list(price_ids),
    )
    return {row["stripe_price_id"]: row["plan_name"] for row in rows}


# --- stripe sync -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class LinkedOrg:
    id: uuid.UUID
    stripe_customer_id: str | None
    stripe_subscription_id: str | None


async def linked_orgs(conn: db.Connection, org_id: uuid.UUID | None = None) -> list[LinkedOrg]:
    """Organisations with a Stripe customer or subscription (or the one asked for, linked or not)."""
    rows = await conn.fetch(
        """SELECT id, stripe_customer_id, stripe_subscription_id FROM driftlock.organizations
           WHERE ($1::uuid IS NULL AND (stripe_customer_id IS NOT NULL OR stripe_subscription_id IS NOT NULL))
              OR id = $1
           ORDER BY id""",
        org_id,
    )
    return [db.from_row(LinkedOrg, row) for row in rows]


async def claim_job(conn: db.Connection, name: str, interval_seconds: float, runner: str) -> bool:
    """Whether this replica runs the job now: it is the one that moved the job's `started_at` past the interval
    (`driftlock.maintenance_runs`, shared with retention; one statement, so a transaction pooler is fine)."""
    claimed = await conn.fetchval(
        """INSERT INTO driftlock.maintenance_runs AS m (task, started_at, replica) VALUES ($1, now(), $3)
           ON CONFLICT (task) DO UPDATE SET started_at = now(), replica = EXCLUDED.replica, finished_at = NULL
           WHERE m.started_at <= now() - make_interval(secs => $2)
           RETURNING task""",
        name,
        interval_seconds,
        runner,
    )
    return claimed is not None


async def finish_job(conn: db.Connection, name: str, runner: str, detail: dict) -> None:
    await conn.execute(
        "UPDATE driftlock.maintenance_runs SET finished_at = now(), detail = $3 WHERE task = $1 AND replica = $2",
        name,
        runner,
        detail,
    )

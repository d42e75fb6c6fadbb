"""SQL of the usage outbox (`driftlock.stripe_exports`): what the decisions read, the rows they write, and the
claims under which senders send them.

Deciding runs in one transaction under a transaction-scoped advisory lock, so two replicas never decide the
same units twice (the second waits, then sees the first's rows), and it works through a transaction pooler.
Sending takes rows with `FOR UPDATE SKIP LOCKED` and a lease instead of holding a transaction open across a call
to Stripe: a sender that dies leaves its claim to expire, and the next one sends the same identifier again.
"""

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from billing_webhooks.usage_export.exports import ExportState, Marks, NewExport
from driftlock_kernel import db
from driftlock_kernel.billing import BillingStatus

# Any fixed 64-bit number: "the driftlock usage-export decision lock" among the database's advisory locks.
DECISION_LOCK_ID = 0x0D21F7_E4B0
# Counters untouched for longer cannot hold anything Stripe would still accept (35 days), plus margin.
LOOKBACK = timedelta(days=40)


@dataclass(frozen=True, slots=True)
class PeriodRow:
    """An organisation's period, for one meter and customer its units were used under, as the decision reads it
    (before its end is resolved)."""

    org_id: uuid.UUID
    period_start: datetime
    meter: str  # the terms the counters recorded ('' customer: the organisation's, once it has one)
    customer: str
    last_counted_at: datetime | None  # when these counters last changed
    stored_units: int
    sent_units: int
    pending_units: int
    skipped_units: int
    next_seq: int
    last_state: str | None
    last_finished_at: datetime | None
    recorded_meter: str | None
    recorded_customer: str | None
    recorded_end: datetime | None  # the period's end as Stripe reported it (billing_periods)
    stripe_customer_id: str | None
    org_period_start: datetime | None
    org_period_end: datetime | None
    plan_name: str
    billing_status: BillingStatus
    observed_at: datetime  # the database's time of this read
    observed_snapshot: str  # and the snapshot it read in
    marks: Marks = field(default_factory=Marks)  # an open period's candidate and settled marks
    refunds_since_candidate: int = 0  # refunds the candidate's snapshot did not see
    refunds_since_settled: int = 0


# Counters are kept per the terms their units were used under (migration 0010); each meter and customer of a period
# is decided on its own. Terms not recorded (plan_name '', from an older authz) go where they went before: the
# organisation's current meter and customer; a meter recorded without a customer goes to the organisation's
# customer once it has one.
_TERMS = """
    CASE WHEN {t}.plan_name = '' THEN coalesce(p.stripe_meter, '') ELSE {t}.stripe_meter END AS meter,
    CASE WHEN {t}.plan_name = '' OR {t}.stripe_customer_id = '' THEN coalesce(o.stripe_customer_id, '')
         ELSE {t}.stripe_customer_id END AS customer"""

_PERIODS_SQL = (
    """
WITH touched AS (
    SELECT org_id, period_start FROM driftlock.usage_counters WHERE updated_at > now() - $1::interval
    UNION
    SELECT org_id, period_start FROM driftlock.stripe_exports
    WHERE state IN ('pending', 'failed') AND created_at > now() - $1::interval
),
counted AS (
    SELECT c.org_id, c.period_start, """
    + _TERMS.format(t="c")
    + """, c.units, c.updated_at
    FROM touched t
    JOIN driftlock.usage_counters c ON c.org_id = t.org_id AND c.period_start = t.period_start
    JOIN driftlock.organizations o ON o.id = c.org_id
    LEFT JOIN driftlock.plans p ON p.name = o.plan_name
),
refunded AS (
    SELECT r.org_id, r.period_start, """
    + _TERMS.format(t="r")
    + """, r.units, r.xid
    FROM touched t
    JOIN driftlock.usage_refunds r ON r.org_id = t.org_id AND r.period_start = t.period_start
    JOIN driftlock.organizations o ON o.id = r.org_id
    LEFT JOIN driftlock.plans p ON p.name = o.plan_name
),
targets AS (
    SELECT org_id, period_start, meter, customer, sum(units)::bigint AS stored_units,
           max(updated_at) AS last_counted_at
    FROM counted GROUP BY org_id, period_start, meter, customer
    UNION
    SELECT e.org_id, e.period_start, e.event_name, e.stripe_customer_id, 0, NULL
    FROM touched t JOIN driftlock.stripe_exports e ON e.org_id = t.org_id AND e.period_start = t.period_start
    WHERE NOT EXISTS (SELECT 1 FROM counted k WHERE k.org_id = e.org_id AND k.period_start = e.period_start
                                                AND k.meter = e.event_name AND k.customer = e.stripe_customer_id)
)
SELECT t.org_id, t.period_start, t.meter, t.customer, t.last_counted_at, t.stored_units,
       x.sent_units, x.pending_units, x.skipped_units, s.next_seq, x.last_state, x.last_finished_at,
       x.recorded_meter, x.recorded_customer, bp.period_end AS recorded_end,
       o.stripe_customer_id, o.period_start AS org_period_start, o.period_end AS org_period_end, o.plan_name,
       o.billing_status, now() AS observed_at, pg_current_snapshot()::text AS observed_snapshot,
       m.candidate_at, coalesce(m.candidate_units, 0) AS candidate_units, m.candidate_snapshot::text,
       m.settled_at, coalesce(m.settled_units, 0) AS settled_units, m.settled_snapshot::text,
       (SELECT coalesce(sum(r.units), 0) FROM refunded r
        WHERE r.org_id = t.org_id AND r.period_start = t.period_start AND r.meter = t.meter
          AND r.customer = t.customer
          AND NOT pg_visible_in_snapshot(r.xid, m.candidate_snapshot))::bigint AS refunds_since_candidate,
       (SELECT coalesce(sum(r.units), 0) FROM refunded r
        WHERE r.org_id = t.org_id AND r.period_start = t.period_start AND r.meter = t.meter
          AND r.customer = t.customer
          AND NOT pg_visible_in_snapshot(r.xid, m.settled_snapshot))::bigint AS refunds_since_settled
FROM targets t
JOIN driftlock.organizations o ON o.id = t.org_id
LEFT JOIN driftlock.billing_periods bp ON bp.org_id = t.org_id AND bp.period_start = t.period_start
LEFT JOIN driftlock.stripe_export_marks m
    ON m.org_id = t.org_id AND m.period_start = t.period_start AND m.stripe_meter = t.meter
   AND m.stripe_customer_id = t.customer
CROSS JOIN LATERAL (
    SELECT coalesce(sum(e.units) FILTER (WHERE e.state = 'sent'), 0)::bigint AS sent_units,
           coalesce(sum(e.units) FILTER (WHERE e.state = 'pending'), 0)::bigint AS pending_units,
           coalesce(sum(e.units) FILTER (WHERE e.state = 'skipped'), 0)::bigint AS skipped_units,
           (array_agg(e.state ORDER BY e.seq DESC))[1] AS last_state,
           (array_agg(e.finished_at ORDER BY e.seq DESC))[1] AS last_finished_at,
           (array_agg(e.event_name ORDER BY e.seq DESC))[1] AS recorded_meter,
           (array_agg(e.stripe_customer_id ORDER BY e.seq DESC))[1] AS recorded_customer
    FROM driftlock.stripe_exports e
    WHERE e.org_id = t.org_id AND e.period_start = t.period_start AND e.event_name = t.meter
      AND e.stripe_customer_id = t.customer
) x
-- Identifiers are one sequence per period, whatever the meter.
CROSS JOIN LATERAL (
    SELECT coalesce(max(e.seq), 0) + 1 AS next_seq FROM driftlock.stripe_exports e
    WHERE e.org_id = t.org_id AND e.period_start = t.period_start
) s
WHERE t.meter <> '' AND t.customer <> ''
ORDER BY t.org_id, t.period_start, t.meter, t.customer
"""
)


async def lock_decisions(conn: db.Connection) -> None:
    """Serialise deciding across replicas until the transaction ends."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", DECISION_LOCK_ID)


async def period_rows(conn: db.Connection, lookback: timedelta = LOOKBACK) -> list[PeriodRow]:
    rows = await conn.fetch(_PERIODS_SQL, lookback)
    return [dataclasses.replace(db.from_row(PeriodRow, row), marks=db.from_row(Marks, row)) for row in rows]


async def save_marks(conn: db.Connection, marks: Sequence[tuple[uuid.UUID, datetime, str, str, Marks]]) -> None:
    """Marks per organisation, period, meter and customer."""
    if not marks:
        return
    await conn.execute(
        """INSERT INTO driftlock.stripe_export_marks AS m (
               org_id, period_start, stripe_meter, stripe_customer_id, candidate_at, candidate_units,
               candidate_snapshot, settled_at, settled_units, settled_snapshot)
           SELECT o, p, sm, sc, ca, cu, cs::pg_snapshot, sa, su, ss::pg_snapshot
           FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], $5::text[],
                       $6::timestamptz[], $7::bigint[], $8::text[], $9::text[], $10::text[])
                AS x(o, p, ca, cu, cs, sa, su, ss, sm, sc)
           ON CONFLICT (org_id, period_start, stripe_meter, stripe_customer_id) DO UPDATE SET
               candidate_at = EXCLUDED.candidate_at, candidate_units = EXCLUDED.candidate_units,
               candidate_snapshot = EXCLUDED.candidate_snapshot, settled_at = EXCLUDED.settled_at,
               settled_units = EXCLUDED.settled_units, settled_snapshot = EXCLUDED.settled_snapshot""",
        [org for org, *_ in marks],
        [start for _, start, *_ in marks],
        [m.candidate_at for *_, m in marks],
        [m.candidate_units for *_, m in marks],
        [m.candidate_snapshot for *_, m in marks],
        [m.settled_at for *_, m in marks],
        [m.settled_units if m.settled_at is not None else None for *_, m in marks],
        [m.settled_snapshot for *_, m in marks],
        [meter for _, _, meter, _, _ in marks],
        [customer for _, _, _, customer, _ in marks],
    )


async def plan_meters(conn: db.Connection) -> dict[str, str | None]:
    rows = await conn.fetch("SELECT name, stripe_meter FROM driftlock.plans")
    return {row["name"]: row["stripe_meter"] for row in rows}


async def insert_exports(conn: db.Connection, exports: Sequence[NewExport]) -> list[int]:
    if not exports:
        return []
    rows = await conn.fetch(
        """INSERT INTO driftlock.stripe_exports (
               org_id, period_start, period_end, seq, identifier, event_name, stripe_customer_id, units,
               event_timestamp, state, error, finished_at)
           SELECT x.org_id, x.period_start, x.period_end, x.seq, x.identifier, x.event_name, x.customer, x.units,
                  x.ts, x.state, x.error, CASE WHEN x.state = 'pending' THEN NULL ELSE now() END
           FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::int[], $5::text[], $6::text[],
                       $7::text[], $8::bigint[], $9::timestamptz[], $10::text[], $11::text[])
                AS x(org_id, period_start, period_end, seq, identifier, event_name, customer, units, ts, state, error)
           RETURNING id""",
        [e.org_id for e in exports],
        [e.period.start for e in exports],
        [e.period.end for e in exports],
        [e.seq for e in exports],
        [e.identifier for e in exports],
        [e.event_name for e in exports],
        [e.customer for e in exports],
        [e.units for e in exports],
        [e.timestamp for e in exports],
        [e.state.value for e in exports],
        [e.error for e in exports],
    )
    return [row["id"] for row in rows]


# --- sending ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedExport:
    id: int
    org_id: uuid.UUID
    period_start: datetime
    period_end: datetime
    seq: int
    identifier: str
    event_name: str
    stripe_customer_id: str
    units: int
    event_timestamp: datetime
    attempts: int
    first_attempt_at: datetime | None
    claim_token: uuid.UUID
    # An earlier attempt may have reached Stripe (no answer, a 5xx, a 409, or a sender that died mid-call).
    maybe_landed: bool = False
    # Stripe refused a later attempt (this message) after one that may have landed: reconcile before failing.
    refused_error: str | None = None


async def claim_due(
    pool: asyncpg.Pool, *, runner: str, lease: timedelta, limit: int, token: uuid.UUID
) -> list[ClaimedExport]:
    """Take up to `limit` pending rows that are due and not claimed by a live sender. The claim counts as an
    attempt and records when the identifier may first have reached Stripe, before anything is sent."""
    rows = await pool.fetch(
        """UPDATE driftlock.stripe_exports e
           SET claim_token = $1, claimed_by = $2, claimed_until = now() + $3::interval,
               attempts = e.attempts + 1, last_attempt_at = now(),
               first_attempt_at = coalesce(e.first_attempt_at, now()),
               -- A claim still held when its lease ran out: that sender died, perhaps after Stripe recorded it.
               maybe_landed = e.maybe_landed OR e.claim_token IS NOT NULL
           WHERE e.id IN (
               SELECT id FROM driftlock.stripe_exports
               WHERE state = 'pending' AND next_attempt_at <= now()
                 AND (claimed_until IS NULL OR claimed_until < now())
               ORDER BY next_attempt_at, id
               LIMIT $4
               FOR UPDATE SKIP LOCKED)
           RETURNING e.id, e.org_id, e.period_start, e.period_end, e.seq, e.identifier, e.event_name,
                     e.stripe_customer_id, e.units, e.event_timestamp, e.attempts, e.first_attempt_at,
                     e.claim_token, e.maybe_landed, e.refused_error""",
        token,
        runner,
        lease,
        limit,
    )
    return [db.from_row(ClaimedExport, row) for row in rows]


async def mark_finished(
    pool: asyncpg.Pool,
    export_id: int,
    state: ExportState,
    *,
    token: uuid.UUID | None,
    error: str | None = None,
    request_id: str | None = None,
) -> bool:
    """Finish a pending row: `sent` by whoever learns that Stripe has it (a stale claimant too, token None);
    `failed` or `skipped` only by the current claimant. False when the row was no longer there to finish."""
    status = await pool.execute(
        """UPDATE driftlock.stripe_exports
           SET state = $2, error = $4, stripe_request_id = coalesce($5, stripe_request_id),
               finished_at = now(), claim_token = NULL, claimed_until = NULL
           WHERE id = $1 AND state = 'pending' AND ($3::uuid IS NULL OR claim_token = $3)""",
        export_id,
        state.value,
        token,
        error,
        request_id,
    )
    return status.endswith(" 1")


async def mark_retry(
    pool: asyncpg.Pool,
    export_id: int,
    token: uuid.UUID,
    error: str | None,
    retry_in: timedelta,
    *,
    attempted: bool = True,
    restart_window: bool = False,
    maybe_landed: bool = False,
    refused_error: str | None = None,
) -> None:
    """Give the row back, due again in `retry_in`. `attempted=False`: nothing was sent under this claim (the
    attempt is not counted); `restart_window`: Stripe was found not to have it, so its 24 hours start anew (and
    nothing earlier can have landed); `maybe_landed`: this attempt got no answer that says it did not reach
    Stripe; `refused_error`: Stripe refused this attempt after an earlier one that may have landed, so the row
    is reconciled against Stripe's total before it is failed."""
    await pool.execute(
        """UPDATE driftlock.stripe_exports
           SET error = coalesce($3, error), next_attempt_at = now() + $4::interval,
               attempts = attempts - CASE WHEN $5 THEN 0 ELSE 1 END,
               first_attempt_at = CASE WHEN $6 THEN NULL ELSE first_attempt_at END,
               maybe_landed = CASE WHEN $6 THEN false ELSE maybe_landed OR $7 END,
               refused_error = coalesce($8, refused_error),
               claim_token = NULL, claimed_until = NULL
           WHERE id = $1 AND state = 'pending' AND claim_token = $2""",
        export_id,
        token,
        error,
        retry_in,
        attempted,
        restart_window,
        maybe_landed,
        refused_error,
    )


async def sent_in_period(
    pool: asyncpg.Pool, org_id: uuid.UUID, period_start: datetime, event_name: str, customer: str
) -> tuple[int, datetime | None]:
    """Units of the period's rows Stripe has (for this meter and customer), and when the latest was sent."""
    row = await pool.fetchrow(
        """SELECT coalesce(sum(units), 0)::bigint AS units, max(finished_at) AS latest
           FROM driftlock.stripe_exports
           WHERE org_id = $1 AND period_start = $2 AND event_name = $3 AND stripe_customer_id = $4
             AND state = 'sent'""",
        org_id,
        period_start,
        event_name,
        customer,
    )
    return (row["units"], row["latest"]) if row else (0, None)


# --- reading ---------------------------------------------------------------------------------------------------

_EXPORT_COLUMNS = """
    id, org_id, period_start, period_end, seq, identifier, event_name, stripe_customer_id, units, event_timestamp,
    state, attempts, first_attempt_at, last_attempt_at, next_attempt_at, stripe_request_id, error, created_at,
    finished_at
"""


async def list_exports(
    conn: db.Connection,
    *,
    org_id: uuid.UUID | None = None,
    state: ExportState | None = None,
    limit: int = 100,
) -> list[dict]:
    """The most recent rows, newest first."""
    rows = await conn.fetch(
        f"""SELECT {_EXPORT_COLUMNS} FROM driftlock.stripe_exports
            WHERE ($1::uuid IS NULL OR org_id = $1) AND ($2::text IS NULL OR state = $2)
            ORDER BY created_at DESC, id DESC
            LIMIT $3""",
        org_id,
        state.value if state else None,
        limit,
    )
    return [dict(row) for row in rows]


async def exports_by_id(conn: db.Connection, ids: Sequence[int]) -> list[dict]:
    rows = await conn.fetch(
        f"SELECT {_EXPORT_COLUMNS} FROM driftlock.stripe_exports WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids)
    )
    return [dict(row) for row in rows]


async def exported_units(conn: db.Connection, org_id: uuid.UUID, period_start: datetime) -> dict[str, int]:
    """Units of a period's rows by state."""
    rows = await conn.fetch(
        """SELECT state, sum(units)::bigint AS units FROM driftlock.stripe_exports
           WHERE org_id = $1 AND period_start = $2 GROUP BY state""",
        org_id,
        period_start,
    )
    return {state.value: 0 for state in ExportState} | {row["state"]: row["units"] for row in rows}

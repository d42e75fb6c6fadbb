"""The SQL behind metering: one statement per flush, one per cold usage read, one per batch of alerts; and the
spill files that keep what a shutdown could not flush."""

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from authz_service.usage.refunds import NO_TERMS, Refund, Terms
from authz_service.usage.rollups import NIL_KEY
from authz_service.usage.rollups import WIDTH as ROLLUP_WIDTH
from authz_service.usage.usage_ledger import Batch, Report, UsageKey
from driftlock_kernel import db

# Applies a batch exactly once and reads back the pooled totals of every organisation and period it touched.
# - The flush id goes into meter_flushes first; if it is there already (a retry after a lost commit
#   acknowledgement), the counted units are not added again.
# - Backend reports and refunds are idempotent on their own: a request id already stored (for a report: by the
#   same organisation) adds (or takes back) nothing. A refund takes its units back from the counter of the
#   period, product and terms it was billed to.
# - Counters are kept per terms (plan, Stripe meter, Stripe customer, recorded when the unit was counted:
#   $19-$27), so that a plan change starts new counters rather than moving the old units to the new plan.
# - Counters are upserted in key order, so two replicas flushing the same organisations lock rows in the same
#   order and cannot deadlock.
# - Totals: rows this statement wrote come from RETURNING (the rest of the statement cannot see them), the other
#   products of the same organisation and period from the statement's snapshot.
# - Units of an organisation deleted meanwhile are dropped rather than failing the whole flush.
# - usage_totals (the pooled total per organisation and period, which RESERVE_SQL checks caps against) moves by
#   exactly what the counters move by, in the same statement.
FLUSH_SQL = """
WITH flush AS (
    INSERT INTO driftlock.meter_flushes (flush_id, replica, units) VALUES ($1, $2, $3)
    ON CONFLICT (flush_id) DO NOTHING
    RETURNING flush_id
),
counted AS (
    SELECT c.org_id, c.period_start, c.product, c.plan_name, c.stripe_meter, c.stripe_customer_id, c.units
    FROM unnest($4::uuid[], $5::timestamptz[], $6::text[], $19::text[], $20::text[], $21::text[], $7::bigint[])
         AS c(org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units)
    WHERE EXISTS (SELECT 1 FROM flush)
      AND EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = c.org_id)
),
reported AS (
    INSERT INTO driftlock.usage_reports
        (request_id, org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units)
    SELECT r.request_id, r.org_id, r.period_start, r.product, r.plan_name, r.stripe_meter, r.stripe_customer_id,
           r.units
    FROM unnest($8::text[], $9::uuid[], $10::timestamptz[], $11::text[], $22::text[], $23::text[], $24::text[],
                $12::bigint[])
         AS r(request_id, org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units)
    WHERE EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = r.org_id)
    ON CONFLICT (org_id, request_id) DO NOTHING
    RETURNING org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units
),
refunded AS (
    INSERT INTO driftlock.usage_refunds
        (request_id, org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units, reason)
    SELECT f.request_id, f.org_id, f.period_start, f.product, f.plan_name, f.stripe_meter, f.stripe_customer_id,
           f.units, f.reason
    FROM unnest($13::text[], $14::uuid[], $15::timestamptz[], $16::text[], $25::text[], $26::text[], $27::text[],
                $17::bigint[], $18::text[])
         AS f(request_id, org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units, reason)
    WHERE EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = f.org_id)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING request_id, org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units
),
deltas AS (
    SELECT org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, sum(units)::bigint AS units
    FROM (SELECT * FROM counted UNION ALL SELECT * FROM reported
          UNION ALL SELECT org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, -units
                    FROM refunded) AS d
    GROUP BY org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id
),
pooled AS (
    INSERT INTO driftlock.usage_totals AS p (org_id, period_start, units)
    SELECT org_id, period_start, sum(units)::bigint FROM deltas GROUP BY org_id, period_start
    ORDER BY org_id, period_start
    ON CONFLICT (org_id, period_start) DO UPDATE SET units = p.units + EXCLUDED.units, updated_at = now()
    RETURNING 1
),
upserted AS (
    INSERT INTO driftlock.usage_counters AS u
        (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units)
    SELECT org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units FROM deltas
    -- The pooled totals first (an init plan runs `pooled` to its end before the first counter row), in the
    -- order RESERVE_SQL takes them: the two statements lock the same rows in the same order.
    WHERE (SELECT count(*) FROM pooled) >= 0
    ORDER BY org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id
    ON CONFLICT (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id)
        DO UPDATE SET units = u.units + EXCLUDED.units, updated_at = now()
    RETURNING u.org_id, u.period_start, u.product, u.plan_name, u.stripe_meter, u.stripe_customer_id, u.units
),
{ROLLUPS}
touched AS (
    SELECT org_id, period_start FROM unnest($4::uuid[], $5::timestamptz[]) AS t(org_id, period_start)
    UNION
    SELECT org_id, period_start FROM unnest($9::uuid[], $10::timestamptz[]) AS t(org_id, period_start)
    UNION
    SELECT org_id, period_start FROM unnest($14::uuid[], $15::timestamptz[]) AS t(org_id, period_start)
),
totals AS (
    SELECT org_id, period_start, units FROM upserted
    UNION ALL
    SELECT c.org_id, c.period_start, c.units
    FROM driftlock.usage_counters c JOIN touched t USING (org_id, period_start)
    WHERE NOT EXISTS (
        SELECT 1 FROM upserted w
        WHERE w.org_id = c.org_id AND w.period_start = c.period_start AND w.product = c.product
          AND w.plan_name = c.plan_name AND w.stripe_meter = c.stripe_meter
          AND w.stripe_customer_id = c.stripe_customer_id)
)
SELECT EXISTS (SELECT 1 FROM flush) AS applied, t.org_id::text AS org_id, t.period_start,
       coalesce(sum(x.units), 0)::bigint AS total,
       (SELECT coalesce(json_agg(json_build_array(r.product, r.units)), '[]'::json) FROM refunded r) AS refunded
FROM touched t LEFT JOIN totals x USING (org_id, period_start)
GROUP BY t.org_id, t.period_start
"""

# Usage history (migration 0011): the four bucket tables, each upserted from `rolled` (one row per bucket with
# the columns below), in key order (two replicas flushing the same buckets lock them in the same order), after
# the counters (so that FLUSH_SQL and RESERVE_SQL lock usage_totals, then counters, then buckets).
ROLLUP_COUNTS = (
    "units",
    "refunded_units",
    "requests",
    "denied_access",
    "denied_payment",
    "denied_quota",
    "denied_rate",
    "denied_unavailable",
)
_ROLLUP_TABLES = (
    ("hours", "driftlock.usage_hours", ("org_id", "hour", "period_start", "product"), "hour"),
    ("days", "driftlock.usage_days", ("org_id", "day", "product"), "date_trunc('day', hour, 'UTC')"),
    ("key_hours", "driftlock.usage_key_hours", ("org_id", "hour", "key_id", "period_start", "product"), "hour"),
    ("key_days", "driftlock.usage_key_days", ("org_id", "day", "key_id", "product"), "date_trunc('day', hour, 'UTC')"),
)


def _rollup_upserts() -> str:
    counts = ", ".join(ROLLUP_COUNTS)
    sums = ", ".join(f"sum({c})::bigint" for c in ROLLUP_COUNTS)
    adds = ", ".join(f"{c} = b.{c} + EXCLUDED.{c}" for c in ROLLUP_COUNTS)
    parts = []
    for name, table, key, time_expression in _ROLLUP_TABLES:
        columns = ", ".join(key)
        selected = ", ".join(time_expression if c in ("hour", "day") else c for c in key)
        positions = ", ".join(str(i + 1) for i in range(len(key)))
        parts.append(
            f"""rollup_{name} AS (
    INSERT INTO {table} AS b ({columns}, {counts})
    SELECT {selected}, {sums} FROM rolled
    GROUP BY {positions} ORDER BY {positions}
    ON CONFLICT ({columns}) DO UPDATE SET {adds}
    RETURNING 1
),"""
        )
    return "\n".join(parts)


# The flush's buckets: what the batch counted (only when the flush is applied, like its counters), the refunds
# and reports the statement applied (in the bucket of the call refunded, when known; a report in the hour it is
# stored), all after the counters. $42: rollups on (off only in the bench's side-by-side run).
_FLUSH_ROLLED = """rolled AS (
    SELECT b.org_id, b.period_start, b.hour, b.product, {key_b} AS key_id, b.units, 0::bigint AS refunded_units,
           b.requests, b.denied_access, b.denied_payment, b.denied_quota, b.denied_rate, b.denied_unavailable
    FROM unnest($28::uuid[], $29::timestamptz[], $30::timestamptz[], $31::text[], $32::text[], $33::bigint[],
                $34::bigint[], $35::bigint[], $36::bigint[], $37::bigint[], $38::bigint[], $39::bigint[])
         AS b(org_id, period_start, hour, product, key_id, units, requests, denied_access, denied_payment,
              denied_quota, denied_rate, denied_unavailable)
    WHERE EXISTS (SELECT 1 FROM flush)
      AND EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = b.org_id)
      AND (SELECT count(*) FROM upserted) >= 0
    UNION ALL
    SELECT f.org_id, f.period_start, coalesce(x.hour, date_trunc('hour', now(), 'UTC')), f.product,
           {key_x}, -f.units, f.units, 0, 0, 0, 0, 0, 0
    FROM refunded f LEFT JOIN unnest($13::text[], $40::text[], $41::timestamptz[]) AS x(request_id, key_id, hour)
         USING (request_id)
    WHERE $42::boolean AND (SELECT count(*) FROM upserted) >= 0
    UNION ALL
    SELECT r.org_id, r.period_start, date_trunc('hour', now(), 'UTC'), r.product,
           '00000000-0000-0000-0000-000000000000'::uuid, r.units, 0, 0, 0, 0, 0, 0, 0
    FROM reported r
    WHERE $42::boolean AND (SELECT count(*) FROM upserted) >= 0
),"""


def _key_id(text: str) -> str:
    """A key id as a uuid, the nil one when there is none or it is not a UUID: a bucket must never make the
    flush that carries the counters fail."""
    return (
        f"(CASE WHEN {text} ~* '^[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$' "
        f"THEN {text}::uuid ELSE '{NIL_KEY}'::uuid END)"
    )


FLUSH_SQL = FLUSH_SQL.replace(
    "{ROLLUPS}",
    _FLUSH_ROLLED.replace("{key_b}", _key_id("b.key_id")).replace("{key_x}", _key_id("x.key_id"))
    + "\n"
    + _rollup_upserts(),
)

# Near a cap: one unit (or a route's units) counted only if the pooled total stays within the cap, in one
# statement. The conditional upsert locks the organisation's usage_totals row and re-checks the condition on
# its latest version, so replicas reserving at once are serialised there and none passes the cap. $8 is what
# this replica counted and has not had acknowledged yet (it is not in the total). The units go in as a
# one-unit flush with its own id: if the answer is lost, the replica keeps the same batch and a retry through
# FLUSH_SQL finds the id, so the unit counts once either way.
RESERVE_SQL = """
WITH pooled AS (
    INSERT INTO driftlock.usage_totals AS p (org_id, period_start, units)
    SELECT $3::uuid, $4::timestamptz, $6::bigint
    WHERE $6::bigint + $7::bigint <= $8::bigint
      AND EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = $3::uuid)
    ON CONFLICT (org_id, period_start) DO UPDATE SET units = p.units + EXCLUDED.units, updated_at = now()
        WHERE p.units + EXCLUDED.units + $7::bigint <= $8::bigint
    RETURNING p.units
),
flush AS (
    INSERT INTO driftlock.meter_flushes (flush_id, replica, units)
    SELECT $1, $2, $6::bigint FROM pooled
    RETURNING flush_id
),
counted AS (
    INSERT INTO driftlock.usage_counters AS u
        (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units)
    SELECT $3::uuid, $4::timestamptz, $5::text, $9::text, $10::text, $11::text, $6::bigint FROM flush
    ON CONFLICT (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id)
        DO UPDATE SET units = u.units + EXCLUDED.units, updated_at = now()
    RETURNING 1
),
{ROLLUPS}
done AS (SELECT 1)
SELECT (SELECT units FROM pooled) AS reserved_total, (SELECT count(*) FROM counted) AS counted,
       (SELECT units FROM driftlock.usage_totals WHERE org_id = $3::uuid AND period_start = $4::timestamptz)
           AS seen_total
"""

# A reserved call's bucket ($12 key, $13 hour; $14 rollups on), written only when its units were counted.
_RESERVE_ROLLED = """rolled AS (
    SELECT $3::uuid AS org_id, $4::timestamptz AS period_start, $13::timestamptz AS hour, $5::text AS product,
           {key_9} AS key_id, $6::bigint AS units,
           0::bigint AS refunded_units, 1::bigint AS requests, 0::bigint AS denied_access,
           0::bigint AS denied_payment, 0::bigint AS denied_quota, 0::bigint AS denied_rate,
           0::bigint AS denied_unavailable
    FROM flush
    WHERE $14::boolean AND (SELECT count(*) FROM counted) >= 0
),"""
RESERVE_SQL = RESERVE_SQL.replace(
    "{ROLLUPS}", _RESERVE_ROLLED.replace("{key_9}", _key_id("$12::text")) + "\n" + _rollup_upserts()
)

LOAD_SQL = """
SELECT coalesce((SELECT units FROM driftlock.usage_totals WHERE org_id = $1 AND period_start = $2), 0)::bigint
"""

ALERTS_SQL = """
INSERT INTO driftlock.usage_alerts (org_id, period_start, period_end, threshold, used_units, included_units, plan_name)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::int[], $5::bigint[], $6::bigint[],
                     $7::text[])
ON CONFLICT (org_id, period_start, threshold) DO NOTHING
RETURNING id, org_id::text AS org_id, period_start, period_end, threshold, used_units, included_units,
          plan_name AS plan, created_at
"""

BY_PRODUCT_SQL = """
SELECT product, sum(units)::bigint AS units FROM driftlock.usage_counters WHERE org_id = $1 AND period_start = $2
GROUP BY product
"""


@dataclass(frozen=True)
class FlushResult:
    applied: bool  # False: the database had this flush id already (a retry after a lost acknowledgement)
    totals: dict[UsageKey, int]
    # Units this flush took back, per product (refunds the database had not applied before).
    refunded: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What RESERVE_SQL answered: whether the units were counted, and the pooled total it saw (with them)."""

    reserved: bool
    total: int


@dataclass(frozen=True, slots=True)
class UsageAlert:
    """A usage alert: an organisation's usage reached `threshold` percent of its plan's included units in a
    period. Raised once per organisation, period and threshold; `id` and `created_at` are the database's, set
    once it is stored (None while the meter only proposes it), `webhook_attempts` once it is claimed for
    delivery (alerts.py)."""

    org_id: str
    period_start: datetime
    period_end: datetime
    threshold: int
    used_units: int
    included_units: int
    plan: str
    id: int | None = None
    created_at: datetime | None = None
    webhook_attempts: int = 0


@dataclass(frozen=True, slots=True)
class UsageTables:
    """Where a meter's usage is kept: live usage (billed, exported, alerted on), test keys' usage (never), or
    the usage of keys with a cap of their own (KEY_TABLES: per key, never billed)."""

    counters: str
    totals: str
    # Where refunds go, and the table whose row each counted id must name (dropped otherwise, as when an
    # organisation is deleted meanwhile).
    refunds: str = "driftlock.usage_refunds"
    owners: str = "driftlock.organizations"


LIVE_TABLES = UsageTables("driftlock.usage_counters", "driftlock.usage_totals")
TEST_TABLES = UsageTables("driftlock.test_usage_counters", "driftlock.test_usage_totals")
# In these tables `org_id` holds a key's id (migration 0013).
KEY_TABLES = UsageTables(
    "driftlock.key_usage_counters",
    "driftlock.key_usage_totals",
    refunds="driftlock.key_usage_refunds",
    owners="driftlock.api_keys",
)


def _for(tables: UsageTables, sql: str) -> str:
    # Table names are the constants above, never a value from outside; values stay parameters.
    return (
        sql.replace(LIVE_TABLES.counters, tables.counters)
        .replace(LIVE_TABLES.totals, tables.totals)
        .replace(LIVE_TABLES.refunds, tables.refunds)
        .replace(LIVE_TABLES.owners + " o WHERE", tables.owners + " o WHERE")
    )


class MeterStore:
    def __init__(
        self, pool: asyncpg.Pool, *, replica: str, tables: UsageTables = LIVE_TABLES, rollups: bool | None = None
    ):
        self._pool = pool
        # Usage history written by this store's statements: live usage only, unless told (the bench turns it off).
        self.rollups = tables == LIVE_TABLES if rollups is None else rollups
        self._replica = replica
        self.replica = replica
        self._flush_sql = _for(tables, FLUSH_SQL)
        self._reserve_sql = _for(tables, RESERVE_SQL)
        self._load_sql = _for(tables, LOAD_SQL)
        self._by_product_sql = _for(tables, BY_PRODUCT_SQL)

    async def flush(self, batch: Batch) -> FlushResult:
        counters = sorted(batch.counters.items())
        buckets = sorted(batch.rollup.items()) if self.rollups else []
        rows = await self._pool.fetch(
            self._flush_sql,
            batch.flush_id,
            self._replica,
            batch.units,
            [k[0] for k, _ in counters],
            [k[1] for k, _ in counters],
            [k[2] for k, _ in counters],
            [v for _, v in counters],
            [r.request_id for r in batch.reports],
            [r.org_id for r in batch.reports],
            [r.period_start for r in batch.reports],
            [r.product for r in batch.reports],
            [r.units for r in batch.reports],
            [f.request_id for f in batch.refunds],
            [f.org_id for f in batch.refunds],
            [f.period_start for f in batch.refunds],
            [f.product for f in batch.refunds],
            [f.units for f in batch.refunds],
            [f.reason for f in batch.refunds],
            [k[3].plan for k, _ in counters],
            [k[3].meter for k, _ in counters],
            [k[3].customer for k, _ in counters],
            [r.terms.plan for r in batch.reports],
            [r.terms.meter for r in batch.reports],
            [r.terms.customer for r in batch.reports],
            [f.terms.plan for f in batch.refunds],
            [f.terms.meter for f in batch.refunds],
            [f.terms.customer for f in batch.refunds],
            [b[0] for b, _ in buckets],
            [b[1] for b, _ in buckets],
            [datetime.fromtimestamp(b[2], UTC) for b, _ in buckets],
            [b[3] for b, _ in buckets],
            [b[4] for b, _ in buckets],
            *([c[i] for _, c in buckets] for i in range(ROLLUP_WIDTH)),
            [f.key_id for f in batch.refunds],
            [None if f.hour is None else datetime.fromtimestamp(f.hour, UTC) for f in batch.refunds],
            self.rollups,
        )
        applied = rows[0]["applied"] if rows else True
        refunded: dict[str, int] = {}
        for product, units in rows[0]["refunded"] if rows else ():
            refunded[product] = refunded.get(product, 0) + units
        return FlushResult(applied, {(row["org_id"], row["period_start"]): row["total"] for row in rows}, refunded)

    async def reserve(
        self,
        flush_id: uuid.UUID,
        key: UsageKey,
        product: str,
        units: int,
        unacknowledged: int,
        cap: int,
        terms: Terms = NO_TERMS,
        *,
        key_id: str | None = None,
        hour: int = 0,
    ) -> Reservation:
        """Count `units` for this organisation and period only if the pooled total stays within `cap` (with their
        usage-history bucket: key `key_id`, `hour` in Unix seconds)."""
        row = await self._pool.fetchrow(
            self._reserve_sql,
            flush_id,
            self._replica,
            key[0],
            key[1],
            product,
            units,
            unacknowledged,
            cap,
            terms.plan,
            terms.meter,
            terms.customer,
            key_id,
            datetime.fromtimestamp(hour, UTC),
            self.rollups,
        )
        if row is None:
            raise RuntimeError("the reservation statement returned no row")
        if row["reserved_total"] is not None:
            return Reservation(True, row["reserved_total"])
        return Reservation(False, row["seen_total"] or 0)

    async def load(self, key: UsageKey) -> int:
        return await self._pool.fetchval(self._load_sql, key[0], key[1])

    async def stored_by_product(self, org_id: str, period_start: datetime) -> dict[str, int]:
        """What the database holds for this organisation and period, per product (without unflushed units)."""
        rows = await self._pool.fetch(self._by_product_sql, uuid.UUID(org_id), period_start)
        return {row["product"]: row["units"] for row in rows}

    async def raise_alerts(self, candidates: list[UsageAlert]) -> list[UsageAlert]:
        """Insert the alerts not raised yet (by anyone); return the ones this call inserted."""
        rows = await self._pool.fetch(
            ALERTS_SQL,
            [c.org_id for c in candidates],
            [c.period_start for c in candidates],
            [c.period_end for c in candidates],
            [c.threshold for c in candidates],
            [c.used_units for c in candidates],
            [c.included_units for c in candidates],
            [c.plan for c in candidates],
        )
        return [db.from_row(UsageAlert, row) for row in rows]


# --- spilling: what a shutdown could not flush, kept on disk for the next start ---------------------------------


def spill(batches: list[Batch], directory: Path, path: Path | None = None) -> Path:
    """Write the batches to `path` (by default a new file in `directory`), atomically and durably: a reader
    sees the old file or the new one, never half of one, and the file is on disk when this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    path = path or directory / f"meter-{batches[0].flush_id}.json"
    document = [
        {
            "flush_id": str(batch.flush_id),
            # The terms go last: a file of an older authz has none ('' = not recorded, see migration 0010).
            "counters": [[k[0], k[1].isoformat(), k[2], v, *k[3]] for k, v in batch.counters.items()],
            "reports": [
                [r.request_id, r.org_id, r.period_start.isoformat(), r.product, r.units, *r.terms]
                for r in batch.reports
            ],
            "refunds": [
                [f.request_id, f.org_id, f.period_start.isoformat(), f.product, f.units, f.reason, *f.terms]
                for f in batch.refunds
            ],
            # Apart from "refunds", whose shape a previous version reads: its bucket, aligned with each refund.
            "refund_buckets": [[f.key_id, f.hour] for f in batch.refunds],
            "rollup": [[k[0], k[1].isoformat(), k[2], k[3], k[4], *v] for k, v in batch.rollup.items()],
        }
        for batch in batches
    ]
    temporary = path.with_suffix(".tmp")
    with temporary.open("w") as out:
        out.write(json.dumps(document))
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # the rename itself survives a crash of the machine
    finally:
        os.close(directory_fd)
    return path


def _terms(values: list) -> Terms:
    if not values:
        return NO_TERMS
    if len(values) != 3 or not all(isinstance(v, str) for v in values):
        raise ValueError("malformed terms")
    return Terms(*values)


def _batches(document: object) -> list[Batch]:
    if not isinstance(document, list):
        raise ValueError("not a list of batches")
    return [
        Batch(
            uuid.UUID(item["flush_id"]),
            {
                (o, datetime.fromisoformat(p), product, _terms(terms)): int(units)
                for o, p, product, units, *terms in item["counters"]
            },
            [
                Report(rid, o, datetime.fromisoformat(p), product, int(units), _terms(terms))
                for rid, o, p, product, units, *terms in item["reports"]
            ],
            [
                # Spill files written before refunds existed have none; before usage history, no buckets; before
                # billed terms, no terms.
                Refund(
                    rid,
                    o,
                    datetime.fromisoformat(p),
                    product,
                    int(units),
                    reason,
                    _terms(terms),
                    *_key_and_hour(bucket),
                )
                for (rid, o, p, product, units, reason, *terms), bucket in zip(
                    item.get("refunds", []),
                    _padded(item.get("refund_buckets", []), len(item.get("refunds", []))),
                    strict=True,
                )
            ],
            rollup={
                (o, datetime.fromisoformat(p), int(hour), product, key_id): [int(n) for n in counts]
                for o, p, hour, product, key_id, *counts in item.get("rollup", [])
                if len(counts) == ROLLUP_WIDTH
            },
        )
        for item in document
    ]


def _padded(buckets: list, length: int) -> list:
    return [*buckets[:length], *([[]] * (length - len(buckets[:length])))]


def _key_and_hour(bucket: list) -> tuple[str | None, int | None]:
    key_id, hour = [*bucket, None, None][:2]
    return (key_id if isinstance(key_id, str) else None, int(hour) if isinstance(hour, int) else None)


def read_spilled(directory: Path, *, on_corrupt: Callable[[Path, Exception], None]) -> list[tuple[Path, list[Batch]]]:
    """Every spill file's batches; a file that does not parse is handed to `on_corrupt` and skipped."""
    found = []
    for path in sorted(directory.glob("meter-*.json")) if directory.is_dir() else []:
        try:
            found.append((path, _batches(json.loads(path.read_text()))))
        except (OSError, ValueError, KeyError, TypeError) as error:
            on_corrupt(path, error)
    return found

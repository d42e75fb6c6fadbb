"""The SQL behind metering: one statement per flush, one per cold usage read, one per batch of alerts; and the
spill files that keep what a shutdown could not flush."""

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import asyncpg

from authz_service.usage.refunds import Refund
from authz_service.usage.usage_ledger import Batch, Report, UsageKey
from driftlock_kernel import db

# Applies a batch exactly once and reads back the pooled totals of every organisation and period it touched.
# - The flush id goes into meter_flushes first; if it is there already (a retry after a lost commit
#   acknowledgement), the counted units are not added again.
# - Backend reports and refunds are idempotent on their own: a request id already stored adds (or takes back)
#   nothing. A refund takes its units back from the counter of the period and product it was billed to.
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
    SELECT c.org_id, c.period_start, c.product, c.units
    FROM unnest($4::uuid[], $5::timestamptz[], $6::text[], $7::bigint[]) AS c(org_id, period_start, product, units)
    WHERE EXISTS (SELECT 1 FROM flush)
      AND EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = c.org_id)
),
reported AS (
    INSERT INTO driftlock.usage_reports (request_id, org_id, period_start, product, units)
    SELECT r.request_id, r.org_id, r.period_start, r.product, r.units
    FROM unnest($8::text[], $9::uuid[], $10::timestamptz[], $11::text[], $12::bigint[])
         AS r(request_id, org_id, period_start, product, units)
    WHERE EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = r.org_id)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING org_id, period_start, product, units
),
refunded AS (
    INSERT INTO driftlock.usage_refunds (request_id, org_id, period_start, product, units, reason)
    SELECT f.request_id, f.org_id, f.period_start, f.product, f.units, f.reason
    FROM unnest($13::text[], $14::uuid[], $15::timestamptz[], $16::text[], $17::bigint[], $18::text[])
         AS f(request_id, org_id, period_start, product, units, reason)
    WHERE EXISTS (SELECT 1 FROM driftlock.organizations o WHERE o.id = f.org_id)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING org_id, period_start, product, units
),
deltas AS (
    SELECT org_id, period_start, product, sum(units)::bigint AS units
    FROM (SELECT * FROM counted UNION ALL SELECT * FROM reported
          UNION ALL SELECT org_id, period_start, product, -units FROM refunded) AS d
    GROUP BY org_id, period_start, product
),
pooled AS (
    INSERT INTO driftlock.usage_totals AS p (org_id, period_start, units)
    SELECT org_id, period_start, sum(units)::bigint FROM deltas GROUP BY org_id, period_start
    ORDER BY org_id, period_start
    ON CONFLICT (org_id, period_start) DO UPDATE SET units = p.units + EXCLUDED.units, updated_at = now()
    RETURNING 1
),
upserted AS (
    INSERT INTO driftlock.usage_counters AS u (org_id, period_start, product, units)
    SELECT org_id, period_start, product, units FROM deltas
    -- The pooled totals first (an init plan runs `pooled` to its end before the first counter row), in the
    -- order RESERVE_SQL takes them: the two statements lock the same rows in the same order.
    WHERE (SELECT count(*) FROM pooled) >= 0
    ORDER BY org_id, period_start, product
    ON CONFLICT (org_id, period_start, product) DO UPDATE SET units = u.units + EXCLUDED.units, updated_at = now()
    RETURNING u.org_id, u.period_start, u.product, u.units
),
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
        WHERE w.org_id = c.org_id AND w.period_start = c.period_start AND w.product = c.product)
)
SELECT EXISTS (SELECT 1 FROM flush) AS applied, t.org_id::text AS org_id, t.period_start,
       coalesce(sum(x.units), 0)::bigint AS total,
       (SELECT coalesce(json_agg(json_build_array(r.product, r.units)), '[]'::json) FROM refunded r) AS refunded
FROM touched t LEFT JOIN totals x USING (org_id, period_start)
GROUP BY t.org_id, t.period_start
"""

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
    INSERT INTO driftlock.usage_counters AS u (org_id, period_start, product, units)
    SELECT $3::uuid, $4::timestamptz, $5::text, $6::bigint FROM flush
    ON CONFLICT (org_id, period_start, product) DO UPDATE SET units = u.units + EXCLUDED.units, updated_at = now()
    RETURNING 1
)
SELECT (SELECT units FROM pooled) AS reserved_total, (SELECT count(*) FROM counted) AS counted,
       (SELECT units FROM driftlock.usage_totals WHERE org_id = $3::uuid AND period_start = $4::timestamptz)
           AS seen_total
"""

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
SELECT product, units FROM driftlock.usage_counters WHERE org_id = $1 AND period_start = $2
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
class RaisedAlert:
    """A usage alert as stored: raised once per organisation, period and threshold."""

    id: int
    org_id: str
    period_start: datetime
    period_end: datetime
    threshold: int
    used_units: int
    included_units: int
    plan: str
    created_at: datetime


@dataclass(frozen=True)
class AlertCandidate:
    org_id: str
    period_start: datetime
    period_end: datetime
    threshold: int
    used_units: int
    included_units: int
    plan: str


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
    def __init__(self, pool: asyncpg.Pool, *, replica: str, tables: UsageTables = LIVE_TABLES):
        self._pool = pool
        self._replica = replica
        self.replica = replica
        self._flush_sql = _for(tables, FLUSH_SQL)
        self._reserve_sql = _for(tables, RESERVE_SQL)
        self._load_sql = _for(tables, LOAD_SQL)
        self._by_product_sql = _for(tables, BY_PRODUCT_SQL)

    async def flush(self, batch: Batch) -> FlushResult:
        counters = sorted(batch.counters.items())
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
        )
        applied = rows[0]["applied"] if rows else True
        refunded: dict[str, int] = {}
        for product, units in rows[0]["refunded"] if rows else ():
            refunded[product] = refunded.get(product, 0) + units
        return FlushResult(applied, {(row["org_id"], row["period_start"]): row["total"] for row in rows}, refunded)

    async def reserve(
        self, flush_id: uuid.UUID, key: UsageKey, product: str, units: int, unacknowledged: int, cap: int
    ) -> Reservation:
        """Count `units` for this organisation and period only if the pooled total stays within `cap`."""
        row = await self._pool.fetchrow(
            self._reserve_sql, flush_id, self._replica, key[0], key[1], product, units, unacknowledged, cap
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

    async def raise_alerts(self, candidates: list[AlertCandidate]) -> list[RaisedAlert]:
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
        return [db.from_row(RaisedAlert, row) for row in rows]


# --- spilling: what a shutdown could not flush, kept on disk for the next start ---------------------------------


def spill(batches: list[Batch], directory: Path, path: Path | None = None) -> Path:
    """Write the batches to `path` (by default a new file in `directory`), atomically and durably: a reader
    sees the old file or the new one, never half of one, and the file is on disk when this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    path = path or directory / f"meter-{batches[0].flush_id}.json"
    document = [
        {
            "flush_id": str(batch.flush_id),
            "counters": [[k[0], k[1].isoformat(), k[2], v] for k, v in batch.counters.items()],
            "reports": [
                [r.request_id, r.org_id, r.period_start.isoformat(), r.product, r.units] for r in batch.reports
            ],
            "refunds": [
                [f.request_id, f.org_id, f.period_start.isoformat(), f.product, f.units, f.reason]
                for f in batch.refunds
            ],
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


def _batches(document: object) -> list[Batch]:
    if not isinstance(document, list):
        raise ValueError("not a list of batches")
    return [
        Batch(
            uuid.UUID(item["flush_id"]),
            {(o, datetime.fromisoformat(p), product): int(units) for o, p, product, units in item["counters"]},
            [
                Report(rid, o, datetime.fromisoformat(p), product, int(units))
                for rid, o, p, product, units in item["reports"]
            ],
            [
                # Spill files written before refunds existed have none.
                Refund(rid, o, datetime.fromisoformat(p), product, int(units), reason)
                for rid, o, p, product, units, reason in item.get("refunds", [])
            ],
        )
        for item in document
    ]


def read_spilled(directory: Path, *, on_corrupt: Callable[[Path, Exception], None]) -> list[tuple[Path, list[Batch]]]:
    """Every spill file's batches; a file that does not parse is handed to `on_corrupt` and skipped."""
    found = []
    for path in sorted(directory.glob("meter-*.json")) if directory.is_dir() else []:
        try:
            found.append((path, _batches(json.loads(path.read_text()))))
        except (OSError, ValueError, KeyError, TypeError) as error:
            on_corrupt(path, error)
    return found

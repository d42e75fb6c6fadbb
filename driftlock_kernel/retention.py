"""Retention of the append-only tables: what each keeps, pruning in batches, and one replica at a time.

| table | kept for (default) | why it exists |
|---|---|---|
| meter_flushes | 30 days | a retried (or spilled and replayed) flush finds its id and adds nothing |
| usage_reports | 35 days | a backend report sent again finds its request id and adds nothing |
| audit_log | 90 days | who called what, denials of known keys and a sample of allows |
| audit_denials | 90 days | denials that name no known key, counted per minute, client address and code |
| stripe_events | 90 days (at least 3) | a delivery Stripe retries (up to three days) is found and not applied twice |
| usage_hours | 90 days | usage history in hour buckets (per organisation and product, and per key) |
| usage_days | 2 years | usage history in day buckets, for the long view |

Deduplication therefore holds for as long as a table keeps its rows; every retention is far longer than any
retry. `deferred` Stripe events wait for their organisation and are never pruned. Each batch is one DELETE of
at most `batch` rows (locked rows are skipped, never waited for), so no lock is held long and a transaction
pooler is fine. Each table is pruned by the service that writes it: a `Pruner` runs in every authz replica
(AUTHZ_TABLES) and in every webhook replica (WEBHOOK_TABLES); a conditional upsert of `maintenance_runs` (one
task per service) lets one replica of each claim each interval's run. `prune all` covers every table.
"""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from prometheus_client import Counter

from driftlock_kernel import db
from driftlock_kernel.background import BackgroundTask
from driftlock_kernel.errors import OperatorError, one_line
from driftlock_kernel.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_BATCH = 5000
TASK = "prune"  # authz's run (the row the migration created)
WEBHOOK_TASK = "prune-webhooks"


@dataclass(frozen=True)
class PrunedTable:
    name: str  # as the CLI and metrics name it
    table: str
    time_column: str
    key_column: str
    keep_condition: str | None = None  # rows matching it are never pruned
    minimum: timedelta = timedelta(days=1)
    row_column: str | None = None  # what tells one row from another, when key_column does not

    def delete_sql(self) -> str:
        keep = f" AND NOT ({self.keep_condition})" if self.keep_condition else ""
        row = self.row_column or self.key_column
        # Identifiers come from this module's constants, never from input; the values are parameters.
        return f"""
            WITH doomed AS (
                SELECT {row} FROM {self.table}
                WHERE {self.time_column} < now() - $1::interval{keep}
                LIMIT $2 FOR UPDATE SKIP LOCKED)
            DELETE FROM {self.table} t USING doomed WHERE t.{row} = doomed.{row}"""


TABLES: dict[str, PrunedTable] = {
    t.name: t
    for t in (
        PrunedTable("meter_flushes", "driftlock.meter_flushes", "flushed_at", "flush_id"),
        # A request id is unique per organisation only: the doomed rows are told apart by their physical address.
        PrunedTable("usage_reports", "driftlock.usage_reports", "reported_at", "request_id", row_column="ctid"),
        PrunedTable("audit_log", "driftlock.audit_log", "at", "id"),
        PrunedTable("audit_denials", "driftlock.audit_denials", "minute", "id"),
        PrunedTable(
            "stripe_events",
            "driftlock.stripe_events",
            "received_at",
            "id",
            keep_condition="outcome = 'deferred'",
            minimum=timedelta(days=3),
        ),
        # Usage history (migration 0011): each name prunes two tables, the organisation's buckets and the keys'.
        # Their keys are composite; a row's ctid names it within the one statement that selects and deletes it.
        PrunedTable("usage_hours", "driftlock.usage_hours", "hour", "ctid"),
        PrunedTable("usage_key_hours", "driftlock.usage_key_hours", "hour", "ctid"),
        PrunedTable("usage_days", "driftlock.usage_days", "day", "ctid"),
        PrunedTable("usage_key_days", "driftlock.usage_key_days", "day", "ctid"),
        # Events to the product: kept while a delivery is pending (retried for days), and at least as long as a
        # replayed Stripe event could write its event again (their dedupe keys live here).
        PrunedTable(
            "events",
            "driftlock.events",
            "occurred_at",
            "id",
            keep_condition="fanned_out_at IS NULL OR EXISTS (SELECT 1 FROM driftlock.event_deliveries d "
            "WHERE d.event_id = driftlock.events.id AND d.state = 'pending')",
            minimum=timedelta(days=7),
        ),
    )
}
# The retention setting each bucket table follows (the key tables keep what the organisation's tables keep).
USAGE_HISTORY_RETENTION = {
    "usage_hours": "usage_hours",
    "usage_key_hours": "usage_hours",
    "usage_days": "usage_days",
    "usage_key_days": "usage_days",
}


def usage_history_retentions(hours: timedelta | None, days: timedelta | None) -> dict[str, timedelta | None]:
    """The retention of each usage-history table, from the two settings (hour buckets, day buckets)."""
    by_setting = {"usage_hours": hours, "usage_days": days}
    return {table: by_setting[setting] for table, setting in USAGE_HISTORY_RETENTION.items()}


# Who prunes what: the service that writes the table.
AUTHZ_TABLES = ("meter_flushes", "usage_reports", "audit_log", "audit_denials", "events", *USAGE_HISTORY_RETENTION)
WEBHOOK_TABLES = ("stripe_events",)


def configured_retentions(settings: Settings) -> dict[str, timedelta | None]:
    """Every pruned table's configured retention (None: kept for ever)."""
    return {
        "meter_flushes": settings.retention_meter_flushes,
        "usage_reports": settings.retention_usage_reports,
        "audit_log": settings.retention_audit_log,
        "audit_denials": settings.retention_audit_denials,
        "stripe_events": settings.retention_stripe_events,
        "events": settings.retention_events,
        **usage_history_retentions(settings.retention_usage_hours, settings.retention_usage_days),
    }


# Exported by both services (each prunes its own tables; the `table` label says which), so that one alert rule
# covers every pruning run. Defined once here: two definitions in one process would collide.
PRUNED_ROWS = Counter(
    "driftlock_retention_pruned_rows_total",
    "Rows of append-only tables deleted past their retention by this replica, by table.",
    ["table"],
)
RUNS = Counter(
    "driftlock_retention_runs_total",
    "Pruning runs by outcome: pruned (this replica ran it), skipped (another replica had it), failed.",
    ["outcome"],
)
for _outcome in ("pruned", "skipped", "failed"):
    RUNS.labels(outcome=_outcome)


def count_pruned(table: str, rows: int) -> None:
    PRUNED_ROWS.labels(table=table).inc(rows)


def count_run(outcome: str) -> None:
    RUNS.labels(outcome=outcome).inc()


class RetentionError(OperatorError):
    pass


def check_retention(table: PrunedTable, older_than: timedelta) -> None:
    if older_than < table.minimum:
        raise RetentionError(
            f"{table.name} must be kept at least {table.minimum.days}d, not {older_than}: deduplication needs its rows"
        )


async def prune_table(
    conn: db.Connection, table: PrunedTable, older_than: timedelta, *, batch: int = DEFAULT_BATCH
) -> int:
    """Delete the table's rows older than `older_than`, a batch per statement; return how many."""
    check_retention(table, older_than)
    sql = table.delete_sql()
    total = 0
    while True:
        status = await conn.execute(sql, older_than, batch)
        deleted = int(status.split()[-1])
        total += deleted
        if deleted < batch:
            return total


async def claim_run(conn: db.Connection, replica: str, interval: timedelta, task: str = TASK) -> bool:
    """Whether this replica won this interval's run of `task` (no other replica started one within `interval`).
    The task's row is created by the first claim (one statement: a transaction pooler is fine)."""
    row = await conn.fetchrow(
        """INSERT INTO driftlock.maintenance_runs AS m (task, started_at, replica) VALUES ($1, now(), $2)
           ON CONFLICT (task) DO UPDATE SET started_at = now(), finished_at = NULL, replica = $2
           WHERE m.started_at < now() - $3::interval
           RETURNING task""",
        task,
        replica,
        interval,
    )
    return row is not None


async def finish_run(conn: db.Connection, deleted: dict[str, int], task: str = TASK) -> None:
    await conn.execute(
        "UPDATE driftlock.maintenance_runs SET finished_at = now(), detail = $2 WHERE task = $1",
        task,
        {"deleted": deleted},  # the connection's jsonb codec encodes it
    )


class Pruner:
    """Every `interval`, prunes each table past its retention, if this replica claims the run."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        retentions: dict[str, timedelta | None],
        *,
        interval: float,
        replica: str,
        task: str = TASK,
        batch: int = DEFAULT_BATCH,
        on_pruned: Callable[[str, int], None] = lambda table, rows: None,
        on_run: Callable[[str], None] = lambda outcome: None,
    ):
        unknown = set(retentions) - set(TABLES)
        if unknown:
            raise ValueError(f"no such pruned table: {', '.join(sorted(unknown))}")
        self._pool = pool
        self._retentions = {name: keep for name, keep in retentions.items() if keep is not None}
        self._interval = interval
        self._replica = replica
        self._run_task = task
        self._batch = batch
        self._on_pruned = on_pruned
        self._on_run = on_run
        self._task = BackgroundTask(f"retention ({task})", self._loop)

    def start(self) -> None:
        if self._interval > 0 and self._retentions:
            self._task.start()

    async def close(self) -> None:
        await self._task.stop()

    async def _loop(self) -> None:
        # Not at once: a fleet restarting together would all try in the same second.
        await asyncio.sleep(min(60.0, self._interval))
        while True:
            await self.run_once()
            await asyncio.sleep(self._interval)

    async def run_once(self) -> dict[str, int] | None:
        """One run: None when another replica had claimed it (or it failed), else rows deleted per table."""
        try:
            async with self._pool.acquire() as conn:
                if not await claim_run(conn, self._replica, timedelta(seconds=self._interval * 0.9), self._run_task):
                    self._on_run("skipped")
                    return None
                deleted = {}
                for name, keep in self._retentions.items():
                    deleted[name] = await prune_table(conn, TABLES[name], keep, batch=self._batch)
                    self._on_pruned(name, deleted[name])
                await finish_run(conn, deleted, self._run_task)
        except db.DATABASE_ERRORS as error:
            self._on_run("failed")
            log.warning("pruning old rows failed (next try in %.0fs): %s", self._interval, one_line(error))
            return None
        self._on_run("pruned")
        if any(deleted.values()):
            log.info("pruned rows past their retention: %s", ", ".join(f"{k}={v}" for k, v in deleted.items()))
        return deleted

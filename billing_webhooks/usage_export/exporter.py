"""The usage exporter: every interval, decide what Stripe lacks (one transaction) and send what is due.

`Exporter.run_once` is one pass, for the loop the webhook service runs and for `stripe export --once`. Any
number of replicas may run it at once: deciding is serialised by a transaction-scoped advisory lock, and a row
is sent by whoever claims it (a lease in the row, `FOR UPDATE SKIP LOCKED`), so no units are decided twice and a
row is only ever sent under its one identifier. What each answer means is exports.py's.

Shutdown (`stop`): no new claims; a call in flight is given the grace to finish and its answer recorded. A
process killed mid-call leaves its claim to expire (`lease`), and the next sender sends the same identifier:
Stripe answers with the saved response (same Idempotency-Key) or says it has the identifier, and the row is
marked sent either way.
"""

import asyncio
import dataclasses
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import stripe

from billing_webhooks import metrics
from billing_webhooks.stripe_client import StripeApi
from billing_webhooks.usage_export import export_store
from billing_webhooks.usage_export.export_store import ClaimedExport, PeriodRow
from billing_webhooks.usage_export.exports import (
    DEFAULT_RULES,
    RESEND_WINDOW,
    SUMMARY_SETTLE,
    AttemptResult,
    AttemptVerdict,
    ExportRules,
    ExportState,
    Marks,
    NewExport,
    PeriodUsage,
    Reconciled,
    classify,
    identifier,
    needs_reconciliation,
    plan_export,
    reconcile,
    resolve_period,
    retry_delay,
    settle_marks,
    summary_window,
    terms_in_force,
)
from driftlock_kernel import db
from driftlock_kernel.background import BackgroundTask
from driftlock_kernel.billing import DEFAULT_POLICY, BillingPolicy, effective_plan
from driftlock_kernel.errors import one_line
from driftlock_kernel.periods import Period

log = logging.getLogger(__name__)

CLAIM_BATCH = 50
# Calls in flight at once, each for a different customer (Stripe allows one concurrent call per customer and
# meter; its account-wide limit is 1000 calls per second in live mode, 25 in test mode).
CONCURRENCY = 4
# Retries after these answers: the attempt may have been recorded by Stripe all the same.
MAYBE_LANDED = frozenset({"no_answer", "server_error", "in_progress"})


@dataclass
class PassReport:
    """What one pass did: rows it created, and rows it finished, by id."""

    decided: list[int] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    lag_units: int = 0


def period_usage(
    row: PeriodRow, now: datetime, meters: dict[str, str | None], policy: BillingPolicy, settle: timedelta
) -> tuple[PeriodUsage, Marks | None] | None:
    """A period as the decisions see it, with its marks after this pass (None: it needs none, being closed);
    None when no period begins at the counters' start (logged)."""
    period = resolve_period(row.period_start, row.recorded_end, row.org_period_start, row.org_period_end)
    if period is None:
        log.warning("organisation %s: no known billing period starts at %s; not reported", row.org_id, row.period_start)
        return None
    marks: Marks | None = None
    settled = None
    if now < period.end:
        marks, settled = settle_marks(
            row.marks,
            row.stored_units,
            row.observed_at,
            row.observed_snapshot,
            settle,
            refunds_since_settled=row.refunds_since_settled,
            refunds_since_candidate=row.refunds_since_candidate,
        )
    in_force = terms_in_force(
        row.meter,
        row.customer,
        meter_now=meters.get(effective_plan(row.plan_name, row.billing_status, policy)),
        customer_now=row.stripe_customer_id,
    )
    usage = PeriodUsage(
        org_id=row.org_id,
        period=period,
        stored_units=row.stored_units,
        settled_units=settled,
        sent_units=row.sent_units,
        pending_units=row.pending_units,
        skipped_units=row.skipped_units,
        next_seq=row.next_seq,
        last_failed_at=row.last_finished_at if row.last_state == ExportState.FAILED else None,
        meter=row.meter,
        customer=row.customer,
        in_force=in_force,
        last_counted_at=row.last_counted_at,
    )
    return usage, marks


def numbered(planned: list[NewExport]) -> list[NewExport]:
    """Identifiers are one sequence per period: rows of two meters (or customers) of one period decided in the same
    pass take consecutive numbers, not the same one."""
    taken: dict[tuple[uuid.UUID, datetime], int] = {}
    out = []
    for export in planned:
        key = (export.org_id, export.period.start)
        seq = taken.get(key, export.seq - 1) + 1
        taken[key] = seq
        if seq != export.seq:
            export = dataclasses.replace(export, seq=seq, identifier=identifier(export.org_id, export.period, seq))
        out.append(export)
    return out


class Exporter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        api: StripeApi,
        *,
        policy: BillingPolicy = DEFAULT_POLICY,
        rules: ExportRules = DEFAULT_RULES,
        interval: float = 60.0,
        lease: timedelta = timedelta(seconds=65),
        runner: str = "exporter",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self._pool = pool
        self._api = api
        self._policy = policy
        self._rules = rules
        self._interval = interval
        self._lease = lease
        self._runner = runner
        self._clock = clock
        self._task = BackgroundTask("stripe-export", self._loop)
        self._last_failure_log = 0.0
        self._sent_units = 0

    # --- one pass ---------------------------------------------------------------------------------------------

    async def run_once(self, *, retry_failed_now: bool = False) -> PassReport:
        report = PassReport()
        report.decided, lag = await self.decide(retry_failed_now=retry_failed_now)
        self._sent_units = 0
        report.finished = await self.send_due()
        # What this pass sent is no longer lagging (the next decision pass counts afresh).
        report.lag_units = max(0, lag - self._sent_units)
        metrics.EXPORT_LAG.set(report.lag_units)
        return report

    async def decide(self, *, retry_failed_now: bool = False) -> tuple[list[int], int]:
        """Insert the rows Stripe needs now; returns their ids and the lag (units Stripe does not have yet)."""
        rules = dataclasses.replace(self._rules, failed_retry_after=timedelta(0)) if retry_failed_now else self._rules
        async with self._pool.acquire() as conn, conn.transaction():
            await export_store.lock_decisions(conn)
            now = self._clock()
            rows = await export_store.period_rows(conn)
            meters = await export_store.plan_meters(conn)
            found = [(r, period_usage(r, now, meters, self._policy, rules.settle)) for r in rows]
            usages = [seen[0] for _, seen in found if seen is not None]
            marks = [
                (row.org_id, row.period_start, row.meter, row.customer, seen[1])
                for row, seen in found
                if seen is not None and seen[1] is not None
            ]
            planned = numbered([e for e in (plan_export(u, now, rules) for u in usages) if e is not None])
            ids = await export_store.insert_exports(conn, planned)
            await export_store.save_marks(conn, marks)
        lag = sum(u.lag for u in usages if u.meter is not None and u.customer is not None)
        metrics.EXPORT_LAG.set(lag)
        for export in planned:
            if export.state is ExportState.SKIPPED:
                metrics.EXPORT_UNITS.labels(outcome="skipped").inc(export.units)
                log.warning("organisation %s: %d units %s", export.org_id, export.units, export.error)
        return ids, lag

    async def send_due(self) -> list[int]:
        """Send every due row, in batches, until none is due, a rate limit says stop, or the exporter stops."""
        finished: list[int] = []
        while not self._task.stopping.is_set():
            token = uuid.uuid4()
            claimed = await export_store.claim_due(
                self._pool, runner=self._runner, lease=self._lease, limit=CLAIM_BATCH, token=token
            )
            if not claimed:
                break
            halted = await self._send_claimed(claimed, finished)
            if halted:
                break
        return finished

    async def _send_claimed(self, claimed: list[ClaimedExport], finished: list[int]) -> bool:
        """Send a batch of claimed rows, one customer's rows one after another; returns whether sending halted."""
        halt = asyncio.Event()
        semaphore = asyncio.Semaphore(CONCURRENCY)
        by_customer: dict[tuple[str, str], list[ClaimedExport]] = defaultdict(list)
        for row in claimed:
            by_customer[(row.stripe_customer_id, row.event_name)].append(row)

        async def customer(rows: list[ClaimedExport]) -> None:
            async with semaphore:
                for row in rows:
                    if halt.is_set() or self._task.stopping.is_set():
                        await export_store.mark_retry(
                            self._pool, row.id, row.claim_token, None, timedelta(0), attempted=False
                        )
                        continue
                    verdict = await self._attempt(row)
                    if verdict.result is not AttemptResult.RETRY:
                        finished.append(row.id)
                    if verdict.stop_sending:
                        halt.set()

        await asyncio.gather(*(customer(rows) for rows in by_customer.values()))
        return halt.is_set()

    async def _attempt(self, row: ClaimedExport) -> AttemptVerdict:
        now = self._clock()
        if row.refused_error is not None or needs_reconciliation(row.first_attempt_at, now):
            return await self._reconcile(row, now)
        window_start = int((row.first_attempt_at or now).timestamp())
        answer = await self._api.create_meter_event(
            event_name=row.event_name,
            customer=row.stripe_customer_id,
            value=row.units,
            timestamp=row.event_timestamp,
            identifier=row.identifier,
            # Stripe keeps a key's answer for 24 hours, as it keeps the identifier; a row sent again after a
            # reconciliation gets a fresh key with its fresh window.
            idempotency_key=f"{row.identifier}-{window_start}",
        )
        verdict = classify(answer, row.attempts, random.random())
        metrics.EXPORT_ATTEMPTS.labels(result=verdict.reason).inc()
        if verdict.result in (AttemptResult.ACCEPTED, AttemptResult.DUPLICATE):
            note = (
                "Stripe had this identifier already (an earlier reply was lost)"
                if verdict.reason == "duplicate"
                else None
            )
            await self._finish(row, ExportState.SENT, note, answer.request_id, token=None)
        elif verdict.result is AttemptResult.REJECTED and row.maybe_landed:
            # An earlier attempt may be at Stripe already: failing the row now would offer its units again in a
            # new row (billed twice). Stripe's total decides, once its aggregates include that attempt.
            await export_store.mark_retry(
                self._pool,
                row.id,
                row.claim_token,
                f"{verdict.error} (an earlier attempt may have reached Stripe: reconciling)",
                SUMMARY_SETTLE,
                refused_error=verdict.error or "refused",
            )
            log.warning(
                "Stripe refused %s after an attempt that may have reached it; reconciling with its total",
                row.identifier,
            )
        elif verdict.result is AttemptResult.REJECTED:
            await self._finish(row, ExportState.FAILED, verdict.error, answer.request_id, token=row.claim_token)
            log.warning(
                "Stripe refused %d units of organisation %s (%s): %s",
                row.units,
                row.org_id,
                row.identifier,
                verdict.error,
            )
        else:
            await export_store.mark_retry(
                self._pool,
                row.id,
                row.claim_token,
                verdict.error,
                verdict.retry_in or timedelta(seconds=1),
                maybe_landed=verdict.reason in MAYBE_LANDED,
            )
            self._log_retry(row, verdict)
        return verdict

    async def _reconcile(self, row: ClaimedExport, now: datetime) -> AttemptVerdict:
        """A row whose identifier Stripe may have forgotten, or that Stripe refused after an attempt that may
        have landed: ask Stripe's total instead of sending blindly (or failing, which offers the units again)."""
        period = Period(row.period_start, row.period_end)
        window = summary_window(period)
        sent_units, latest = await export_store.sent_in_period(
            self._pool, row.org_id, row.period_start, row.event_name, row.stripe_customer_id
        )
        if window is not None and latest is not None and now - latest < SUMMARY_SETTLE:
            # Stripe's aggregates lag its events: wait until the period's last sent row is in them.
            await export_store.mark_retry(self._pool, row.id, row.claim_token, None, SUMMARY_SETTLE, attempted=False)
            return AttemptVerdict(AttemptResult.RETRY, "settling")
        total: int | None = None
        if window is not None:
            try:
                total = await self._api.meter_total(row.event_name, row.stripe_customer_id, *window)
            except (stripe.StripeError, TimeoutError) as error:
                delay = retry_delay(row.attempts)
                await export_store.mark_retry(
                    self._pool, row.id, row.claim_token, f"reconciling: {one_line(error)}", delay, attempted=False
                )
                return AttemptVerdict(AttemptResult.RETRY, "no_answer", retry_in=delay)
        outcome = Reconciled.AMBIGUOUS if total is None else reconcile(row.units, total, sent_units)
        metrics.EXPORT_ATTEMPTS.labels(result=outcome.value).inc()
        if outcome is Reconciled.CONFIRMED:
            await self._finish(row, ExportState.SENT, "confirmed by Stripe's meter total", None, token=None)
            return AttemptVerdict(AttemptResult.DUPLICATE, "confirmed")
        if outcome is Reconciled.ABSENT and row.refused_error is not None:
            # Nothing landed: the refusal stands, and the units may go in a later row.
            await self._finish(row, ExportState.FAILED, row.refused_error, None, token=row.claim_token)
            return AttemptVerdict(AttemptResult.REJECTED, "rejected", row.refused_error)
        if outcome is Reconciled.ABSENT:
            await export_store.mark_retry(
                self._pool, row.id, row.claim_token, None, timedelta(0), attempted=False, restart_window=True
            )
            return AttemptVerdict(AttemptResult.RETRY, "absent")
        why = (
            f"Stripe refused a retry ({row.refused_error}) after an attempt that may have reached it"
            if row.refused_error is not None
            else f"an attempt may have reached Stripe more than {RESEND_WINDOW} ago"
        )
        detail = f"not sent again: {why} and Stripe's " + (
            f"total for the period ({total}) is neither the {sent_units} units marked sent nor that plus "
            f"these {row.units}; compare with the customer's usage in the Dashboard"
            if total is not None
            else "total for the period could not be read (no active meter of that name, or a period too short)"
        )
        await self._finish(row, ExportState.SKIPPED, detail, None, token=row.claim_token)
        log.error("organisation %s: %d units %s", row.org_id, row.units, detail)
        return AttemptVerdict(AttemptResult.REJECTED, "ambiguous", detail)

    async def _finish(
        self,
        row: ClaimedExport,
        state: ExportState,
        error: str | None,
        request_id: str | None,
        *,
        token: uuid.UUID | None,
    ) -> None:
        if await export_store.mark_finished(self._pool, row.id, state, token=token, error=error, request_id=request_id):
            metrics.EXPORT_UNITS.labels(outcome=state.value).inc(row.units)
            if state is ExportState.SENT:
                self._sent_units += row.units

    def _log_retry(self, row: ClaimedExport, verdict: AttemptVerdict) -> None:
        now = time.monotonic()
        if now - self._last_failure_log > 10:
            self._last_failure_log = now
            log.warning(
                "meter event %s (%d units) not confirmed, retrying in %.0fs: %s",
                row.identifier,
                row.units,
                (verdict.retry_in or timedelta(0)).total_seconds(),
                verdict.error or verdict.reason,
            )

    # --- the loop ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task.start()

    async def _loop(self) -> None:
        while not self._task.stopping.is_set():
            try:
                await self.run_once()
            except db.DATABASE_ERRORS as error:
                log.warning("usage export pass failed (next in %.0fs): %s", self._interval, one_line(error))
            except Exception:
                log.exception("usage export pass failed (next in %.0fs)", self._interval)
            await self._task.pause(self._interval)

    async def stop(self, timeout: float = 10.0) -> None:
        """Take no new rows; let calls in flight finish and be recorded, for up to `timeout` seconds."""
        if not await self._task.drain(timeout):
            log.warning("usage export still sending after %.0fs; its claims expire and are sent again", timeout)

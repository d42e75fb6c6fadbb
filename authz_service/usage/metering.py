"""Metering: count billable units in memory, flush them in batches, exactly once; raise usage alerts.

- `record()` is synchronous and costs a few dict operations; the flush loop writes everything counted since the
  last flush in one statement, at most every `flush_interval` seconds.
- A flush that fails keeps its batch and flush id: the next attempt sends the same batch, and the database
  applies it only if it has not seen the id. A database outage therefore only delays counts.
- Spill first: at SIGTERM (`spill_now`, before the drain), at `close`, and every `flush_interval` while flushes
  fail, everything not acknowledged is written to this process's spill file (atomically, fsync'd) with the
  flush ids it will be sent with; flushing goes on from memory, and the file is rewritten as batches are
  acknowledged and removed once all are. The next start flushes any file left behind, and a flush id the
  database has seen counts nothing, so a file replayed twice (or after its batches were applied) counts once.
- What a SIGKILL can lose: the units counted in the last `flush_interval` (not yet flushed while the database
  is up, not yet spilled while it is down). A SIGTERM followed by a SIGKILL at any time after the gRPC server
  stopped loses nothing.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path

from authz_service import metrics
from authz_service.usage.alerts import AlertNotifier, thresholds_reached
from authz_service.usage.meter_store import MeterStore, UsageAlert, read_spilled, spill
from authz_service.usage.refunds import NO_TERMS, Refund, Terms, refunds_may_lift
from authz_service.usage.rollups import NIL_KEY, RollupBook, hour_of
from authz_service.usage.usage_ledger import Batch, Report, UsageKey, UsageLedger
from driftlock_kernel import db
from driftlock_kernel.background import every
from driftlock_kernel.billing import PlanLimits
from driftlock_kernel.caches import SingleFlight
from driftlock_kernel.errors import one_line
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)


# A refund is flushed this soon after it arrives (the rest of a burst joins it), not at the next interval.
EARLY_FLUSH_SECONDS = 0.05


class Reserved(Enum):
    """What a reservation near a cap came to."""

    COUNTED = "counted"  # within the cap, and counted in the database
    REFUSED = "refused"  # it would pass the cap: not counted
    UNKNOWN = "unknown"  # no answer (database down, or the answer lost): counted here, flushed exactly once


class FlushOutcome(Enum):
    IDLE = "idle"  # nothing to write
    FLUSHED = "flushed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _AlertContext:
    plan: str
    included_units: int
    period_end: datetime


class Meter:
    def __init__(
        self,
        ledger: UsageLedger,
        store: MeterStore,
        *,
        flush_interval: float = 1.0,
        flush_timeout: float = 10.0,
        load_timeout: float = 0.5,
        org_labels: bool = True,
        notifier: AlertNotifier | None = None,
        spill_dir: Path | None = None,
        live: bool = True,
        refund_window: float = 0.0,
    ):
        self.ledger = ledger
        # False: test keys' usage, which raises no alerts and stays out of the live usage metrics.
        self.live = live
        self.store = store
        self._store = store
        self._flush_timeout = flush_timeout
        self._load_timeout = load_timeout
        self._org_labels = org_labels
        self._notifier = notifier
        self._spill_dir = spill_dir
        self._loads: SingleFlight[UsageKey, None] = SingleFlight()
        self._context: dict[UsageKey, _AlertContext] = {}
        self._raised: set[tuple[UsageKey, int]] = set()
        # Totals that reservations left, for the alert check of the next flush cycle (off the request path).
        self._alerts_due: dict[UsageKey, int] = {}
        self._spilled_files: dict[Path, set[uuid.UUID]] = {}
        # How long after a count its call's refund may still come (edge_timeouts.refund_window). Alerts wait
        # that long for the usage that crossed a threshold to stay crossed, net of refunds; a refusal at a cap
        # within it says so with a short Retry-After.
        self._refund_window = refund_window
        self._crossed: dict[tuple[UsageKey, int], float] = {}  # threshold reached, monotonic time first seen
        self._last_counted: dict[UsageKey, float] = {}  # monotonic time the key's total last grew
        self._seen_total: dict[UsageKey, int] = {}
        self._early_flush: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # This process's own spill file, once written; rewritten as batches are acknowledged.
        self._spill_path = spill_dir / f"meter-{uuid.uuid4()}.json" if spill_dir is not None else None
        self._spill_written = False
        self._failing = False  # the last flush failed: keep the spill file up to date
        self._flush_interval = flush_interval
        self._in_flight_since: float | None = None  # monotonic start of the flush on its way, if any
        self._flusher = every(flush_interval, self.flush_cycle, name="meter-flush")
        self._spiller = every(flush_interval, self._spill_step, name="meter-spill")
        self._flush_lock = asyncio.Lock()
        self._last_failure_log = 0.0
        self._load_failures = RepeatedLog(log)
        if live:
            # Read at scrape time rather than kept up to date on every check.
            metrics.METER_PENDING_UNITS.set_function(lambda: self.ledger.pending_units)

    # --- the request path -------------------------------------------------------------------------------------

    async def used(self, key: UsageKey) -> int:
        """Pooled units of this organisation and period so far; asks the database only for a key never seen
        (and refreshes a stale one in the background)."""
        used = self.ledger.used(key)
        if used is None:
            await asyncio.shield(self._load(key))
            return self.ledger.used(key) or 0
        if self.ledger.is_stale(key):
            self._load(key)
        return used

    def used_now(self, key: UsageKey) -> int:
        """What `used` last knew, without waiting for the database."""
        return self.ledger.used(key) or 0

    def refresh_soon(self, key: UsageKey) -> None:
        """Read the key's stored usage again in the background (as `used` does for a stale one)."""
        self._load(key)

    def counted_already(self, request_id: str) -> bool:
        """Whether this request id was counted within the deduplication window (an Envoy retry of a check)."""
        return self.ledger.seen(request_id)

    def record(
        self,
        request_id: str,
        key: UsageKey,
        product: str,
        units: int,
        plan: PlanLimits,
        period_end: datetime,
        terms: Terms = NO_TERMS,
        *,
        key_id: str = NIL_KEY,
        at: float = 0.0,
    ) -> bool:
        """Count a served call under `terms` (`key_id` made it at Unix time `at`: its usage-history bucket)."""
        counted = self.ledger.record(request_id, key, product, units, terms)
        if counted:
            self._last_counted[key] = time.monotonic()
            if self._store.rollups:
                self.ledger.rollups.served(key[0], key[1], at, product, key_id, units)
            self._context[key] = _AlertContext(plan.name, plan.included_units, period_end)
        else:
            metrics.METER_DUPLICATE_REQUESTS.inc()
        return counted

    async def reserve(
        self,
        request_id: str,
        key: UsageKey,
        product: str,
        units: int,
        plan: PlanLimits,
        period_end: datetime,
        cap: int,
        timeout: float,
        terms: Terms = NO_TERMS,
        *,
        key_id: str = NIL_KEY,
        at: float = 0.0,
    ) -> Reserved:
        """Near a cap: count the call only if the pooled total in the database stays within `cap`, in one
        atomic statement that every replica goes through (so together they never pass it)."""
        batch = Batch(uuid.uuid4(), {(key[0], key[1], product, terms): units})
        if self._store.rollups:
            # Flushed with the batch if the reservation's answer is lost; written by the reservation otherwise.
            book = RollupBook()
            book.served(key[0], key[1], at, product, key_id, units)
            batch.rollup = book.take()
        epoch = self.ledger.epoch(key)
        try:
            metrics.DB_QUERIES.labels(query="quota_reserve").inc()
            result = await asyncio.wait_for(
                self._store.reserve(
                    batch.flush_id,
                    key,
                    product,
                    units,
                    self.ledger.unflushed(key),
                    cap,
                    terms,
                    key_id=key_id,
                    hour=hour_of(at),
                ),
                timeout,
            )
        except db.DATABASE_ERRORS as error:
            # Served as the in-memory path would serve it; the batch keeps its flush id, so whether or not the
            # statement was applied, the unit is stored once.
            self.ledger.add_sent(request_id, batch)
            self._last_counted[key] = time.monotonic()
            self._context[key] = _AlertContext(plan.name, plan.included_units, period_end)
            log.warning("quota reservation without an answer (%s); counted here instead", one_line(error))
            return Reserved.UNKNOWN
        if not result.reserved:
            self.ledger.learn(key, result.total, epoch)
            self._note_total(key, result.total)
            return Reserved.REFUSED
        self.ledger.counted_in_database(request_id, key, units, result.total)
        self._last_counted[key] = time.monotonic()
        self._context[key] = _AlertContext(plan.name, plan.included_units, period_end)
        self._alerts_due[key] = result.total
        if self.live:
            metrics.USAGE_UNITS.labels(org_id=self._org_label(key[0]), product=product).inc(units)
        return Reserved.COUNTED

    def count(self, key: UsageKey, product: str, units: int) -> None:
        """Count units the caller has deduplicated already (a key's, counted beside its organisation's), with
        no request id kept: it raises no alert."""
        self.ledger.add(key, product, units)

    def report(self, report: Report, plan: PlanLimits, period_end: datetime) -> bool:
        counted = self.ledger.report(report)
        if counted:
            self._context[(report.org_id, report.period_start)] = _AlertContext(
                plan.name, plan.included_units, period_end
            )
        return counted

    def denied(self, key: UsageKey, at: float, product: str, key_id: str, code: str) -> None:
        """A check of a known key refused: counted in the usage history (flushed with the next batch)."""
        if self._store.rollups:
            self.ledger.rollups.denied(key[0], key[1], at, product, key_id, code)

    def refund(self, refund: Refund) -> bool:
        """Take back the units of a billed call the backend failed (once per request id). Flushed within
        EARLY_FLUSH_SECONDS rather than at the next interval: the database then tells every replica
        (`refunded_elsewhere`), and a unit a refusal at a cap is waiting for is free again at once."""
        taken = self.ledger.refund(refund)
        if taken:
            self._flush_soon()
        return taken

    def refunds_may_lift(self, key: UsageKey) -> bool:
        """Whether a refusal at this key's cap may be lifted by refunds of calls still under way."""
        return refunds_may_lift(self._last_counted.get(key), time.monotonic(), self._refund_window)

    def refunded_elsewhere(self, message: dict) -> None:
        """A NOTIFY from the database: refunds of this organisation and period were stored (by any replica).
        The total is read again now, not when it would go stale: the freed units count at once everywhere."""
        org_id, period = message.get("org_id"), message.get("period_start")
        if not isinstance(org_id, str) or not isinstance(period, str):
            return
        try:
            key = (org_id, datetime.fromisoformat(period))
        except ValueError:
            return
        if self.ledger.used(key) is None:
            return  # never asked for here: the first check reads it
        # Not joined with a read under way, which may have started before the refund was committed.
        task = asyncio.get_running_loop().create_task(self._load_now(key))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _flush_soon(self) -> None:
        if self._early_flush is not None and not self._early_flush.done():
            return  # the one under way takes this refund too
        try:
            self._early_flush = asyncio.get_running_loop().create_task(self._flush_early())
        except RuntimeError:
            return  # no loop (a synchronous caller): the next interval flushes it

    async def _flush_early(self) -> None:
        await asyncio.sleep(EARLY_FLUSH_SECONDS)  # the rest of a burst of refunds goes in the same statement
        try:
            await self.flush_once()
        except Exception:
            log.exception("early flush of refunds failed (the next interval retries it)")

    def _load(self, key: UsageKey) -> asyncio.Future[None]:
        """The read of this key's stored usage under way, started if there is none: one query per key at a time."""
        pending, _joined = self._loads.join_or_start(key, lambda: self._load_now(key))
        return pending

    async def _load_now(self, key: UsageKey) -> None:
        epoch = self.ledger.epoch(key)
        try:
            metrics.DB_QUERIES.labels(query="usage_load").inc()
            total = await asyncio.wait_for(self._store.load(key), self._load_timeout)
            self.ledger.learn(key, total, epoch)
            self._note_total(key, total)
        except db.DATABASE_ERRORS as error:
            # Serve on what this replica counted itself; the next check past the staleness window asks again.
            # During an outage this is every billable check: one line, then a count a minute.
            self._load_failures.warning(type(error).__name__, "could not read usage of %s: %s", key[0], one_line(error))
            self.ledger.assume(key, 0)

    # --- flushing -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._flusher.start()
        self._spiller.start()

    async def flush_cycle(self) -> int:
        """One interval's flushing; returns the statements sent. One flush takes everything counted so far;
        only batches queued before it (restored from a spill file) are flushed at once after it, never what
        arrived during the flush, which would turn a busy meter into one statement per few requests."""
        statements = 0
        if self._alerts_due:
            due, self._alerts_due = self._alerts_due, {}
            await self._raise_alerts(due)
        if self._crossed:
            # Thresholds held for their refunds: judged again on the latest total (refunds taken off).
            held = {key for key, _threshold in self._crossed}
            await self._raise_alerts({key: self.ledger.used(key) or 0 for key in held})
        while True:
            outcome = await self.flush_once()
            statements += outcome is not FlushOutcome.IDLE
            if outcome is not FlushOutcome.FLUSHED or not self.ledger.has_unacknowledged:
                return statements

    async def flush_once(self) -> FlushOutcome:
        async with self._flush_lock:
            batch = self.ledger.next_batch()
            if batch is None:
                return FlushOutcome.IDLE
            started = time.perf_counter()
            batch.attempted = True
            self._in_flight_since = time.monotonic()
            try:
                metrics.DB_QUERIES.labels(query="meter_flush").inc()
                result = await asyncio.wait_for(self._store.flush(batch), self._flush_timeout)
            except db.DATABASE_ERRORS as error:
                self._in_flight_since = None
                self._failing = True
                metrics.METER_FLUSHES.labels(outcome="failed").inc()
                now = time.monotonic()
                if now - self._last_failure_log > 10:
                    self._last_failure_log = now
                    log.warning("flush of %d units failed (kept, will retry): %s", batch.units, one_line(error))
                return FlushOutcome.FAILED
            self._failing, self._in_flight_since = False, None
            metrics.METER_FLUSH_DURATION.observe(time.perf_counter() - started)
            metrics.METER_FLUSHES.labels(outcome="applied" if result.applied else "duplicate").inc()
            self.ledger.acknowledged(batch, result.totals)
            for key, total in result.totals.items():
                self._note_total(key, total)
            if result.applied and self.live:
                for (org_id, _period, product, _terms), units in batch.counters.items():
                    metrics.USAGE_UNITS.labels(org_id=self._org_label(org_id), product=product).inc(units)
                for report in batch.reports:
                    metrics.USAGE_UNITS.labels(org_id=self._org_label(report.org_id), product=report.product).inc(
                        report.units
                    )
            # Refunds are applied by their own request ids, also in a batch whose counts were applied before.
            for product, units in result.refunded.items() if self.live else ():
                metrics.USAGE_REFUNDED_UNITS.labels(product=product).inc(units)
            self._forget_spilled(batch.flush_id)
            self._rewrite_own_spill()
        await self._raise_alerts(result.totals)
        return FlushOutcome.FLUSHED

    def _org_label(self, org_id: str) -> str:
        return org_id if self._org_labels else ""

    def _note_total(self, key: UsageKey, total: int) -> None:
        """A stored total read back: when it grew, something was counted (by any replica) that may be refunded."""
        previous = self._seen_total.get(key)
        if previous is not None and total > previous:
            self._last_counted[key] = time.monotonic()
        self._seen_total[key] = total

    async def _raise_alerts(self, totals: dict[UsageKey, int]) -> None:
        if not self.live:
            return
        candidates = []
        for key, total in totals.items():
            context = self._context.get(key)
            if context is None:
                continue
            if context.included_units > 0:
                metrics.USAGE_QUOTA_RATIO.labels(org_id=self._org_label(key[0])).set(total / context.included_units)
            reached = thresholds_reached(total, context.included_units)
            for held in [k for k in self._crossed if k[0] == key and k[1] not in reached]:
                del self._crossed[held]  # refunds brought the usage back under it
            for threshold in reached:
                if (key, threshold) in self._raised:
                    continue
                if self._refund_window > 0:
                    # Usage net of refunds: a threshold counts once it has stayed reached for as long as a
                    # refund of the calls that reached it may take.
                    first = self._crossed.setdefault((key, threshold), time.monotonic())
                    if time.monotonic() - first < self._refund_window:
                        continue
                if (key, threshold) not in self._raised:
                    candidates.append(
                        UsageAlert(
                            key[0], key[1], context.period_end, threshold, total, context.included_units, context.plan
                        )
                    )
        if not candidates:
            return
        try:
            metrics.DB_QUERIES.labels(query="alerts_insert").inc()
            inserted = await self._store.raise_alerts(candidates)
        except db.DATABASE_ERRORS as error:
            log.warning(
                "could not raise %d usage alerts (will retry at the next flush): %s", len(candidates), one_line(error)
            )
            return
        self._raised.update(((c.org_id, c.period_start), c.threshold) for c in candidates)
        for c in candidates:
            self._crossed.pop(((c.org_id, c.period_start), c.threshold), None)
        for alert in inserted:
            metrics.USAGE_ALERTS.labels(threshold=str(alert.threshold)).inc()
            log.info("usage alert: organisation %s reached %d%%", alert.org_id, alert.threshold)
        if inserted and self._notifier is not None:
            self._notifier.wake()  # delivered from the stored row, by whichever replica claims it

    # --- start-up and shutdown ------------------------------------------------------------------------------

    def restore_spilled(self) -> int:
        """Queue what a previous process spilled; returns the units restored."""
        if self._spill_dir is None:
            return 0
        units = 0
        for path, batches in read_spilled(self._spill_dir, on_corrupt=_set_aside):
            self.ledger.restore(batches)
            self._spilled_files[path] = {b.flush_id for b in batches}
            units += sum(b.units for b in batches)
        if units:
            log.info("restored %d units spilled by a previous shutdown", units)
        return units

    def _forget_spilled(self, flush_id: uuid.UUID) -> None:
        for path, ids in list(self._spilled_files.items()):
            ids.discard(flush_id)
            if not ids:
                path.unlink(missing_ok=True)
                del self._spilled_files[path]

    # --- spilling ---------------------------------------------------------------------------------------------

    def spill_now(self) -> int:
        """Write everything not acknowledged to this process's spill file now; returns the units on disk.

        Synchronous on purpose: no check is counted between sealing the pending units into a batch and writing
        it, so the file holds exactly what memory will flush, under the same flush ids."""
        if self._spill_path is None:
            return 0
        self.ledger.seal()
        batches = self.ledger.unacknowledged()
        if not batches:
            self._remove_own_spill()
            return 0
        try:
            spill(batches, self._spill_path.parent, self._spill_path)
        except OSError as error:
            log.error("could not write the spill file %s: %s", self._spill_path, one_line(error))
            return 0
        self._spill_written = True
        # The restored files' batches are in this file now.
        for path in self._spilled_files:
            path.unlink(missing_ok=True)
        self._spilled_files.clear()
        return sum(b.units for b in batches)

    async def _spill_step(self) -> None:
        # Independent of the flush loop, whose attempt may hang for flush_timeout in an outage.
        started = self._in_flight_since
        hanging = started is not None and time.monotonic() - started > self._flush_interval
        if (self._failing or hanging) and self.ledger.has_work:
            self.spill_now()

    def _rewrite_own_spill(self) -> None:
        """After an acknowledgement: the file keeps only what is still unacknowledged (gone when nothing is)."""
        if not self._spill_written or self._spill_path is None:
            return
        batches = self.ledger.unacknowledged()
        if not batches:
            self._remove_own_spill()
            return
        try:
            spill(batches, self._spill_path.parent, self._spill_path)
        except OSError as error:
            log.error("could not rewrite the spill file %s: %s", self._spill_path, one_line(error))

    def _remove_own_spill(self) -> None:
        if self._spill_written and self._spill_path is not None:
            self._spill_path.unlink(missing_ok=True)
            self._spill_written = False

    async def close(self, timeout: float = 15.0) -> None:
        """Stop the loops, put everything counted on disk at once, then flush it until `timeout`; what the
        database did not take stays in the spill file for the next start."""
        await self._flusher.stop()
        await self._spiller.stop()
        for task in [self._early_flush, *self._background]:
            if task is not None:
                task.cancel()
        on_disk = self.spill_now()
        if on_disk:
            log.info("shutting down: %d units on disk in %s until they are flushed", on_disk, self._spill_path)
        deadline = time.monotonic() + timeout
        while self.ledger.has_work and time.monotonic() < deadline:
            if await self.flush_once() is FlushOutcome.FAILED:
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self._loads.cancel_all()
        if not self.ledger.has_work:
            log.info("meter flushed everything")
            return
        units = self.ledger.pending_units
        if self._spill_path is not None and self.spill_now():
            log.error(
                "database unavailable at shutdown: %d units kept in %s for the next start", units, self._spill_path
            )
        else:
            log.error("database unavailable at shutdown and no spill directory: %d units lost", units)


def _set_aside(path: Path, error: Exception) -> None:
    """A spill file that cannot be read is kept, renamed, for an operator; it must not stop authz from starting."""
    aside = path.with_name(path.name + ".corrupt")
    path.replace(aside)
    log.error("spill file %s is unreadable (%s); moved to %s, its units are not replayed", path, one_line(error), aside)

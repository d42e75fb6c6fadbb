"""What one authz replica knows about usage: the database's last word plus what it counted since.

Plain state, no I/O: the meter feeds it database answers and takes batches from it to flush.

- `used()` is the pooled total for an organisation and period: the last total read from the database plus
  everything this replica counted that is not in that total yet (pending, or in a flush not yet acknowledged).
  With one replica that is exact; with several, each misses what the others counted since its last read.
- A batch keeps its flush id until it is acknowledged, so a flush whose outcome is unknown is retried
  unchanged, and the database recognises it by its id.
- A request id counted once is not counted again for `dedupe_seconds`.
- A refund (a billed call the backend failed) goes through the same batches with negative units; the database
  applies it once per request id, whichever replica flushes it. It may reach one replica before the count it
  takes back is flushed by another, so a total can be below what was counted for a moment.
"""

import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from authz_service.usage.refunds import NO_TERMS, Refund, Terms
from authz_service.usage.rollups import Buckets, RollupBook, merge

UsageKey = tuple[str, datetime]  # (org_id, period_start): what quotas and alerts pool over
# (org_id, period_start, product, terms): what is stored; the terms (plan, meter, customer) are the ones the
# units were used under, so that each is reported where it was owed whatever the organisation is on later.
CounterKey = tuple[str, datetime, str, Terms]


@dataclass(frozen=True, slots=True)
class Report:
    """Units the backend reported for a request it served."""

    request_id: str
    org_id: str
    period_start: datetime
    product: str
    units: int
    terms: Terms = NO_TERMS


@dataclass
class Batch:
    flush_id: uuid.UUID
    counters: dict[CounterKey, int] = field(default_factory=dict)
    reports: list[Report] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)
    # Sent to the database at least once (or restored from a spill file): it may be applied already, so it is
    # retried exactly as it is and never grows again.
    attempted: bool = False
    # Usage-history buckets of the counters above (rollups.py), taken from the ledger at the same moment.
    rollup: Buckets = field(default_factory=dict)

    @property
    def units(self) -> int:
        """Net units: counted and reported, less refunded."""
        return sum(self.counters.values()) + sum(r.units for r in self.reports) - sum(r.units for r in self.refunds)

    def by_usage_key(self) -> dict[UsageKey, int]:
        pooled: dict[UsageKey, int] = {}
        for (org_id, period_start, _product, _terms), units in self.counters.items():
            pooled[(org_id, period_start)] = pooled.get((org_id, period_start), 0) + units
        for r in self.reports:
            pooled[(r.org_id, r.period_start)] = pooled.get((r.org_id, r.period_start), 0) + r.units
        for f in self.refunds:
            pooled[(f.org_id, f.period_start)] = pooled.get((f.org_id, f.period_start), 0) - f.units
        return pooled


@dataclass(slots=True)
class _Known:
    total: int
    as_of: float


class UsageLedger:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        stale_after: float = 2.0,
        dedupe_seconds: float = 120.0,
        dedupe_max: int = 200_000,
    ):
        self._clock = clock
        self._stale_after = stale_after
        self._dedupe_seconds = dedupe_seconds
        self._dedupe_max = dedupe_max
        self._known: dict[UsageKey, _Known] = {}
        self._pending: dict[CounterKey, int] = {}
        self._pending_reports: list[Report] = []
        self._pending_refunds: list[Refund] = []
        self._unflushed: dict[UsageKey, int] = {}  # pending + unacknowledged batches, pooled
        self._unacknowledged: deque[Batch] = deque()
        self._recent: OrderedDict[str, float] = OrderedDict()
        # Bumped for a usage key whenever a batch holding it is acknowledged: a database read that started
        # before may or may not include that batch, so it is not trusted.
        self._epoch: dict[UsageKey, int] = {}
        # Usage history counted beside `_pending` (the meter feeds both at once); moved into a batch with it.
        self.rollups = RollupBook()

    # --- reading ------------------------------------------------------------------------------------------

    def used(self, key: UsageKey) -> int | None:
        """Pooled units this period, or None when the database has not been asked yet."""
        known = self._known.get(key)
        if known is None:
            return None
        return known.total + self._unflushed.get(key, 0)

    def used_and_staleness(self, key: UsageKey) -> tuple[int, bool]:
        """`used` (0 when unknown) and `is_stale` in one look-up, for the request path."""
        known = self._known.get(key)
        if known is None:
            return 0, True
        return known.total + self._unflushed.get(key, 0), self._clock() - known.as_of > self._stale_after

    def is_stale(self, key: UsageKey) -> bool:
        known = self._known.get(key)
        return known is None or self._clock() - known.as_of > self._stale_after

    def epoch(self, key: UsageKey) -> int:
        return self._epoch.get(key, 0)

    def unflushed(self, key: UsageKey) -> int:
        """Units this replica counted for the key that the database has not acknowledged (not in its total)."""
        return self._unflushed.get(key, 0)

    @property
    def pending_units(self) -> int:
        return sum(self._unflushed.values())

    @property
    def has_unacknowledged(self) -> bool:
        return bool(self._unacknowledged)

    @property
    def has_work(self) -> bool:
        return bool(
            self._pending or self._pending_reports or self._pending_refunds or self._unacknowledged or self.rollups
        )

    # --- counting -----------------------------------------------------------------------------------------

    def seen(self, request_id: str) -> bool:
        self._expire_recent()
        return request_id in self._recent

    def record(self, request_id: str, key: UsageKey, product: str, units: int, terms: Terms = NO_TERMS) -> bool:
        """Count a served request; False (and nothing counted) when this request id was counted already."""
        if self.seen(request_id):
            return False
        self._recent[request_id] = self._clock()
        counter = (key[0], key[1], product, terms)
        self._pending[counter] = self._pending.get(counter, 0) + units
        self._unflushed[key] = self._unflushed.get(key, 0) + units
        return True

    def add(self, key: UsageKey, product: str, units: int, terms: Terms = NO_TERMS) -> None:
        """Count units without their request id (the caller deduplicated the request already)."""
        counter = (key[0], key[1], product, terms)
        self._pending[counter] = self._pending.get(counter, 0) + units
        self._unflushed[key] = self._unflushed.get(key, 0) + units

    def report(self, report: Report) -> bool:
        """Count units the backend reported; False when this process saw the same request id already.
        (The database also refuses a request id it stored before, so a report sent to two replicas counts once.)"""
        # Report ids are the backend's, per organisation: the same id from two organisations is two reports.
        report_id = f"report:{report.org_id}:{report.request_id}"
        if self.seen(report_id):
            return False
        self._recent[report_id] = self._clock()
        self._pending_reports.append(report)
        key = (report.org_id, report.period_start)
        self._unflushed[key] = self._unflushed.get(key, 0) + report.units
        return True

    def refund(self, refund: Refund) -> bool:
        """Take back a billed call's units; False when this process took back the same request id already.
        (The database also refuses a request id refunded before, so a refund sent to two replicas counts once.)"""
        refund_id = "refund:" + refund.request_id
        if self.seen(refund_id):
            return False
        self._recent[refund_id] = self._clock()
        self._pending_refunds.append(refund)
        key = (refund.org_id, refund.period_start)
        self._unflushed[key] = self._unflushed.get(key, 0) - refund.units
        return True

    def _expire_recent(self) -> None:
        horizon = self._clock() - self._dedupe_seconds
        recent = self._recent
        while recent and (len(recent) > self._dedupe_max or next(iter(recent.values())) < horizon):
            recent.popitem(last=False)

    # --- flushing -----------------------------------------------------------------------------------------

    def next_batch(self) -> Batch | None:
        """The oldest unacknowledged batch (to retry unchanged), else a new one from what is pending."""
        if not self._unacknowledged and (
            self._pending or self._pending_reports or self._pending_refunds or self.rollups
        ):
            self._unacknowledged.append(
                Batch(uuid.uuid4(), self._pending, self._pending_reports, self._pending_refunds)
            )
            self._unacknowledged[-1].rollup = self.rollups.take()
            self._pending, self._pending_reports, self._pending_refunds = {}, [], []
        return self._unacknowledged[0] if self._unacknowledged else None

    def seal(self) -> None:
        """Close what is pending into a batch now, with the flush id it will be sent with (so that a spill file
        holds exactly what will be flushed). Pending units join the last batch while that was never sent, so a
        long outage keeps two batches, not one per interval."""
        if not (self._pending or self._pending_reports or self._pending_refunds or self.rollups):
            return
        last = self._unacknowledged[-1] if self._unacknowledged else None
        if last is not None and not last.attempted:
            for counter, units in self._pending.items():
                last.counters[counter] = last.counters.get(counter, 0) + units
            last.reports.extend(self._pending_reports)
            last.refunds.extend(self._pending_refunds)
            merge(last.rollup, self.rollups.take())
        else:
            self._unacknowledged.append(
                Batch(uuid.uuid4(), self._pending, self._pending_reports, self._pending_refunds)
            )
            self._unacknowledged[-1].rollup = self.rollups.take()
        self._pending, self._pending_reports, self._pending_refunds = {}, [], []

    def unacknowledged(self) -> list[Batch]:
        return list(self._unacknowledged)

    def acknowledged(self, batch: Batch, totals: dict[UsageKey, int]) -> None:
        """The batch is in the database (applied now or found applied before); `totals` are the pooled
        totals read in the same statement, which include it."""
        if not self._unacknowledged or self._unacknowledged[0] is not batch:
            raise RuntimeError("batches are acknowledged in the order they were taken")
        self._unacknowledged.popleft()
        now = self._clock()
        for key, units in batch.by_usage_key().items():
            left = self._unflushed.get(key, 0) - units
            if left:  # below zero too: refunds still pending
                self._unflushed[key] = left
            else:
                self._unflushed.pop(key, None)
            self._epoch[key] = self._epoch.get(key, 0) + 1
        for key, total in totals.items():
            self._known[key] = _Known(total, now)

    def learn(self, key: UsageKey, total: int, epoch_at_start: int) -> None:
        """A total read from the database outside a flush; ignored when a flush of this key was acknowledged
        meanwhile or is still unacknowledged (the read may or may not include it)."""
        if epoch_at_start != self.epoch(key):
            return
        if any(key in batch.by_usage_key() for batch in self._unacknowledged):
            return
        self._known[key] = _Known(total, self._clock())

    def counted_in_database(self, request_id: str, key: UsageKey, units: int, total: int) -> None:
        """Units a reservation wrote to the database itself (they are never flushed from here); `total` is the
        pooled total the reservation left, with them.

        The total is taken as the known one when no batch of ours for the key is unacknowledged (it might or
        might not include such a batch); otherwise the units are added to what was known."""
        self._recent[request_id] = self._clock()
        self._epoch[key] = self._epoch.get(key, 0) + 1  # a read that started before may lack these units
        known = self._known.get(key)
        if any(key in batch.by_usage_key() for batch in self._unacknowledged) and known is not None:
            known.total += units
        else:
            self._known[key] = _Known(total, self._clock())

    def add_sent(self, request_id: str, batch: Batch) -> None:
        """A batch whose reservation may or may not have been applied (its answer was lost): counted like any
        other, retried unchanged with its flush id, which the database recognises if it was applied."""
        self._recent[request_id] = self._clock()
        batch.attempted = True
        self._unacknowledged.append(batch)
        for key, units in batch.by_usage_key().items():
            self._unflushed[key] = self._unflushed.get(key, 0) + units

    def assume(self, key: UsageKey, total: int) -> None:
        """A stand-in when the database cannot be asked: used, but stale at once, so the next check asks."""
        if key not in self._known:
            self._known[key] = _Known(total, float("-inf"))

    def restore(self, batches: Iterable[Batch]) -> None:
        """Batches a previous process could not flush (spilled at shutdown): flushed first, with their ids."""
        for batch in batches:
            batch.attempted = True  # the previous process may have sent it
            self._unacknowledged.append(batch)
            for key, units in batch.by_usage_key().items():
                self._unflushed[key] = self._unflushed.get(key, 0) + units

    def drain(self) -> list[Batch]:
        """Everything not yet acknowledged, as batches (for spilling at shutdown); the ledger is left empty."""
        self.next_batch()
        batches = list(self._unacknowledged)
        if self._pending or self._pending_reports or self._pending_refunds or self.rollups:
            batches.append(Batch(uuid.uuid4(), self._pending, self._pending_reports, self._pending_refunds))
            batches[-1].rollup = self.rollups.take()
        self._unacknowledged.clear()
        self._pending, self._pending_reports, self._pending_refunds, self._unflushed = {}, [], [], {}
        return batches

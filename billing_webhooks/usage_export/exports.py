"""What to report to Stripe Billing Meters, and what to do after each attempt, decided over plain values: no
database, HTTP, stripe library or metrics here. exporter.py runs these decisions; the tests call them directly.

The outbox. Usage reaches Stripe as meter events, each one row of `driftlock.stripe_exports`: an organisation,
a billing period, a number of units and a deterministic `identifier`. A row is decided in a database
transaction as what the period's counters hold minus what earlier rows already cover (`plan_export`); then it
is sent as often as it takes with the same identifier and Idempotency-Key, so Stripe, which deduplicates on
both, counts it once, whatever timed out, failed, was lost or crashed on the way (`after_attempt`).

The rules this follows (Stripe's "Record usage for billing with the API" and "Create a billing meter event"):

- Every billable unit is reported, included ones too: what is free is the price's first tier.
- Refunds come first. A billed call the backend failed is refunded when Envoy's access log reaches authz, which
  is when the call is over: up to Envoy's request timeout after it was counted. So a counted unit waits `settle`
  before it is reported (`settle_marks`): each pass notes the period's stored total (a candidate); once a
  candidate has waited `settle` it is the settled mark, and what may be reported is that total less every
  refund stored since. A refund that takes longer than `settle` to be stored (authz cut off from the database,
  say) still lowers the period's total, and so its next report; only the last report of a period can no
  longer shrink.
- A meter event's timestamp must lie within the past 35 days and at most 5 minutes ahead; the invoice of a
  period counts events whose timestamp falls in it. So a row carries the time it was decided at while its
  period is open, and the period's last second once it has closed (`event_timestamp`).
- Stripe finalises a period's invoice about an hour after the period ends (its "invoice finalization grace
  period", up to 72 hours when changed in the Dashboard), counting events that arrived until then. A period's
  final report (everything it holds) therefore goes `settle` after the period ends, when the refunds of its last
  calls are in, well inside that hour. Units of a period that arrive after
  `finalization_grace` (a spill file replayed late) can no longer reach its invoice: they get a `skipped` row,
  visible and counted, rather than being billed on the next invoice as if used then.
- Stripe accepts whole, positive values; a row is never negative. A refund that comes after its unit was
  reported leaves the period's counters below what was sent, and the next row of that period is smaller by it
  (the shortfall is carried until new usage covers it).
- Stripe deduplicates an identifier for at least 24 hours. A row that may have reached Stripe longer ago than
  `RESEND_WINDOW` is not sent again blindly: it is reconciled against Stripe's aggregated total for the
  customer and period (`reconcile`): marked sent if Stripe has it, sent again if Stripe has none of it, and
  otherwise `skipped` for an operator, since under-billing a period is recoverable and billing it twice is not.
- One row per organisation and period is in flight at a time; Stripe allows one concurrent meter event call per
  customer and meter, and a 429 is answered by waiting (`Retry-After`, else exponential backoff).
"""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from driftlock_kernel.periods import Period, calendar_month, current_period

# Stripe's windows for a meter event's timestamp.
PAST_LIMIT = timedelta(days=35)
FUTURE_LIMIT = timedelta(minutes=5)
# Stripe deduplicates an identifier for "a rolling period of at least 24 hours"; past this, a row whose earlier
# attempt may have reached Stripe is reconciled instead of resent (an hour of margin for clocks and slow calls).
RESEND_WINDOW = timedelta(hours=23)
# Stripe's aggregates lag the events they count; a reconciliation waits until the period's latest sent row is
# at least this old.
SUMMARY_SETTLE = timedelta(minutes=10)
MAX_RETRY_DELAY = timedelta(minutes=10)
# What Stripe says when an identifier it has already seen comes again (observed: 400 invalid_request_error).
DUPLICATE_IDENTIFIER_MESSAGE = "An event already exists with identifier"


class ExportState(StrEnum):
    PENDING = "pending"  # to be sent
    SENT = "sent"  # Stripe has it
    FAILED = "failed"  # Stripe refused it for a reason a retry cannot fix
    # Not sent, and never sent by itself: the period's invoice was final already, or whether an old attempt
    # reached Stripe cannot be told (sending again could bill twice); the row's error says which.
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class ExportRules:
    """How the exporter treats time; see the module docstring and Settings."""

    settle: timedelta = timedelta(minutes=3)
    finalization_grace: timedelta = timedelta(hours=1)
    # After a row failed, the next row of its period (which includes the failed units again) waits this long:
    # the cause (a deleted meter, a wrong customer) is the operator's to fix, and `stripe export --once` does
    # not wait.
    failed_retry_after: timedelta = timedelta(hours=1)


def identifier(org_id: uuid.UUID, period: Period, seq: int) -> str:
    """The meter event identifier of an organisation's `seq`-th row in a period: the same on every attempt, and
    never the same for two rows (Stripe allows 100 characters)."""
    return f"dl_{org_id.hex}_{int(period.start.timestamp())}_{seq}"


def _ceil_minute(moment: datetime) -> datetime:
    floor = moment.replace(second=0, microsecond=0)
    return floor if floor == moment else floor + timedelta(minutes=1)


def _floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def summary_window(period: Period) -> tuple[datetime, datetime] | None:
    """The whole minutes inside a period: Stripe sums meter events over minute-aligned windows, and every event
    of this period is timestamped inside this one, so that its total there is exactly the period's. None for a
    period too short to have one."""
    start, end = _ceil_minute(period.start), _floor_minute(period.end)
    return (start, end) if start < end else None


def event_timestamp(period: Period, now: datetime) -> datetime:
    """A meter event's timestamp for units of `period` reported at `now`: now while the period is open, its last
    second once closed; always inside the period's whole minutes (`summary_window`) where it has any, which may
    put it up to a minute ahead of `now` at a period's start (Stripe allows five)."""
    last = period.end - timedelta(seconds=1)
    moment = max(period.start, min(now, last)).replace(microsecond=0)
    window = summary_window(period)
    if window is not None:
        moment = min(max(moment, window[0]), window[1] - timedelta(seconds=1))
    return moment


def resolve_period(
    start: datetime, recorded_end: datetime | None, org_start: datetime | None, org_end: datetime | None
) -> Period | None:
    """The billing period that began at `start`, counters being keyed by a period's start only: as Stripe
    reported it (billing_periods), else the organisation's stored period rolled to it (authz rolls a period
    forward by its own length until Stripe's renewal arrives), else the calendar month. None when none begins
    there."""
    if recorded_end is not None and recorded_end > start:
        return Period(start, recorded_end)
    rolled = current_period(org_start, org_end, start)
    if rolled.start == start:
        return rolled
    month = calendar_month(start)
    return month if month.start == start else None


def terms_in_force(meter: str, customer: str, *, meter_now: str | None, customer_now: str | None) -> bool:
    """Whether units recorded under this meter and customer are still being counted there: the organisation's
    effective plan reports to that meter and it has that customer. Units are reported to the meter and customer
    recorded when they were counted (the plan they were used on), never to the organisation's current ones; once a
    plan change or a cancellation leaves terms no longer in force, their counters stop growing and are closed
    (`plan_export`)."""
    return meter == meter_now and customer == customer_now


@dataclass(frozen=True, slots=True)
class Marks:
    """What an open period's counters held at two moments: the latest candidate and the settled mark, each with
    the database snapshot it was read in (PostgreSQL's `pg_snapshot` text), which tells the refunds it lacks."""

    candidate_at: datetime | None = None
    candidate_units: int = 0
    candidate_snapshot: str | None = None
    settled_at: datetime | None = None
    settled_units: int = 0
    settled_snapshot: str | None = None


def settle_marks(
    marks: Marks,
    stored: int,
    at: datetime,
    snapshot: str,
    settle: timedelta,
    *,
    refunds_since_settled: int = 0,
    refunds_since_candidate: int = 0,
) -> tuple[Marks, int | None]:
    """The marks after a pass that read `stored` at `at` (database time) in `snapshot`, and the units that may be
    reported: the settled total less the refunds its snapshot did not see (`refunds_since_*`, counted by the
    caller for each mark); None while nothing has settled.

    Why that is never more than the period will finally hold: the settled total counted calls made before its
    moment; every refund of those calls is stored within `settle` of it, so by now it is among the refunds taken
    off; refunds of later calls take off units of calls not in the total, and each such call was counted too."""
    if marks.candidate_at is not None and at - marks.candidate_at >= settle:
        marks = Marks(at, stored, snapshot, marks.candidate_at, marks.candidate_units, marks.candidate_snapshot)
        refunds = refunds_since_candidate
    else:
        refunds = refunds_since_settled
        if marks.candidate_at is None:
            marks = Marks(at, stored, snapshot, marks.settled_at, marks.settled_units, marks.settled_snapshot)
    if marks.settled_at is None:
        return marks, None
    return marks, marks.settled_units - refunds


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    """One organisation's billing period: what its counters hold and what its rows already cover."""

    org_id: uuid.UUID
    period: Period
    stored_units: int  # refunds taken off
    # What may be reported while the period is open (see settle_marks); None: nothing has settled yet.
    settled_units: int | None = None
    sent_units: int = 0
    pending_units: int = 0
    skipped_units: int = 0
    next_seq: int = 1
    last_failed_at: datetime | None = None  # when the latest row failed; None when the latest did not
    # The meter and customer these units were counted under (one period may have several); see terms_in_force.
    meter: str | None = None
    customer: str | None = None
    # False: a plan change or a cancellation ended these terms; what they hold is closed (see plan_export).
    in_force: bool = True
    last_counted_at: datetime | None = None  # when these counters last changed

    @property
    def covered(self) -> int:
        """Units rows cover already: sent, in flight, or skipped."""
        return self.sent_units + self.pending_units + self.skipped_units

    @property
    def lag(self) -> int:
        """Counted units Stripe does not have yet (and will get, unless they are skipped)."""
        return max(0, self.stored_units - self.sent_units - self.skipped_units)


@dataclass(frozen=True, slots=True)
class NewExport:
    """A row to insert: `pending` to be sent, or `skipped` with why."""

    org_id: uuid.UUID
    period: Period
    seq: int
    identifier: str
    event_name: str
    customer: str
    units: int
    timestamp: datetime
    state: ExportState
    error: str | None = None


DEFAULT_RULES = ExportRules()


def plan_export(usage: PeriodUsage, now: datetime, rules: ExportRules = DEFAULT_RULES) -> NewExport | None:
    """The next row of a period, if it needs one now."""
    if usage.meter is None or usage.customer is None or usage.pending_units > 0:
        return None  # not reported to Stripe, or a row of this period is still in flight
    period = usage.period
    last_counted = usage.last_counted_at or now
    if now >= period.end:
        if now < period.end + rules.settle:
            return None  # closed: its final report waits for the refunds of its last calls
        reportable = usage.stored_units
    elif not usage.in_force:
        # A plan change or a cancellation closed these terms: nothing is counted under them any more, so once
        # the refunds of their last calls are in (settle after the last change), everything they hold is owed.
        # Stripe bills a removed metered price, and a canceled subscription's final invoice, from usage reported
        # before it finalises that invoice: this goes as soon as it is settled, not at the period's end.
        if now < last_counted + rules.settle:
            return None
        reportable = usage.stored_units
    else:
        reportable = min(usage.stored_units, usage.settled_units or 0)
    # Negative after refunds of units already reported: nothing until new usage covers them.
    units = reportable - usage.covered
    if units <= 0:
        return None
    # Terms no longer in force: timestamped when they were last used (inside the period), so that Stripe counts
    # the units in the subscription (item) they were used under, not after it ended.
    timestamp = event_timestamp(period, now if usage.in_force else min(now, last_counted))

    def row(state: ExportState, error: str | None = None) -> NewExport:
        return NewExport(
            usage.org_id,
            period,
            usage.next_seq,
            identifier(usage.org_id, period, usage.next_seq),
            usage.meter or "",
            usage.customer or "",
            units,
            timestamp,
            state,
            error,
        )

    if now >= period.end + rules.finalization_grace or timestamp < now - PAST_LIMIT:
        return row(
            ExportState.SKIPPED,
            f"not sent: counted after Stripe finalised the invoice of the period ending {period.end.isoformat()}",
        )
    if usage.last_failed_at is not None and now < usage.last_failed_at + rules.failed_retry_after:
        return None
    return row(ExportState.PENDING)


# --- attempts --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StripeAnswer:
    """What one meter event call came back with; status None: no answer (a timeout, a refused or broken
    connection)."""

    status: int | None
    request_id: str | None = None
    error_type: str | None = None
    code: str | None = None
    message: str | None = None
    should_retry: bool | None = None  # Stripe-Should-Retry
    retry_after: float | None = None  # seconds, from Retry-After


class AttemptResult(StrEnum):
    """What an attempt means for its row (also a metric label)."""

    ACCEPTED = "accepted"  # Stripe recorded it now
    DUPLICATE = "duplicate"  # Stripe had it already (an earlier attempt's reply was lost)
    RETRY = "retry"
    REJECTED = "rejected"  # a retry cannot fix it


@dataclass(frozen=True, slots=True)
class AttemptVerdict:
    result: AttemptResult
    reason: str  # a closed set: accepted, duplicate, no_answer, rate_limited, in_progress, server_error, ...
    error: str | None = None  # for the row: Stripe's message, or what happened
    retry_in: timedelta | None = None
    # A rate limit applies to every row: stop sending for now.
    stop_sending: bool = False


def retry_delay(attempts: int, retry_after: float | None = None, jitter: float = 0.0) -> timedelta:
    """Exponential backoff from one second, at most MAX_RETRY_DELAY, never sooner than Stripe's Retry-After;
    `jitter` in [0, 1) spreads retries of many rows (up to half again)."""
    base = min(MAX_RETRY_DELAY.total_seconds(), 2.0 ** max(0, min(attempts - 1, 12)))
    return timedelta(seconds=max(retry_after or 0.0, base * (1.0 + jitter / 2)))


def classify(answer: StripeAnswer, attempts: int, jitter: float = 0.0) -> AttemptVerdict:
    """What an answer to a meter event call means for its row (`attempts`: this one included)."""
    status = answer.status
    message = answer.message or (f"HTTP {status}" if status else None)
    detail = f"{status} {answer.error_type or 'error'}: {message}" if status else None

    def retry(reason: str, error: str | None, stop: bool = False) -> AttemptVerdict:
        delay = retry_delay(attempts, answer.retry_after, jitter)
        return AttemptVerdict(AttemptResult.RETRY, reason, error, delay, stop)

    if status is None:
        return retry("no_answer", answer.message or "no answer from Stripe")
    if 200 <= status < 300:
        return AttemptVerdict(AttemptResult.ACCEPTED, "accepted")
    if status == 400 and (answer.message or "").startswith(DUPLICATE_IDENTIFIER_MESSAGE):
        return AttemptVerdict(AttemptResult.DUPLICATE, "duplicate")
    if status == 429:
        return retry("rate_limited", detail, stop=answer.code != "lock_timeout")
    if answer.should_retry is True or status == 409 or status >= 500:
        return retry("in_progress" if status == 409 else "server_error", detail)
    if status in (401, 403):
        # The key is wrong, revoked or lacks a permission: the operator's to fix, and then this row goes through.
        return retry("unauthorized", detail, stop=True)
    return AttemptVerdict(AttemptResult.REJECTED, "rejected", detail)


def needs_reconciliation(first_attempt_at: datetime | None, now: datetime) -> bool:
    """Whether a row's identifier may have reached Stripe so long ago that Stripe may have forgotten it."""
    return first_attempt_at is not None and now - first_attempt_at >= RESEND_WINDOW


class Reconciled(StrEnum):
    CONFIRMED = "confirmed"  # Stripe's total includes the row: it is sent
    ABSENT = "absent"  # Stripe's total lacks it: send it again (a fresh 24 h window)
    AMBIGUOUS = "ambiguous"  # neither: an operator must look


def reconcile(row_units: int, stripe_total: int, sent_units: int) -> Reconciled:
    """Stripe's total for the customer, meter and period's whole minutes, against what rows marked sent cover."""
    unexplained = stripe_total - sent_units
    if unexplained == row_units:
        return Reconciled.CONFIRMED
    if unexplained == 0:
        return Reconciled.ABSENT
    return Reconciled.AMBIGUOUS

"""What a Stripe event changes, decided over plain values: no database, HTTP or metrics here.

Ordering. Stripe delivers events late, twice and out of order, and its `created` has one-second resolution, so
events of the same second are common (a subscription's `created` and `updated`, an invoice's payment and the
subscription update it causes). Every event that reports a subscription's state gets a `Position`:

    (created, rank of the status it reports, event id)

and a part of the stored state is replaced only by an event whose position is greater than the one that wrote
it. The rank breaks same-second ties in the direction a subscription's life moves (incomplete < trialing <
active < past_due < unpaid < paused < canceled = incomplete_expired), so the subscription that was created
`incomplete` and became `active` in the same second ends `active`, and a `deleted` is never undone by an update
of its own second. The event id breaks what is left, arbitrarily but the same way every time. Positions are a
total order, so any delivery order of the same events ends in the same state.

A subscription's snapshot (prices, period, ended) and its status have separate positions: invoice events move
the status without carrying a snapshot, and a late `subscription.updated` may still bring a newer price even
when a newer payment already set the status.

The status is not replaced but derived. Every event that speaks about the status (a subscription event's
status, an invoice payment's result) is kept in the subscription's history (`StatusReport`, a row of
driftlock.stripe_subscription_history), and the status, `past_due_since` and the status position are the
fold of that history in position order (`status_from_history`). A payment's effect depends on the status
before it (a success leaves a trial a trial), and an overdue episode starts at its earliest failure: both
only come out the same for every delivery order when the events are replayed in their own order, so a failure
that arrives after a later one still moves the start of the episode back to itself.
"""

import dataclasses
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from billing_webhooks.inbox.events import InvoicePayment, SubscriptionSnapshot
from driftlock_kernel.billing import (
    FREE_PLAN,
    OVERDUE_STATUSES,
    TERMINAL_STATUSES,
    BillingStatus,
    SubscriptionStatus,
)

S = SubscriptionStatus
# The order of a subscription's life, for events of the same second (see the module docstring).
STATUS_RANK: Mapping[SubscriptionStatus, int] = {
    S.INCOMPLETE: 0,
    S.TRIALING: 1,
    S.ACTIVE: 2,
    S.PAST_DUE: 3,
    S.UNPAID: 4,
    S.PAUSED: 5,
    S.CANCELED: 6,
    S.INCOMPLETE_EXPIRED: 6,
}


class EventOutcome(StrEnum):
    """What became of an event; stored with it and used as a metric label."""

    APPLIED = "applied"  # it changed (or confirmed) the billing state
    DEFERRED = "deferred"  # stored, but no organisation is known for it yet; applied when one is linked
    IGNORED = "ignored"  # a type we do not handle, or an event that has nothing to change
    SKIPPED_STALE = "skipped_stale"  # older than what was already applied
    FAILED = "failed"  # could not be applied (unknown organisation, malformed, an error); see detail
    DUPLICATE = "duplicate"  # a second delivery of a stored event (never stored as such)


class Problem(StrEnum):
    """Something an operator should look at; a metric label, and part of the event's detail."""

    MALFORMED_ORG_ID = "malformed_org_id"
    UNKNOWN_ORG = "unknown_org"
    UNKNOWN_PRICE = "unknown_price"
    CUSTOMER_CONFLICT = "customer_conflict"
    MALFORMED_EVENT = "malformed_event"
    HANDLER_ERROR = "handler_error"


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """Where an event stands in a subscription's history; see the module docstring."""

    created: datetime
    rank: int
    event_id: str


def position(created: datetime, status: SubscriptionStatus, event_id: str) -> Position:
    return Position(created, STATUS_RANK[status], event_id)


def is_newer(candidate: Position, applied: Position | None) -> bool:
    """Whether an event at `candidate` may replace what the event at `applied` wrote."""
    return applied is None or candidate > applied


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """What we hold about one Stripe subscription (a row of driftlock.stripe_subscriptions)."""

    id: str
    customer_id: str
    org_id: uuid.UUID | None = None
    status: SubscriptionStatus | None = None  # None: only the id is known so far
    past_due_since: datetime | None = None
    status_position: Position | None = None
    price_ids: tuple[str, ...] = ()
    period_start: datetime | None = None
    period_end: datetime | None = None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False
    ended: bool = False
    snapshot_position: Position | None = None
    # Every status report received, in position order, one per event id; `status`, `past_due_since` and
    # `status_position` are its fold.
    history: tuple["StatusReport", ...] = ()

    @property
    def in_force(self) -> bool:
        """Not ended: active, trialing, overdue, incomplete or paused, or not known yet."""
        return self.status not in TERMINAL_STATUSES and not self.ended

    @property
    def latest(self) -> Position | None:
        known = [p for p in (self.status_position, self.snapshot_position) if p is not None]
        return max(known) if known else None


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What one event said about a subscription's status: a subscription event's status, or an invoice
    payment's result (exactly one of the two)."""

    at: Position
    status: SubscriptionStatus | None = None
    payment_succeeded: bool | None = None

    def __post_init__(self) -> None:
        if (self.status is None) == (self.payment_succeeded is None):
            raise ValueError("a status report carries a status or a payment result, not both or neither")


@dataclass(frozen=True, slots=True)
class StatusFold:
    status: SubscriptionStatus | None = None
    past_due_since: datetime | None = None
    position: Position | None = None


def status_from_history(history: Iterable[StatusReport]) -> StatusFold:
    """The status the reports leave a subscription in, replayed in position order whatever order they came in.

    A subscription event sets its status; a payment moves the status before it (`status_after_payment`) or, when
    it changes nothing (a payment on a paused or ended subscription), is passed over. An overdue episode starts
    at the first report that made the subscription overdue and lasts until a report makes it not overdue.
    """
    fold = StatusFold()
    for report in sorted(history, key=lambda r: r.at):
        if fold.status in TERMINAL_STATUSES and report.status not in TERMINAL_STATUSES:
            # Ended is final (Stripe never revives a canceled or incomplete_expired subscription): a report
            # positioned after it, such as an update created just before a later read saw it canceled, is older
            # news than the end, whatever its position.
            continue
        if report.status is not None:
            target: SubscriptionStatus | None = report.status
        else:
            target = status_after_payment(fold.status, bool(report.payment_succeeded))
        if target is None:
            continue
        if target not in OVERDUE_STATUSES:
            since = None
        elif fold.status in OVERDUE_STATUSES and fold.past_due_since is not None:
            since = fold.past_due_since  # the episode goes on: dunning runs from its first failure
        else:
            since = report.at.created
        fold = StatusFold(target, since, report.at)
    return fold


def with_report(history: tuple[StatusReport, ...], report: StatusReport) -> tuple[StatusReport, ...]:
    """The history with one more report, kept in position order and once per event id (a redelivery of an
    event adds nothing)."""
    if any(r.at.event_id == report.at.event_id for r in history):
        return history
    return tuple(sorted((*history, report), key=lambda r: r.at))


@dataclass(frozen=True, slots=True)
class Applied:
    """The state after an event, and which of its parts the event was allowed to change."""

    state: SubscriptionState
    snapshot: bool = False
    status: bool = False
    stale: bool = False  # nothing changed because the event is older than what it would replace
    reason: str | None = None  # why nothing changed, when nothing did
    report: StatusReport | None = None  # what the event adds to the subscription's history

    @property
    def changed(self) -> bool:
        return self.snapshot or self.status


def _with_status(state: SubscriptionState, report: StatusReport) -> tuple[SubscriptionState, bool]:
    """The state with the report in its history and the status re-derived; whether the status part changed."""
    history = with_report(state.history, report)
    fold = status_from_history(history)
    new = dataclasses.replace(
        state, history=history, status=fold.status, past_due_since=fold.past_due_since, status_position=fold.position
    )
    changed = (new.status, new.past_due_since, new.status_position) != (
        state.status,
        state.past_due_since,
        state.status_position,
    )
    return new, changed


def apply_snapshot(state: SubscriptionState | None, event: SubscriptionSnapshot) -> Applied:
    """A subscription event: its snapshot if newer than the one it would replace, and its status into the
    history."""
    current = state or SubscriptionState(id=event.subscription_id, customer_id=event.customer_id)
    at = position(event.created, event.status, event.event_id)
    report = StatusReport(at, status=event.status)
    # An ended subscription can never come back, so the news that it ended applies at once, however recent the
    # snapshot it replaces (a sync's snapshot is dated a minute before its read; an event applied seconds before
    # the read looks newer); and nothing after it un-ends it.
    ending = event.ended or event.status in TERMINAL_STATUSES
    take_snapshot = is_newer(at, current.snapshot_position) if current.ended == ending else ending
    new = current
    if take_snapshot:
        has_period = event.period_start is not None and event.period_end is not None
        new = dataclasses.replace(
            new,
            customer_id=event.customer_id,
            price_ids=event.price_ids,
            period_start=event.period_start if has_period else current.period_start,
            period_end=event.period_end if has_period else current.period_end,
            trial_end=event.trial_end,
            cancel_at_period_end=event.cancel_at_period_end,
            ended=ending,
            snapshot_position=at,
        )
    new, status_changed = _with_status(new, report)
    if not (take_snapshot or status_changed):
        return Applied(new, stale=True, reason="older than the subscription state already applied", report=report)
    return Applied(new, snapshot=take_snapshot, status=status_changed, report=report)


def status_after_payment(status: SubscriptionStatus | None, succeeded: bool) -> SubscriptionStatus | None:
    """The status an invoice payment leaves a subscription in; None when a payment does not change it.

    A payment brings an overdue (or not yet paid) subscription back to active and a failed one makes it
    past_due, but neither revives an ended subscription, un-pauses one, nor ends a trial early; a failed first
    payment leaves an incomplete subscription incomplete (it was never in force), and unpaid stays unpaid.
    """
    if succeeded:
        if status in (None, S.INCOMPLETE, S.ACTIVE, S.PAST_DUE, S.UNPAID):
            return S.ACTIVE
        if status == S.TRIALING:
            return S.TRIALING
        return None
    if status in (None, S.ACTIVE, S.TRIALING, S.PAST_DUE):
        return S.PAST_DUE
    if status == S.UNPAID:
        return S.UNPAID
    return None


def apply_payment(state: SubscriptionState | None, event: InvoicePayment) -> Applied:
    """An invoice payment: into the subscription's history, which then says what the status is."""
    if event.subscription_id is None:
        raise ValueError("an invoice without a subscription changes no subscription")
    current = state or SubscriptionState(id=event.subscription_id, customer_id=event.customer_id)
    at = position(event.created, S.ACTIVE if event.succeeded else S.PAST_DUE, event.event_id)
    report = StatusReport(at, payment_succeeded=event.succeeded)
    new, changed = _with_status(current, report)
    if changed:
        return Applied(new, status=True, report=report)
    if current.status_position is not None and at < current.status_position:
        return Applied(new, stale=True, reason="older than the subscription status already applied", report=report)
    return Applied(new, reason=f"a payment does not change a {current.status} subscription", report=report)


def choose_current(subscriptions: Iterable[SubscriptionState]) -> SubscriptionState | None:
    """The subscription an organisation's billing follows: the most recent one still in force, else the most
    recent one that ended. An organisation that cancels and subscribes again follows the new subscription,
    whatever order the two subscriptions' events arrive in."""
    subs = list(subscriptions)
    if not subs:
        return None

    def recency(sub: SubscriptionState) -> tuple:
        latest = sub.latest  # a subscription known by its id only comes before any with events
        return (0, sub.id) if latest is None else (1, latest.created, latest.rank, latest.event_id, sub.id)

    in_force = [sub for sub in subs if sub.in_force]
    return max(in_force or subs, key=recency)


def pick_plan(price_ids: Iterable[str], plan_by_price: Mapping[str, str]) -> str | None:
    """The plan the first mapped price selects (items in Stripe's order); None when no price is mapped."""
    for price in price_ids:
        if price in plan_by_price:
            return plan_by_price[price]
    return None


@dataclass(frozen=True, slots=True)
class OrgBilling:
    """An organisation's billing columns, as stored."""

    id: uuid.UUID
    plan_name: str
    billing_status: BillingStatus
    past_due_since: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    period_start: datetime | None
    period_end: datetime | None
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False


def org_changes(
    org: OrgBilling, sub: SubscriptionState | None, plan: str | None, fallback_plan: str = FREE_PLAN
) -> dict[str, Any]:
    """The organisation columns to change so that they follow `sub` (its current subscription).

    `plan` is the plan the subscription's prices select (None: none of them is mapped, so the plan is kept).
    An ended subscription puts the organisation on the fallback plan and the calendar month. A subscription known
    only from invoices (no snapshot yet) changes the status, and leaves plan, period and trial as they are.
    """
    if sub is None:
        return {}
    desired: dict[str, Any] = {"stripe_subscription_id": sub.id}
    if org.stripe_customer_id is None:
        desired["stripe_customer_id"] = sub.customer_id
    if sub.status is not None:
        desired["billing_status"] = BillingStatus.of(sub.status)
        desired["past_due_since"] = sub.past_due_since
    if sub.ended:
        desired.update(
            plan_name=fallback_plan, period_start=None, period_end=None, trial_end=None, cancel_at_period_end=False
        )
    else:
        if plan is not None:
            desired["plan_name"] = plan
        if sub.period_start is not None and sub.period_end is not None:
            desired.update(period_start=sub.period_start, period_end=sub.period_end)
        if sub.snapshot_position is not None:
            desired.update(trial_end=sub.trial_end, cancel_at_period_end=sub.cancel_at_period_end)
    return {column: value for column, value in desired.items() if getattr(org, column) != value}

"""What each handled Stripe event changes: `handle(conn, event) -> Result`, one dispatch on our event types.

Each handler runs inside the transaction that stored the event. It serialises on the Stripe customer, reads
the stored state, lets `decisions` say what changes, writes the subscription row, and then brings the linked
organisation's billing columns in line with its current subscription (`sync_org`). An UPDATE of an
organisation row reaches every authz replica through the table's NOTIFY trigger.
"""

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, assert_never

from billing_webhooks.inbox import decisions, store
from billing_webhooks.inbox.decisions import EventOutcome, Problem, StatusReport, SubscriptionState
from billing_webhooks.inbox.events import (
    BillingEvent,
    CheckoutCompleted,
    InvoicePayment,
    SubscriptionSnapshot,
    parse_org_id,
)
from driftlock_kernel import db, events
from driftlock_kernel.billing import DEFAULT_POLICY, OVERDUE_STATUSES, BillingPolicy


@dataclass(frozen=True, slots=True)
class Result:
    outcome: EventOutcome
    detail: str | None = None
    org_id: uuid.UUID | None = None
    problems: tuple[Problem, ...] = field(default=())


def _detail(*parts: str | None) -> str | None:
    text = "; ".join(part for part in parts if part)
    return text or None


# --- the organisation follows its current subscription ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Synced:
    changes: Mapping[str, object]
    current: SubscriptionState | None
    unknown_prices: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


async def sync_org(
    conn: db.Connection,
    org_id: uuid.UUID,
    policy: BillingPolicy = DEFAULT_POLICY,
    *,
    extra: Mapping[str, Any] | None = None,
) -> Synced | None:
    """Make the organisation's billing columns follow its current subscription; None if it no longer exists."""
    org = await store.load_org(conn, org_id)
    if org is None:
        return None
    extra = {column: value for column, value in (extra or {}).items() if getattr(org, column) != value}
    org = dataclasses.replace(org, **extra)
    current = decisions.choose_current(await store.subscriptions_of_org(conn, org_id))
    plan: str | None = None
    unknown: tuple[str, ...] = ()
    if current is not None and current.price_ids:
        plan = decisions.pick_plan(current.price_ids, await store.plans_by_price(conn, current.price_ids))
        if plan is None and not current.ended:
            unknown = current.price_ids
    changes = extra | decisions.org_changes(org, current, plan, policy.fallback_plan)
    notes: list[str] = []
    customer = changes.get("stripe_customer_id")
    if customer is not None:
        owner = await store.org_of_customer(conn, customer)
        if owner is not None and owner != org_id:
            # Another organisation pays through this customer; a subscription linked by metadata must not
            # take it over.
            del changes["stripe_customer_id"]
            notes.append(f"customer {customer} belongs to organisation {owner}; not linked")
    await store.update_org(conn, org_id, changes)
    return Synced(changes, current, unknown, tuple(notes))


def _sync_detail(synced: Synced, subscription_id: str) -> str | None:
    parts = list(synced.notes)
    if synced.unknown_prices:
        parts.append(f"no plan for price {', '.join(synced.unknown_prices)}: plan kept")
    if synced.current is not None and synced.current.id != subscription_id:
        parts.append(f"the organisation follows subscription {synced.current.id}")
    return _detail(*parts)


async def _find_org(
    conn: db.Connection, state: SubscriptionState, metadata_org_id: str | None
) -> tuple[uuid.UUID | None, Problem | None]:
    """The organisation a subscription belongs to: already linked, named by a checkout, named in the
    subscription's metadata, or the one paying through its customer."""
    if state.org_id is not None:
        return state.org_id, None
    found = await store.org_of_subscription(conn, state.id)
    if found is not None:
        return found, None
    problem = None
    if metadata_org_id is not None:
        named = parse_org_id(metadata_org_id)
        if named is None:
            problem = Problem.MALFORMED_ORG_ID
        elif await store.org_exists(conn, named):
            return named, None
        else:
            problem = Problem.UNKNOWN_ORG
    return await store.org_of_customer(conn, state.customer_id), problem


async def _store_and_sync(
    conn: db.Connection,
    state: SubscriptionState,
    report: StatusReport | None,
    metadata_org_id: str | None,
    what: str | None,
    policy: BillingPolicy,
) -> Result:
    org_id, problem = await _find_org(conn, state, metadata_org_id)
    state = dataclasses.replace(state, org_id=org_id)
    await store.save_subscription(conn, state)
    if report is not None:
        await store.add_report(conn, state.id, report)
    problems: tuple[Problem, ...] = (problem,) if problem else ()
    metadata_note = None
    if problem is Problem.MALFORMED_ORG_ID:
        metadata_note = f"metadata.org_id {(metadata_org_id or '')[:64]!r} is not an organisation id"
    elif problem is Problem.UNKNOWN_ORG:
        metadata_note = f"metadata.org_id {metadata_org_id} names no organisation"
    if org_id is None:
        return Result(
            EventOutcome.DEFERRED,
            _detail(
                f"no organisation is linked to customer {state.customer_id} yet; kept until a checkout links it",
                metadata_note,
            ),
            None,
            problems,
        )
    synced = await sync_org(conn, org_id, policy)
    if synced is None:
        return Result(EventOutcome.DEFERRED, "the linked organisation no longer exists", None, problems)
    if synced.unknown_prices and synced.current is not None and synced.current.id == state.id:
        problems += (Problem.UNKNOWN_PRICE,)
    return Result(EventOutcome.APPLIED, _detail(what, metadata_note, _sync_detail(synced, state.id)), org_id, problems)


# --- the handlers ------------------------------------------------------------------------------------------


async def handle_checkout_session_completed(
    conn: db.Connection, event: CheckoutCompleted, policy: BillingPolicy = DEFAULT_POLICY
) -> Result:
    """Link the Stripe customer (and subscription) to the organisation the session names."""
    if event.org_reference is None:
        return Result(
            EventOutcome.FAILED,
            "the session names no organisation (client_reference_id or metadata.org_id)",
            problems=(Problem.MALFORMED_ORG_ID,),
        )
    org_id = parse_org_id(event.org_reference)
    if org_id is None:
        return Result(
            EventOutcome.FAILED,
            f"malformed organisation id {event.org_reference[:64]!r} in the session",
            problems=(Problem.MALFORMED_ORG_ID,),
        )
    if not await store.org_exists(conn, org_id):
        return Result(EventOutcome.FAILED, f"no organisation with id {org_id}", problems=(Problem.UNKNOWN_ORG,))
    if event.customer_id is None:
        return Result(EventOutcome.IGNORED, "the session has no customer", org_id)
    await store.lock_customer(conn, event.customer_id)
    await store.lock_org(conn, org_id)
    org = await store.load_org(conn, org_id)
    if org is None:  # deleted meanwhile
        return Result(EventOutcome.FAILED, f"no organisation with id {org_id}", problems=(Problem.UNKNOWN_ORG,))
    owner = await store.org_of_customer(conn, event.customer_id)
    if owner is not None and owner != org_id:
        return Result(
            EventOutcome.FAILED,
            f"customer {event.customer_id} already belongs to organisation {owner}",
            org_id,
            (Problem.CUSTOMER_CONFLICT,),
        )
    if org.stripe_customer_id not in (None, event.customer_id):
        newest = await store.latest_applied_checkout(conn, org_id, other_than=event.event_id)
        if newest is not None and newest >= (event.created, event.event_id):
            return Result(
                EventOutcome.SKIPPED_STALE,
                f"a newer checkout linked customer {org.stripe_customer_id}",
                org_id,
            )
    if event.subscription_id is not None:
        await store.claim_subscription(conn, event.subscription_id, event.customer_id, org_id)
    linked = await store.link_customer_subscriptions(conn, event.customer_id, org_id)
    synced = await sync_org(conn, org_id, policy, extra={"stripe_customer_id": event.customer_id})
    if synced is None:  # cannot happen while the row is locked, but never report a link that was not made
        return Result(EventOutcome.FAILED, f"organisation {org_id} disappeared while linking", org_id)
    problems = (Problem.UNKNOWN_PRICE,) if synced.unknown_prices else ()
    what = f"linked customer {event.customer_id}"
    if linked:
        what += f" and its earlier subscription(s) {', '.join(linked)}"
    return Result(
        EventOutcome.APPLIED, _detail(what, _sync_detail(synced, event.subscription_id or "")), org_id, problems
    )


async def _link_stored(
    conn: db.Connection,
    state: SubscriptionState,
    report: StatusReport | None,
    metadata_org_id: str | None,
    policy: BillingPolicy,
) -> Result:
    """An event no newer than what is stored, for a subscription stored while no organisation was known (its event
    was deferred, and is delivered again or replayed): the stored state stands (the event's report joins its
    history), and its organisation may be found now."""
    return await _store_and_sync(
        conn, state, report, metadata_org_id, "subscription stored earlier, linked now", policy
    )


async def _subscription_event(
    conn: db.Connection, event: SubscriptionSnapshot, policy: BillingPolicy = DEFAULT_POLICY
) -> Result:
    await store.lock_customer(conn, event.customer_id)
    state = await store.load_subscription(conn, event.subscription_id)
    applied = decisions.apply_snapshot(state, event)
    if not applied.changed:
        if state is not None and state.org_id is None:
            return await _link_stored(conn, state, applied.report, event.metadata_org_id, policy)
        if state is not None and applied.report is not None:
            # Kept all the same: a report that changes nothing now may matter once an earlier event arrives.
            await store.add_report(conn, state.id, applied.report)
        return Result(EventOutcome.SKIPPED_STALE, applied.reason, state.org_id if state else None)
    what = None
    if not applied.status:
        what = "status kept: a newer event already set it"
    elif not applied.snapshot:
        what = "prices and period kept: a newer snapshot was already applied"
    return await _store_and_sync(conn, applied.state, applied.report, event.metadata_org_id, what, policy)


async def _trial_notice(conn: db.Connection, event: SubscriptionSnapshot, policy: BillingPolicy) -> Result:
    """Three days before a trial ends: nothing to enforce; the event is kept (the notification, for an operator or
    a mailer to read) and the snapshot it carries is applied like any other."""
    result = await _subscription_event(conn, event, policy)
    if result.org_id is not None and event.trial_end is not None:
        # Keyed by the trial's end: Stripe's retries, a replay or a later sync tell of the same trial once.
        await events.emit(
            conn,
            events.EventType.BILLING_TRIAL_WILL_END,
            result.org_id,
            {"trial_end": event.trial_end, "subscription_id": event.subscription_id},
            dedupe_key=f"billing.trial_will_end:{result.org_id}:{int(event.trial_end.timestamp())}",
        )
    ends = f"trial ends {event.trial_end.isoformat()}" if event.trial_end else "trial ends (no trial_end given)"
    return dataclasses.replace(result, detail=_detail(ends, result.detail))


async def _invoice_event(conn: db.Connection, event: InvoicePayment, policy: BillingPolicy = DEFAULT_POLICY) -> Result:
    if event.subscription_id is None:
        return Result(EventOutcome.IGNORED, "the invoice is not a subscription's")
    await store.lock_customer(conn, event.customer_id)
    state = await store.load_subscription(conn, event.subscription_id)
    applied = decisions.apply_payment(state, event)
    if applied.stale and state is not None and state.org_id is None:
        return await _link_stored(conn, state, applied.report, event.metadata_org_id, policy)
    if not applied.changed:
        if state is not None and applied.report is not None:
            await store.add_report(conn, state.id, applied.report)
        outcome = EventOutcome.SKIPPED_STALE if applied.stale else EventOutcome.IGNORED
        return Result(outcome, applied.reason, state.org_id if state else None)
    late = state is not None and state.status_position is not None and event.created < state.status_position.created
    what = "an earlier payment arriving late: the status was replayed in event order" if late else None
    return await _store_and_sync(conn, applied.state, applied.report, event.metadata_org_id, what, policy)


async def handle(conn: db.Connection, event: BillingEvent, policy: BillingPolicy = DEFAULT_POLICY) -> Result:
    """Apply one of our events (events.normalize chose its type from Stripe's). Every subscription event
    (created, updated, deleted, paused, resumed, trial_will_end) carries the whole subscription and is applied
    alike: deleted ends it (the organisation goes to the fallback plan unless another subscription follows),
    paused means no paid subscription is in force (a trial ended without a payment method). Every invoice event
    (payment_succeeded, payment_failed, paid) is a payment: `paid` covers payments out of band too, and the
    second of paid and payment_succeeded for one charge changes nothing."""
    match event:
        case CheckoutCompleted():
            return await handle_checkout_session_completed(conn, event, policy)
        case SubscriptionSnapshot(trial_will_end=True):
            return await _trial_notice(conn, event, policy)
        case SubscriptionSnapshot():
            return await _subscription_event(conn, event, policy)
        case InvoicePayment(succeeded=False):
            result = await _invoice_event(conn, event, policy)
            if result.org_id is not None:
                await _tell_payment_failed(conn, event, result.org_id, policy)
            return result
        case InvoicePayment():
            return await _invoice_event(conn, event, policy)
        case _:
            assert_never(event)


async def _tell_payment_failed(
    conn: db.Connection, event: InvoicePayment, org_id: uuid.UUID, policy: BillingPolicy
) -> None:
    """billing.payment_failed, when the organisation is overdue after this failure (it opened or continues
    dunning); once per Stripe event, however often it is delivered or replayed."""
    row = await conn.fetchrow(
        "SELECT billing_status, past_due_since FROM driftlock.organizations WHERE id = $1", org_id
    )
    if row is None or row["billing_status"] not in OVERDUE_STATUSES or row["past_due_since"] is None:
        return
    since = row["past_due_since"]
    restricts_at = since + timedelta(seconds=policy.grace_seconds) if policy.block_billable_when_overdue else None
    await events.emit(
        conn,
        events.EventType.BILLING_PAYMENT_FAILED,
        org_id,
        {
            "past_due_since": since,
            "restricts_at": restricts_at,
            "billing_status": row["billing_status"],
            "invoice_id": event.invoice_id,
        },
        dedupe_key=f"billing.payment_failed:{event.event_id}",
    )

"""Properties of the billing decisions (hypothesis): a random subscription story (checkout, created, updates,
failures, payments, deletion, re-subscription) ends in the same organisation state, every column, whatever
order its events arrive in and however often each is delivered. The organisation is carried through the same
pure functions the handlers call (apply_*, choose_current, pick_plan, org_changes); the database version of
this property is tests/integration/test_webhook_story_properties.py."""

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from billing_webhooks.inbox.decisions import (
    OrgBilling,
    SubscriptionState,
    apply_payment,
    apply_snapshot,
    choose_current,
    org_changes,
    pick_plan,
)
from billing_webhooks.inbox.events import CheckoutCompleted, InvoicePayment, SubscriptionSnapshot
from driftlock_kernel.billing import BillingStatus, SubscriptionStatus

T0 = datetime(2026, 3, 1, tzinfo=UTC)
CUSTOMER = "cus_story"
ORG = uuid.UUID(int=1)
PLAN_BY_PRICE = {"price_basic": "basic", "price_pro": "pro", "price_team": "team"}
STATUSES = [s for s in SubscriptionStatus if s not in (SubscriptionStatus.CANCELED,)]


@st.composite
def stories(draw) -> list:
    """Events of one customer's subscriptions, with times drawn from a small range so that ties are common.
    Every subscription has its `created` (Stripe always sends one); the rest is random."""
    subscriptions = draw(st.integers(1, 2))  # two: a cancellation and a new subscription
    events: list = [CheckoutCompleted("evt_checkout", T0, "cs_1", str(ORG), CUSTOMER, "sub_0", "subscription")]
    kinds = [f"created:{k}" for k in range(subscriptions)]
    kinds += draw(st.lists(st.sampled_from(["updated", "updated", "failed", "paid", "deleted"]), max_size=9))
    for i, kind in enumerate(kinds):
        if kind.startswith("created:"):
            sub, kind = f"sub_{kind.split(':')[1]}", "created"
        else:
            sub = f"sub_{draw(st.integers(0, subscriptions - 1))}"
        created = T0 + timedelta(seconds=draw(st.integers(0, 40)))
        if kind in ("failed", "paid"):
            events.append(InvoicePayment(f"evt_{i}", created, f"in_{i}", CUSTOMER, sub, kind == "paid", None))
            continue
        status = SubscriptionStatus.CANCELED if kind == "deleted" else draw(st.sampled_from(STATUSES))
        start = created - timedelta(days=draw(st.integers(0, 20)))
        events.append(
            SubscriptionSnapshot(
                event_id=f"evt_{i}",
                created=created,
                subscription_id=sub,
                customer_id=CUSTOMER,
                status=status,
                price_ids=(draw(st.sampled_from(sorted(PLAN_BY_PRICE))),),
                period_start=start,
                period_end=start + timedelta(days=30),
                metadata_org_id=str(ORG),
                ended=kind == "deleted",
                trial_end=created + timedelta(days=3) if status == SubscriptionStatus.TRIALING else None,
                cancel_at_period_end=draw(st.booleans()),
            )
        )
    return events


def replay(events) -> OrgBilling:
    """What the webhook service does with these deliveries, minus the database: the inbox drops a second
    delivery of an event id; each handler moves one subscription; the organisation follows its current one."""
    org = OrgBilling(ORG, "free", BillingStatus.NONE, None, None, None, None, None)
    subscriptions: dict[str, SubscriptionState] = {}
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        extra: dict[str, Any] = {}
        if isinstance(event, CheckoutCompleted):
            assert event.subscription_id is not None  # every checkout of these stories starts a subscription
            subscriptions.setdefault(event.subscription_id, SubscriptionState(event.subscription_id, CUSTOMER, ORG))
            extra = {"stripe_customer_id": CUSTOMER} if org.stripe_customer_id is None else {}
        elif isinstance(event, SubscriptionSnapshot):
            subscriptions[event.subscription_id] = apply_snapshot(subscriptions.get(event.subscription_id), event).state
        else:
            subscriptions[event.subscription_id] = apply_payment(subscriptions.get(event.subscription_id), event).state
        org = dataclasses.replace(org, **extra)
        current = choose_current(subscriptions.values())
        plan = pick_plan(current.price_ids, PLAN_BY_PRICE) if current is not None else None
        org = dataclasses.replace(org, **org_changes(org, current, plan))
    return org


@settings(max_examples=300, deadline=None)
@given(data=st.data(), story=stories())
def test_a_story_ends_in_the_same_organisation_state_in_any_order_with_duplicates(data, story):
    expected = replay(story)
    duplicated = story + data.draw(st.lists(st.sampled_from(story), max_size=len(story)), label="redeliveries")
    shuffled = data.draw(st.permutations(duplicated), label="delivery order")
    assert replay(shuffled) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data(), story=stories())
def test_every_subscription_ends_in_the_same_state_in_any_order(data, story):
    def states(events) -> dict[str, SubscriptionState]:
        found: dict[str, SubscriptionState] = {}
        for event in events:
            if isinstance(event, SubscriptionSnapshot):
                found[event.subscription_id] = apply_snapshot(found.get(event.subscription_id), event).state
            elif isinstance(event, InvoicePayment):
                assert event.subscription_id is not None  # every invoice of these stories is a subscription's
                found[event.subscription_id] = apply_payment(found.get(event.subscription_id), event).state
        return found

    shuffled = data.draw(st.permutations(story + story[: data.draw(st.integers(0, len(story)))]))
    assert states(shuffled) == states(story)

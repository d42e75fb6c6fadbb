"""events.py: Stripe payloads of both API shapes -> our event types. The payloads are written out by hand after
Stripe's documented objects (trimmed), independent of the builder that `stripe send-event` uses."""

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from billing_webhooks.inbox import events
from billing_webhooks.inbox.events import (
    CheckoutCompleted,
    InvoicePayment,
    MalformedEvent,
    SubscriptionSnapshot,
    envelope,
    normalize,
    release_of,
    type_label,
)
from driftlock_kernel.billing import SubscriptionStatus

ORG = "6f0c2a4e-8d1b-4c3a-9e5f-0a1b2c3d4e5f"


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def wrap(event_type: str, obj: dict, *, api_version: str, created: int = 1_700_000_100, **extra: Any) -> dict:
    return {
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "api_version": api_version,
        "created": created,
        "data": {"object": obj, **extra},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def subscription(payload: dict) -> SubscriptionSnapshot:
    snapshot = normalize(envelope(payload))
    assert isinstance(snapshot, SubscriptionSnapshot)
    return snapshot


def invoice(payload: dict) -> InvoicePayment:
    payment = normalize(envelope(payload))
    assert isinstance(payment, InvoicePayment)
    return payment


def checkout(payload: dict) -> CheckoutCompleted:
    completed = normalize(envelope(payload))
    assert isinstance(completed, CheckoutCompleted)
    return completed


# A subscription as 2024-06-20 renders it: the period on the subscription.
LEGACY_SUBSCRIPTION: dict[str, Any] = {
    "id": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
    "object": "subscription",
    "billing_cycle_anchor": 1_679_609_767,
    "cancel_at_period_end": False,
    "created": 1_679_609_767,
    "currency": "usd",
    "current_period_end": 1_682_288_167,
    "current_period_start": 1_679_609_767,
    "customer": "cus_Na6dX7aXxi11N4",
    "items": {
        "object": "list",
        "data": [
            {
                "id": "si_Na6dzxczY5fwHx",
                "object": "subscription_item",
                "created": 1_679_609_768,
                "metadata": {},
                "plan": {"id": "price_1MowQULkdIwHu7ixraBm864M", "object": "plan", "amount": 1000},
                "price": {"id": "price_1MowQULkdIwHu7ixraBm864M", "object": "price", "unit_amount": 1000},
                "quantity": 1,
                "subscription": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
            }
        ],
        "has_more": False,
        "total_count": 1,
        "url": "/v1/subscription_items?subscription=sub_1MowQVLkdIwHu7ixeRlqHVzs",
    },
    "livemode": False,
    "metadata": {"org_id": ORG},
    "status": "active",
    "trial_end": None,
}

# The same subscription from basil on: no period on the subscription, one on each item.
BASIL_SUBSCRIPTION = copy.deepcopy(LEGACY_SUBSCRIPTION)
del BASIL_SUBSCRIPTION["current_period_start"], BASIL_SUBSCRIPTION["current_period_end"]
del BASIL_SUBSCRIPTION["items"]["total_count"]
BASIL_SUBSCRIPTION["items"]["data"][0].pop("plan")
BASIL_SUBSCRIPTION["items"]["data"][0].update(current_period_start=1_679_609_767, current_period_end=1_682_288_167)

LEGACY_INVOICE = {
    "id": "in_1MtHbELkdIwHu7ixl4OzzPMv",
    "object": "invoice",
    "amount_due": 1000,
    "amount_paid": 0,
    "attempt_count": 1,
    "billing_reason": "subscription_cycle",
    "created": 1_680_644_467,
    "customer": "cus_NeZwdNtLEOXuvB",
    "paid": False,
    "status": "open",
    "subscription": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
    "subscription_details": {"metadata": {"org_id": ORG}},
}

BASIL_INVOICE = {
    "id": "in_1MtHbELkdIwHu7ixl4OzzPMv",
    "object": "invoice",
    "amount_due": 1000,
    "amount_paid": 1000,
    "attempt_count": 1,
    "billing_reason": "subscription_cycle",
    "created": 1_680_644_467,
    "customer": "cus_NeZwdNtLEOXuvB",
    "parent": {
        "type": "subscription_details",
        "quote_details": None,
        "subscription_details": {"metadata": {"org_id": ORG}, "subscription": "sub_1MowQVLkdIwHu7ixeRlqHVzs"},
    },
    "status": "paid",
}

CHECKOUT_SESSION = {
    "id": "cs_test_a1b2c3",
    "object": "checkout.session",
    "client_reference_id": ORG,
    "created": 1_679_600_000,
    "customer": "cus_Na6dX7aXxi11N4",
    "metadata": {},
    "mode": "subscription",
    "payment_status": "paid",
    "status": "complete",
    "subscription": "sub_1MowQVLkdIwHu7ixeRlqHVzs",
}


@pytest.mark.parametrize(
    ("obj", "api_version"), [(LEGACY_SUBSCRIPTION, "2024-06-20"), (BASIL_SUBSCRIPTION, "2025-03-31.basil")]
)
def test_subscription_of_either_shape_normalises_to_the_same_snapshot(obj, api_version):
    snapshot = subscription(wrap("customer.subscription.updated", obj, api_version=api_version))
    assert snapshot == SubscriptionSnapshot(
        event_id="evt_1NG8Du2eZvKYlo2CUI79vXWy",
        created=at(1_700_000_100),
        subscription_id="sub_1MowQVLkdIwHu7ixeRlqHVzs",
        customer_id="cus_Na6dX7aXxi11N4",
        status=SubscriptionStatus.ACTIVE,
        price_ids=("price_1MowQULkdIwHu7ixraBm864M",),
        period_start=at(1_679_609_767),
        period_end=at(1_682_288_167),
        metadata_org_id=ORG,
        ended=False,
        trial_end=None,
        cancel_at_period_end=False,
    )


def test_the_shape_is_read_from_the_fields_not_the_claimed_version():
    legacy_claiming_basil = subscription(
        wrap("customer.subscription.created", LEGACY_SUBSCRIPTION, api_version="2025-03-31.basil")
    )
    basil_claiming_legacy = subscription(
        wrap("customer.subscription.created", BASIL_SUBSCRIPTION, api_version="2024-06-20")
    )
    assert legacy_claiming_basil.period_start == basil_claiming_legacy.period_start == at(1_679_609_767)


def test_deleted_subscription_is_ended_and_items_without_price_fall_back_to_plan():
    obj = copy.deepcopy(LEGACY_SUBSCRIPTION)
    obj["status"] = "canceled"
    obj["items"]["data"][0].pop("price")
    snapshot = subscription(wrap("customer.subscription.deleted", obj, api_version="2019-12-03"))
    assert snapshot.ended and snapshot.status == "canceled"
    assert snapshot.price_ids == ("price_1MowQULkdIwHu7ixraBm864M",)


def test_a_legacy_plan_with_a_chosen_id_is_a_price():
    obj = copy.deepcopy(LEGACY_SUBSCRIPTION)
    obj["items"]["data"][0]["price"] = {"id": "gold-monthly", "object": "price"}
    snapshot = subscription(wrap("customer.subscription.updated", obj, api_version="2019-12-03"))
    assert snapshot.price_ids == ("gold-monthly",)


def test_basil_items_with_several_prices_keep_their_order_and_the_first_period():
    obj = copy.deepcopy(BASIL_SUBSCRIPTION)
    second = copy.deepcopy(obj["items"]["data"][0])
    second["price"] = {"id": "price_addon", "object": "price"}
    second.update(current_period_start=1_679_609_000, current_period_end=1_682_000_000)
    obj["items"]["data"].append(second)
    snapshot = subscription(wrap("customer.subscription.updated", obj, api_version="2025-04-30.basil"))
    assert snapshot.price_ids == ("price_1MowQULkdIwHu7ixraBm864M", "price_addon")
    assert (snapshot.period_start, snapshot.period_end) == (at(1_679_609_767), at(1_682_288_167))


def test_trial_end_and_cancel_at_period_end_are_read():
    obj = {**BASIL_SUBSCRIPTION, "status": "trialing", "trial_end": 1_680_000_000, "cancel_at_period_end": True}
    snapshot = subscription(wrap("customer.subscription.trial_will_end", obj, api_version="2025-03-31.basil"))
    assert snapshot.trial_end == at(1_680_000_000)
    assert snapshot.cancel_at_period_end is True


def test_expanded_customer_object_is_read_by_its_id():
    obj = copy.deepcopy(BASIL_SUBSCRIPTION)
    obj["customer"] = {"id": "cus_Na6dX7aXxi11N4", "object": "customer"}
    assert (
        subscription(wrap("customer.subscription.created", obj, api_version="2025-03-31.basil")).customer_id
        == "cus_Na6dX7aXxi11N4"
    )


@pytest.mark.parametrize(
    ("event_type", "obj", "api_version", "succeeded"),
    [
        ("invoice.payment_failed", LEGACY_INVOICE, "2024-06-20", False),
        ("invoice.payment_succeeded", BASIL_INVOICE, "2025-03-31.basil", True),
        ("invoice.paid", BASIL_INVOICE, "2025-03-31.basil", True),
        ("invoice.paid", LEGACY_INVOICE, "2024-06-20", True),
    ],
)
def test_invoice_of_either_shape_names_its_subscription(event_type, obj, api_version, succeeded):
    payment = normalize(envelope(wrap(event_type, obj, api_version=api_version)))
    assert payment == InvoicePayment(
        event_id="evt_1NG8Du2eZvKYlo2CUI79vXWy",
        created=at(1_700_000_100),
        invoice_id="in_1MtHbELkdIwHu7ixl4OzzPMv",
        customer_id="cus_NeZwdNtLEOXuvB",
        subscription_id="sub_1MowQVLkdIwHu7ixeRlqHVzs",
        succeeded=succeeded,
        metadata_org_id=ORG,
    )


def test_invoice_without_a_subscription_has_none():
    one_off = {**BASIL_INVOICE, "parent": None}
    assert invoice(wrap("invoice.payment_succeeded", one_off, api_version="2025-03-31.basil")).subscription_id is None
    legacy_one_off = {**LEGACY_INVOICE, "subscription": None, "subscription_details": None}
    assert invoice(wrap("invoice.payment_failed", legacy_one_off, api_version="2024-06-20")).subscription_id is None


def test_checkout_names_the_org_by_client_reference_id_else_metadata():
    completed = checkout(wrap("checkout.session.completed", CHECKOUT_SESSION, api_version="2025-03-31.basil"))
    assert completed == CheckoutCompleted(
        event_id="evt_1NG8Du2eZvKYlo2CUI79vXWy",
        created=at(1_700_000_100),
        session_id="cs_test_a1b2c3",
        org_reference=ORG,
        customer_id="cus_Na6dX7aXxi11N4",
        subscription_id="sub_1MowQVLkdIwHu7ixeRlqHVzs",
        mode="subscription",
    )
    by_metadata = {**CHECKOUT_SESSION, "client_reference_id": None, "metadata": {"org_id": ORG}}
    assert checkout(wrap("checkout.session.completed", by_metadata, api_version="2024-06-20")).org_reference == ORG
    neither = {**CHECKOUT_SESSION, "client_reference_id": None}
    assert checkout(wrap("checkout.session.completed", neither, api_version="2024-06-20")).org_reference is None


@pytest.mark.parametrize(
    ("event_type", "status"), [("customer.subscription.paused", "paused"), ("customer.subscription.resumed", "active")]
)
def test_paused_and_resumed_subscriptions_are_snapshots_of_their_status(event_type, status):
    snapshot = normalize(
        envelope(wrap(event_type, {**BASIL_SUBSCRIPTION, "status": status}, api_version="2025-03-31.basil"))
    )
    assert isinstance(snapshot, SubscriptionSnapshot)
    assert (snapshot.status, snapshot.ended) == (status, False)


def test_a_nul_character_anywhere_in_a_payload_is_found():
    assert not events.contains_nul({"a": ["b", {"c": 1, "d": None}]})
    assert events.contains_nul({"a": ["b", {"c": "x\x00y"}]})
    assert events.contains_nul({"k\x00": 1})


def test_an_envelope_keeps_no_nul_from_the_fields_it_stores():
    payload = wrap("customer.subscription.updated", BASIL_SUBSCRIPTION, api_version="2025-03-31\x00.basil")
    assert envelope(payload).api_version is None
    with pytest.raises(MalformedEvent):
        envelope({**payload, "type": "customer.subscription.updated\x00"})


def test_unhandled_types_normalise_to_none():
    assert (
        normalize(envelope(wrap("charge.succeeded", {"id": "ch_1", "object": "charge"}, api_version="2024-06-20")))
        is None
    )


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"type": "x", "created": 1, "data": {"object": {}}},
        {"id": "evt 1", "type": "x", "created": 1, "data": {"object": {}}},
        {"id": "evt_1", "created": 1, "data": {"object": {}}},
        {"id": "evt_1", "type": "x", "created": "yesterday", "data": {"object": {}}},
        {"id": "evt_1", "type": "x", "created": 1},
        {"id": "evt_1", "type": "x", "created": 1, "data": {"object": "sub_1"}},
    ],
)
def test_a_body_that_is_not_an_event_is_malformed(payload):
    with pytest.raises(MalformedEvent):
        envelope(payload)


@pytest.mark.parametrize(
    ("event_type", "obj", "message"),
    [
        ("customer.subscription.updated", {**BASIL_SUBSCRIPTION, "status": "exploded"}, "unknown subscription status"),
        ("customer.subscription.updated", {**BASIL_SUBSCRIPTION, "customer": None}, "no customer"),
        ("customer.subscription.updated", {**BASIL_SUBSCRIPTION, "id": None}, "no valid 'id'"),
        ("invoice.payment_failed", {**LEGACY_INVOICE, "customer": None}, "no customer"),
    ],
)
def test_a_handled_event_missing_what_it_must_carry_is_malformed(event_type, obj, message):
    with pytest.raises(MalformedEvent, match=message):
        normalize(envelope(wrap(event_type, obj, api_version="2025-03-31.basil")))


def test_type_label_is_closed():
    assert type_label("invoice.payment_failed") == "invoice.payment_failed"
    assert type_label("charge.succeeded") == "other"
    assert type_label("anything a client could write") == "other"


@pytest.mark.parametrize(
    ("version", "label"),
    [
        ("2024-06-20", "legacy"),
        ("2019-12-03", "legacy"),
        ("2024-09-30.acacia", "acacia"),
        ("2025-03-31.basil", "basil"),
        ("2025-08-27.basil", "basil"),
        ("2025-09-30.clover", "clover"),
        ("2031-01-01.zinnia", "other"),
        ("drop table", "other"),
        (None, "none"),
    ],
)
def test_api_version_label_is_bounded(version, label):
    assert release_of(version) == label


def test_handled_types_are_the_contract_list():
    assert {t.value for t in events.HANDLED_TYPES} == {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.trial_will_end",
        "invoice.payment_succeeded",
        "invoice.payment_failed",
        "invoice.paid",
        "customer.subscription.paused",
        "customer.subscription.resumed",
    }

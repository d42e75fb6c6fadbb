"""Stripe-shaped events, built and signed on this machine, for `driftlock-gateway stripe send-event` and the tests.

The objects follow Stripe's documented shapes (trimmed of fields this service never reads, but keeping the ones
that moved between API versions): before 2025-03-31 a subscription carries `current_period_start/end` and an
invoice `subscription`/`subscription_details`/`paid`; from basil on, the periods sit on subscription items and
an invoice names its subscription under `parent.subscription_details`. Signatures follow Stripe's scheme:
`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. Nothing here calls Stripe.
"""

import hashlib
import hmac
import json
import secrets
import string
import time
import uuid
from typing import Any

from billing_webhooks.inbox.events import BASIL, EventType
from driftlock_kernel.billing import TERMINAL_STATUSES, SubscriptionStatus

DEFAULT_API_VERSION = "2025-03-31.basil"
LEGACY_API_VERSION = "2024-06-20"
DEFAULT_PRICE_ID = "price_driftlock_demo"
MONTH_SECONDS = 30 * 86400

DEFAULT_STATUS = {
    EventType.SUBSCRIPTION_CREATED: SubscriptionStatus.ACTIVE,
    EventType.SUBSCRIPTION_UPDATED: SubscriptionStatus.ACTIVE,
    EventType.SUBSCRIPTION_DELETED: SubscriptionStatus.CANCELED,
    EventType.SUBSCRIPTION_TRIAL_WILL_END: SubscriptionStatus.TRIALING,
    EventType.SUBSCRIPTION_PAUSED: SubscriptionStatus.PAUSED,
    EventType.SUBSCRIPTION_RESUMED: SubscriptionStatus.ACTIVE,
}

_BASE62 = string.digits + string.ascii_letters


def stripe_id(prefix: str, length: int = 24) -> str:
    return f"{prefix}_{''.join(secrets.choice(_BASE62) for _ in range(length))}"


def customer_for(org_id: uuid.UUID | str) -> str:
    """The customer id send-event uses for an organisation, the same every time, so that events sent one by one
    tell one coherent story."""
    return f"cus_dl{uuid.UUID(str(org_id)).hex[:14]}"


def subscription_for(org_id: uuid.UUID | str) -> str:
    return f"sub_dl{uuid.UUID(str(org_id)).hex[:14]}"


def is_basil(api_version: str) -> bool:
    return api_version[:10] >= BASIL


def _price(price_id: str, created: int) -> dict[str, Any]:
    return {
        "id": price_id,
        "object": "price",
        "active": True,
        "billing_scheme": "per_unit",
        "created": created,
        "currency": "usd",
        "livemode": False,
        "lookup_key": None,
        "metadata": {},
        "nickname": None,
        "product": "prod_" + hashlib.sha256(price_id.encode()).hexdigest()[:14],
        "recurring": {"interval": "month", "interval_count": 1, "trial_period_days": None, "usage_type": "licensed"},
        "tax_behavior": "unspecified",
        "type": "recurring",
        "unit_amount": 4900,
        "unit_amount_decimal": "4900",
    }


def subscription_object(
    *,
    subscription_id: str,
    customer_id: str,
    status: str,
    price_ids: tuple[str, ...] = (DEFAULT_PRICE_ID,),
    period_start: int,
    period_end: int | None = None,
    api_version: str = DEFAULT_API_VERSION,
    created: int | None = None,
    metadata: dict[str, str] | None = None,
    trial_end: int | None = None,
    cancel_at_period_end: bool = False,
) -> dict[str, Any]:
    period_end = period_end if period_end is not None else period_start + MONTH_SECONDS
    created = created if created is not None else period_start
    basil = is_basil(api_version)
    items = []
    for price_id in price_ids:
        item: dict[str, Any] = {
            "id": stripe_id("si", 14),
            "object": "subscription_item",
            "created": created,
            "discounts": [],
            "metadata": {},
            "price": _price(price_id, created),
            "quantity": 1,
            "subscription": subscription_id,
            "tax_rates": [],
        }
        if basil:
            item.update(current_period_start=period_start, current_period_end=period_end)
        else:
            # Before basil, items still carried the legacy `plan` beside `price`.
            item["plan"] = {"id": price_id, "object": "plan", "active": True, "amount": 4900, "interval": "month"}
        items.append(item)
    ended = status in TERMINAL_STATUSES
    sub: dict[str, Any] = {
        "id": subscription_id,
        "object": "subscription",
        "application": None,
        "automatic_tax": {"enabled": False, "liability": None},
        "billing_cycle_anchor": period_start,
        "cancel_at": period_end if cancel_at_period_end else None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": period_start if ended else None,
        "cancellation_details": {
            "comment": None,
            "feedback": None,
            "reason": "cancellation_requested" if ended else None,
        },
        "collection_method": "charge_automatically",
        "created": created,
        "currency": "usd",
        "customer": customer_id,
        "days_until_due": None,
        "default_payment_method": None,
        "description": None,
        "discounts": [],
        "ended_at": period_start if ended else None,
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        },
        "latest_invoice": stripe_id("in"),
        "livemode": False,
        "metadata": dict(metadata or {}),
        "pending_update": None,
        "schedule": None,
        "start_date": created,
        "status": status,
        "trial_end": trial_end,
        "trial_start": None if trial_end is None else created,
    }
    if basil:
        sub["billing_mode"] = {"type": "classic"}
    else:
        sub.update(current_period_start=period_start, current_period_end=period_end)
        sub["items"]["total_count"] = len(items)
    return sub


def invoice_object(
    *,
    customer_id: str,
    subscription_id: str | None,
    paid: bool,
    created: int,
    api_version: str = DEFAULT_API_VERSION,
    price_id: str = DEFAULT_PRICE_ID,
    metadata: dict[str, str] | None = None,
    invoice_id: str | None = None,
) -> dict[str, Any]:
    invoice_id = invoice_id or stripe_id("in")
    period = {"start": created, "end": created + MONTH_SECONDS}
    basil = is_basil(api_version)
    line: dict[str, Any] = {
        "id": stripe_id("il"),
        "object": "line_item",
        "amount": 4900,
        "currency": "usd",
        "description": "1 x DriftLock (at $49.00 / month)",
        "invoice": invoice_id,
        "livemode": False,
        "metadata": {},
        "period": period,
        "quantity": 1,
    }
    invoice: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "account_country": "US",
        "amount_due": 4900,
        "amount_paid": 4900 if paid else 0,
        "amount_remaining": 0 if paid else 4900,
        "attempt_count": 1,
        "attempted": True,
        "auto_advance": not paid,
        "billing_reason": "subscription_cycle" if subscription_id else "manual",
        "collection_method": "charge_automatically",
        "created": created,
        "currency": "usd",
        "customer": customer_id,
        "customer_email": "billing@example.com",
        "hosted_invoice_url": None,
        "livemode": False,
        "metadata": {},
        "next_payment_attempt": None if paid else created + 3 * 86400,
        "period_end": created,
        "period_start": created - MONTH_SECONDS,
        "status": "paid" if paid else "open",
        "status_transitions": {
            "finalized_at": created,
            "marked_uncollectible_at": None,
            "paid_at": created if paid else None,
            "voided_at": None,
        },
        "total": 4900,
    }
    if basil:
        invoice["parent"] = (
            {
                "type": "subscription_details",
                "quote_details": None,
                "subscription_details": {"metadata": dict(metadata or {}), "subscription": subscription_id},
            }
            if subscription_id
            else None
        )
        line["parent"] = (
            {
                "type": "subscription_item_details",
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": None,
                    "proration": False,
                    "proration_details": {"credited_items": None},
                    "subscription": subscription_id,
                    "subscription_item": stripe_id("si", 14),
                },
            }
            if subscription_id
            else None
        )
        line["pricing"] = {
            "type": "price_details",
            "price_details": {
                "price": price_id,
                "product": "prod_" + hashlib.sha256(price_id.encode()).hexdigest()[:14],
            },
            "unit_amount_decimal": "4900",
        }
    else:
        invoice.update(
            paid=paid,
            subscription=subscription_id,
            subscription_details={"metadata": dict(metadata or {})} if subscription_id else None,
        )
        line.update(
            price=_price(price_id, created),
            proration=False,
            subscription=subscription_id,
            subscription_item=stripe_id("si", 14),
            type="subscription",
        )
    invoice["lines"] = {"object": "list", "data": [line], "has_more": False, "url": f"/v1/invoices/{invoice_id}/lines"}
    return invoice


def checkout_session_object(
    *,
    customer_id: str | None,
    subscription_id: str | None,
    created: int,
    client_reference_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": stripe_id("cs_test", 58),
        "object": "checkout.session",
        "amount_subtotal": 4900,
        "amount_total": 4900,
        "client_reference_id": client_reference_id,
        "created": created,
        "currency": "usd",
        "customer": customer_id,
        "customer_creation": "always",
        "customer_details": {"email": "billing@example.com", "name": "Billing Contact"},
        "expires_at": created + 86400,
        "invoice": stripe_id("in"),
        "livemode": False,
        "metadata": dict(metadata or {}),
        "mode": "subscription",
        "payment_status": "paid",
        "status": "complete",
        "subscription": subscription_id,
        "success_url": "https://example.com/billing/success",
        "url": None,
    }


def event(
    event_type: str,
    data_object: dict[str, Any],
    *,
    created: int | None = None,
    api_version: str = DEFAULT_API_VERSION,
    event_id: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {"object": data_object}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or stripe_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def build_event(
    event_type: str,
    *,
    org_id: uuid.UUID | str,
    api_version: str = DEFAULT_API_VERSION,
    created: int | None = None,
    event_id: str | None = None,
    customer_id: str | None = None,
    subscription_id: str | None = None,
    price_ids: tuple[str, ...] = (DEFAULT_PRICE_ID,),
    status: str | None = None,
    period_start: int | None = None,
    org_metadata: bool = True,
    cancel_at_period_end: bool = False,
) -> dict[str, Any]:
    """A complete event of a handled type for one organisation, with that organisation's customer and
    subscription ids unless others are given."""
    created = int(time.time()) if created is None else created
    customer_id = customer_id or customer_for(org_id)
    subscription_id = subscription_id or subscription_for(org_id)
    metadata = {"org_id": str(org_id)} if org_metadata else {}
    if event_type == EventType.CHECKOUT_SESSION_COMPLETED:
        obj = checkout_session_object(
            customer_id=customer_id, subscription_id=subscription_id, created=created, client_reference_id=str(org_id)
        )
        return event(event_type, obj, created=created, api_version=api_version, event_id=event_id)
    if event_type in DEFAULT_STATUS:
        status = status or DEFAULT_STATUS[EventType(event_type)]
        start = period_start if period_start is not None else created - 86400
        obj = subscription_object(
            subscription_id=subscription_id,
            customer_id=customer_id,
            status=status,
            price_ids=price_ids,
            period_start=start,
            api_version=api_version,
            created=start,
            metadata=metadata,
            trial_end=created + 3 * 86400 if status == SubscriptionStatus.TRIALING else None,
            cancel_at_period_end=cancel_at_period_end,
        )
        previous = None
        if event_type == EventType.SUBSCRIPTION_UPDATED:
            previous = {"status": "incomplete" if status == SubscriptionStatus.ACTIVE else "active"}
        return event(
            event_type, obj, created=created, api_version=api_version, event_id=event_id, previous_attributes=previous
        )
    if event_type in (EventType.INVOICE_PAYMENT_SUCCEEDED, EventType.INVOICE_PAYMENT_FAILED, EventType.INVOICE_PAID):
        obj = invoice_object(
            customer_id=customer_id,
            subscription_id=subscription_id,
            paid=event_type != EventType.INVOICE_PAYMENT_FAILED,
            created=created,
            api_version=api_version,
            price_id=price_ids[0] if price_ids else DEFAULT_PRICE_ID,
            metadata=metadata,
        )
        return event(event_type, obj, created=created, api_version=api_version, event_id=event_id)
    raise ValueError(f"cannot build an event of type {event_type!r}")


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=2).encode()


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header Stripe would send for this body."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"

"""Stripe event payloads -> our own event types, for both API shapes, in one place.

Nothing else in the service reads Stripe's field names. Two shapes matter here:

- before 2025-03-31 ("basil"), a subscription's `current_period_start/end` sit on the subscription, and an
  invoice names its subscription in `invoice.subscription` (and `subscription_details.metadata`);
- from basil on, each subscription item has its own `current_period_start/end`, and an invoice names its
  subscription in `invoice.parent.subscription_details.subscription` (with `.metadata`).

The shape is read from the fields present, not from `api_version`, so an event of either shape is understood
whatever version it claims. Pure: no I/O.
"""

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from driftlock_kernel.billing import SubscriptionStatus


class EventType(StrEnum):
    """The Stripe event types this service handles; every other type is stored and ignored."""

    CHECKOUT_SESSION_COMPLETED = "checkout.session.completed"
    SUBSCRIPTION_CREATED = "customer.subscription.created"
    SUBSCRIPTION_UPDATED = "customer.subscription.updated"
    SUBSCRIPTION_DELETED = "customer.subscription.deleted"
    SUBSCRIPTION_TRIAL_WILL_END = "customer.subscription.trial_will_end"
    INVOICE_PAYMENT_SUCCEEDED = "invoice.payment_succeeded"
    INVOICE_PAYMENT_FAILED = "invoice.payment_failed"
    # Stripe recommends it over payment_succeeded; an invoice paid out of band sends only this one.
    INVOICE_PAID = "invoice.paid"
    SUBSCRIPTION_PAUSED = "customer.subscription.paused"
    SUBSCRIPTION_RESUMED = "customer.subscription.resumed"


HANDLED_TYPES = frozenset(EventType)
SUBSCRIPTION_TYPES = frozenset(
    {
        EventType.SUBSCRIPTION_CREATED,
        EventType.SUBSCRIPTION_UPDATED,
        EventType.SUBSCRIPTION_DELETED,
        EventType.SUBSCRIPTION_TRIAL_WILL_END,
        EventType.SUBSCRIPTION_PAUSED,
        EventType.SUBSCRIPTION_RESUMED,
    }
)
INVOICE_TYPES = frozenset(
    {EventType.INVOICE_PAYMENT_SUCCEEDED, EventType.INVOICE_PAYMENT_FAILED, EventType.INVOICE_PAID}
)

# The first API version in which periods live on subscription items and invoices name their parent.
BASIL = "2025-03-31"

# Stripe's own ids are letters, digits and underscores, but a legacy plan (and so its price) may carry an id its
# owner chose, like `gold-monthly`: any printable ASCII without spaces.
_STRIPE_ID = re.compile(r"[\x21-\x7e]{1,255}")


class MalformedEvent(ValueError):
    """A verified event that lacks what its type must carry; the message says what, without the payload."""


def type_label(event_type: str) -> str:
    """The event type as a metric label: one of the handled types, or 'other' (labels never carry free text)."""
    return event_type if event_type in HANDLED_TYPES else "other"


# Stripe's named releases (a major release and the monthly ones after it share its name). Versions before
# 2024-09-30 have a date only.
RELEASES = ("acacia", "basil", "clover", "dahlia", "endive")
_API_VERSION = re.compile(r"(\d{4}-\d{2}-\d{2})(?:\.([a-z]+))?")
# What is kept of an event's api_version: printable ASCII, as Stripe writes it.
_API_VERSION_TEXT = re.compile(r"[\x20-\x7e]{1,64}")


def contains_nul(value: Any) -> bool:
    """Whether a parsed JSON value holds U+0000 in a string (key or value): PostgreSQL's jsonb and text refuse it,
    although JSON allows it (written \\u0000)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(k) or contains_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(contains_nul(item) for item in value)
    return False


def release_of(api_version: str | None) -> str:
    """The API version as a metric label: its release name, 'legacy' for a dated version before the named
    releases, 'none' when the event carries none, 'other' for anything else."""
    if not api_version:
        return "none"
    match = _API_VERSION.fullmatch(api_version)
    if match is None:
        return "other"
    if match.group(2) is None:
        return "legacy" if match.group(1) < "2024-09-30" else "other"
    return match.group(2) if match.group(2) in RELEASES else "other"


# --- the envelope ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """The parts of any Stripe event that the inbox keeps, whatever its type."""

    id: str
    type: str
    api_version: str | None
    created: datetime
    livemode: bool
    data_object: dict[str, Any]


def envelope(payload: Any) -> Envelope:
    """Read the event envelope; raise MalformedEvent when the body is not a Stripe event at all."""
    if not isinstance(payload, dict):
        raise MalformedEvent("the body is not a JSON object")
    event_id = payload.get("id")
    if not isinstance(event_id, str) or not _STRIPE_ID.fullmatch(event_id):
        raise MalformedEvent("the event has no valid 'id'")
    event_type = payload.get("type")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 255 or "\x00" in event_type:
        raise MalformedEvent("the event has no 'type'")
    created = _timestamp(payload.get("created"))
    if created is None:
        raise MalformedEvent("the event has no valid 'created' time")
    api_version = payload.get("api_version")
    data = payload.get("data")
    data_object = data.get("object") if isinstance(data, dict) else None
    if not isinstance(data_object, dict):
        raise MalformedEvent("the event has no 'data.object'")
    return Envelope(
        id=event_id,
        type=event_type,
        api_version=api_version if isinstance(api_version, str) and _API_VERSION_TEXT.fullmatch(api_version) else None,
        created=created,
        livemode=payload.get("livemode") is True,
        data_object=data_object,
    )


# --- our event types ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckoutCompleted:
    event_id: str
    created: datetime
    session_id: str
    # The organisation as the session names it (client_reference_id, else metadata.org_id), unparsed: a
    # malformed value is the handler's to report.
    org_reference: str | None
    customer_id: str | None
    subscription_id: str | None
    mode: str | None


@dataclass(frozen=True, slots=True)
class SubscriptionSnapshot:
    """The whole subscription as one event reports it."""

    event_id: str
    created: datetime
    subscription_id: str
    customer_id: str
    status: SubscriptionStatus
    price_ids: tuple[str, ...]  # in item order
    # The current billing period (subscription-level before basil; from the items from basil on).
    period_start: datetime | None
    period_end: datetime | None
    metadata_org_id: str | None
    ended: bool  # customer.subscription.deleted
    trial_end: datetime | None
    cancel_at_period_end: bool
    # customer.subscription.trial_will_end: three days before a trial ends (the outcome says so).
    trial_will_end: bool = False


@dataclass(frozen=True, slots=True)
class InvoicePayment:
    event_id: str
    created: datetime
    invoice_id: str
    customer_id: str
    subscription_id: str | None  # None: not a subscription's invoice
    succeeded: bool
    metadata_org_id: str | None


BillingEvent = CheckoutCompleted | SubscriptionSnapshot | InvoicePayment


def normalize(event: Envelope) -> BillingEvent | None:
    """Our event for a handled type; None for a type we ignore. Raises MalformedEvent."""
    if event.type == EventType.CHECKOUT_SESSION_COMPLETED:
        return _checkout(event)
    if event.type in SUBSCRIPTION_TYPES:
        return _subscription(event)
    if event.type in INVOICE_TYPES:
        return _invoice(event)
    return None


def _checkout(event: Envelope) -> CheckoutCompleted:
    session = event.data_object
    metadata = _metadata(session)
    reference = _text(session.get("client_reference_id")) or _text(metadata.get("org_id"))
    return CheckoutCompleted(
        event_id=event.id,
        created=event.created,
        session_id=_required_id(session, "id", "checkout session"),
        org_reference=reference,
        customer_id=_expandable_id(session.get("customer")),
        subscription_id=_expandable_id(session.get("subscription")),
        mode=_text(session.get("mode")),
    )


def _subscription(event: Envelope) -> SubscriptionSnapshot:
    sub = event.data_object
    try:
        status = SubscriptionStatus(str(sub.get("status")))
    except ValueError:
        raise MalformedEvent(f"unknown subscription status {str(sub.get('status'))[:40]!r}") from None
    customer = _expandable_id(sub.get("customer"))
    if customer is None:
        raise MalformedEvent("the subscription has no customer")
    items = _items(sub)
    start, end = _subscription_period(sub, items)
    return SubscriptionSnapshot(
        event_id=event.id,
        created=event.created,
        subscription_id=_required_id(sub, "id", "subscription"),
        customer_id=customer,
        status=status,
        price_ids=tuple(price for price in (_item_price(item) for item in items) if price is not None),
        period_start=start,
        period_end=end,
        metadata_org_id=_text(_metadata(sub).get("org_id")),
        ended=event.type == EventType.SUBSCRIPTION_DELETED,
        trial_end=_timestamp(sub.get("trial_end")),
        cancel_at_period_end=sub.get("cancel_at_period_end") is True,
        trial_will_end=event.type == EventType.SUBSCRIPTION_TRIAL_WILL_END,
    )


def _invoice(event: Envelope) -> InvoicePayment:
    invoice = event.data_object
    customer = _expandable_id(invoice.get("customer"))
    if customer is None:
        raise MalformedEvent("the invoice has no customer")
    # From basil on: parent.subscription_details; before: the top-level subscription and subscription_details.
    parent = invoice.get("parent")
    parent = parent if isinstance(parent, dict) else {}
    details = parent.get("subscription_details")
    details = details if isinstance(details, dict) else None
    if details is not None:
        subscription = _expandable_id(details.get("subscription"))
        metadata = _metadata(details)
    else:
        subscription = _expandable_id(invoice.get("subscription"))
        legacy = invoice.get("subscription_details")
        metadata = _metadata(legacy) if isinstance(legacy, dict) else {}
    return InvoicePayment(
        event_id=event.id,
        created=event.created,
        invoice_id=_required_id(invoice, "id", "invoice"),
        customer_id=customer,
        subscription_id=subscription,
        succeeded=event.type != EventType.INVOICE_PAYMENT_FAILED,
        metadata_org_id=_text(metadata.get("org_id")),
    )


def parse_org_id(reference: str | None) -> uuid.UUID | None:
    """An organisation id as written in client_reference_id or metadata; None when absent or not a UUID."""
    if not reference:
        return None
    try:
        return uuid.UUID(reference)
    except ValueError:
        return None


# --- field readers -----------------------------------------------------------------------------------------


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**34:
        return None
    return datetime.fromtimestamp(value, UTC)


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip()[:255] or None


def _metadata(obj: dict) -> dict:
    metadata = obj.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def _expandable_id(value: Any) -> str | None:
    """A Stripe reference: an id string, or (when expanded) the object with its id."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and _STRIPE_ID.fullmatch(value) else None


def _required_id(obj: dict, field: str, what: str) -> str:
    value = _expandable_id(obj.get(field))
    if value is None:
        raise MalformedEvent(f"the {what} has no valid {field!r}")
    return value


def _items(sub: dict) -> list[dict]:
    items = sub.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def _item_price(item: dict) -> str | None:
    # `price` since 2020; older events name the same id as `plan`.
    return _expandable_id(item.get("price")) or _expandable_id(item.get("plan"))


def _subscription_period(sub: dict, items: list[dict]) -> tuple[datetime | None, datetime | None]:
    """The subscription's current period: its own fields before basil, else its items' (the first item that has
    one; in a subscription whose items bill on one cycle they all agree)."""
    candidates = [sub, *items]
    for obj in candidates:
        start, end = _timestamp(obj.get("current_period_start")), _timestamp(obj.get("current_period_end"))
        if start is not None and end is not None and start < end:
            return start, end
    return None, None

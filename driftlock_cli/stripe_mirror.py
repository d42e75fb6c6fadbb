"""What `stripe send-event` tells the local Stripe API (tests/support/stripe_api.py, the one `dev` runs), so
that Stripe's API and the played events tell one story: the customer and subscription an event names exist
there, a failed payment leaves the subscription `past_due` and a paid one `active`, as Stripe's own defaults do.
`stripe sync` then reads back what the events said, and repairs what a skipped webhook did not deliver.

Only a Stripe API on this machine is told, through its `/_local/` control surface (a prefix no Stripe path uses);
Stripe's own API is never written to.
"""

import ipaddress
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from billing_webhooks.inbox.events import EventType
from driftlock_cli import stripe_player
from driftlock_kernel.billing import SubscriptionStatus

_STATUS_AFTER_INVOICE = {
    EventType.INVOICE_PAYMENT_FAILED: SubscriptionStatus.PAST_DUE,
    EventType.INVOICE_PAYMENT_SUCCEEDED: SubscriptionStatus.ACTIVE,
    EventType.INVOICE_PAID: SubscriptionStatus.ACTIVE,
}


def local_stripe_base(api_base: str) -> str | None:
    """The Stripe API base when it is on this machine (plain HTTP on a loopback address), else None."""
    parts = urlsplit(api_base)
    host = parts.hostname or ""
    if parts.scheme != "http":
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None
    return api_base.rstrip("/") if loopback else None


def _id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) else None


async def tell_local_stripe(session: aiohttp.ClientSession, base: str, api_key: str, event: dict[str, Any]) -> bool:
    """Record at the local Stripe API what `event` says; False when `base` answers as no local Stripe API does."""
    obj = event["data"]["object"]
    event_type = event["type"]
    customer = _id(obj.get("customer"))
    try:
        if customer is not None and not await _post(session, f"{base}/_local/customers", {"id": customer}):
            return False
        subscription: dict[str, Any] | None = None
        if obj.get("object") == "subscription":
            subscription = obj
        elif event_type == EventType.CHECKOUT_SESSION_COMPLETED and _id(obj.get("subscription")) and customer:
            # A completed checkout in subscription mode leaves an active subscription behind.
            subscription = _subscription(event, _id(obj["subscription"]) or "", customer, SubscriptionStatus.ACTIVE)
        elif event_type in _STATUS_AFTER_INVOICE and customer:
            subscription_id = _invoice_subscription(obj)
            if subscription_id is not None:
                status = _STATUS_AFTER_INVOICE[EventType(event_type)]
                subscription = await _get(session, f"{base}/v1/subscriptions/{subscription_id}", api_key)
                if subscription is None:
                    subscription = _subscription(event, subscription_id, customer, status)
                subscription["status"] = str(status)
        if subscription is not None:
            return await _post(session, f"{base}/_local/subscriptions", subscription)
        return True
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
        return False


def _invoice_subscription(invoice: dict[str, Any]) -> str | None:
    parent = invoice.get("parent")
    details = (parent.get("subscription_details") if isinstance(parent, dict) else None) or {}
    return _id(details.get("subscription")) or _id(invoice.get("subscription"))


def _subscription(event: dict[str, Any], subscription_id: str, customer: str, status: str) -> dict[str, Any]:
    created = int(event["created"])
    org_id = (event["data"]["object"].get("metadata") or {}).get("org_id") or event["data"]["object"].get(
        "client_reference_id"
    )
    return stripe_player.subscription_object(
        subscription_id=subscription_id,
        customer_id=customer,
        status=status,
        period_start=created - 86400,
        api_version=event.get("api_version") or stripe_player.DEFAULT_API_VERSION,
        metadata={"org_id": org_id} if org_id else None,
    )


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bool:
    async with session.post(url, json=body) as response:
        return response.status == 200


async def _get(session: aiohttp.ClientSession, url: str, api_key: str) -> dict[str, Any] | None:
    async with session.get(url, headers={"Authorization": f"Bearer {api_key}"}) as response:
        if response.status != 200:
            return None
        found = await response.json()
        return found if isinstance(found, dict) else None

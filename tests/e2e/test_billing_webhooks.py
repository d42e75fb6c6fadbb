"""Stripe -> Envoy /stripe/webhook -> the webhook service -> PostgreSQL -> NOTIFY -> both authz replicas: an
organisation past its dunning grace gets 402 on billable routes, and a payment lifts it within a second."""

import asyncio
import time

from driftlock_cli import stripe_player
from tests.support.http import raw_request
from tests.support.net import eventually
from tests.support.stripe import metric

DETECT = "/api/v1/stream/detect"
INGEST = "/api/v1/stream/ingest"
DAY = 86400


async def deliver_through_envoy(gateway, event: dict):
    body = stripe_player.encode(event)
    headers = {"Stripe-Signature": stripe_player.sign(body, gateway.webhook_secret), "Content-Type": "application/json"}
    response = await raw_request(gateway.port, "POST", "/stripe/webhook", headers, body)
    assert response.status == 200, response.body
    return response.json()


async def test_payment_succeeded_lifts_payment_required_through_envoy_within_a_second(gateway, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    auth = {"Authorization": f"Bearer {secret}"}

    async def statuses(path: str = DETECT) -> list[int]:
        # Several at once: Envoy spreads them over both authz replicas.
        responses = await asyncio.gather(*(raw_request(gateway.port, "POST", path, auth, b"{}") for _ in range(6)))
        return [r.status for r in responses]

    assert set(await statuses()) == {200}  # both replicas now hold the key and its organisation
    now = int(time.time())
    checkout = stripe_player.build_event("checkout.session.completed", org_id=org.id, created=now - 9 * DAY)
    assert (await deliver_through_envoy(gateway, checkout))["outcome"] == "applied"
    failed = stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=now - 8 * DAY)
    assert (await deliver_through_envoy(gateway, failed))["outcome"] == "applied"

    async def all_payment_required() -> bool:
        return set(await statuses()) == {402}

    await eventually(all_payment_required, within=1.0, what="402 on detect once past_due is past the 7-day grace")
    denied = await raw_request(gateway.port, "POST", DETECT, auth, b"{}")
    assert denied.json()["error"]["code"] == "payment_required"
    assert set(await statuses(INGEST)) == {200}  # ingestion keeps working: no customer data is turned away

    succeeded = stripe_player.build_event("invoice.payment_succeeded", org_id=org.id)
    assert (await deliver_through_envoy(gateway, succeeded))["outcome"] == "applied"

    async def all_served() -> bool:
        return set(await statuses()) == {200}

    await eventually(all_served, within=1.0, what="the payment to lift payment_required on both replicas")
    applied = await metric(
        gateway.webhooks_url, "driftlock_webhook_events_total", type="invoice.payment_succeeded", outcome="applied"
    )
    assert applied >= 1


async def test_a_past_due_organisation_within_grace_keeps_full_service(gateway, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    auth = {"Authorization": f"Bearer {secret}"}
    now = int(time.time())
    await deliver_through_envoy(gateway, stripe_player.build_event("checkout.session.completed", org_id=org.id))
    failed = stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=now - 2 * DAY)
    assert (await deliver_through_envoy(gateway, failed))["outcome"] == "applied"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT billing_status FROM driftlock.organizations WHERE id = $1", org.id) == (
            "past_due"
        )
    responses = await asyncio.gather(*(raw_request(gateway.port, "POST", DETECT, auth, b"{}") for _ in range(4)))
    assert {r.status for r in responses} == {200}

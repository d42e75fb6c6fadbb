"""Billing events from Stripe's: each occurrence one event, however often Stripe delivers it or an operator
replays it."""

import time

import pytest

from driftlock_cli import stripe_player
from tests.support.cli import run_cli
from tests.support.net import free_port
from tests.support.stripe import InProcessWebhooks, Stripe


@pytest.fixture(scope="module")
async def service(database_url):
    webhooks = await InProcessWebhooks(database_url).start(free_port())
    yield webhooks
    await webhooks.stop()


@pytest.fixture
def stripe(service) -> Stripe:
    return Stripe(service.webhook_url)


async def events_of(pool, org_id, event_type: str) -> list[dict]:
    rows = await pool.fetch(
        "SELECT data FROM driftlock.events WHERE org_id = $1 AND type = $2 ORDER BY occurred_at", org_id, event_type
    )
    return [row["data"] for row in rows]


async def test_a_failed_payment_is_one_event_with_when_service_is_restricted_even_when_redelivered_and_replayed(
    stripe, make_org, pool, database_url
):
    org = await make_org()
    checkout = int(time.time())
    reply = (await stripe.send("checkout.session.completed", org_id=org.id, created=checkout))[1]
    assert reply.outcome == "applied"
    # Stripe's `created` has one-second resolution: the failure and the recovery come in later seconds, as they do
    # at Stripe (in the checkout's own second, an event is ordered against the subscription it made, and may lose).
    failed = stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=checkout + 2)
    assert (await stripe.deliver(failed)).outcome == "applied"
    assert (await stripe.deliver(failed)).outcome == "duplicate"
    replayed = run_cli("webhooks", "replay", failed["id"], "--json", database_url=database_url)
    assert replayed.json()["replayed"][0]["id"] == failed["id"]
    told = await events_of(pool, org.id, "billing.payment_failed")
    assert len(told) == 1
    assert told[0]["past_due_since"] and told[0]["restricts_at"] > told[0]["past_due_since"]
    # Paid: dunning ends, once.
    assert (await stripe.send("invoice.payment_succeeded", org_id=org.id, created=checkout + 4))[1].outcome == "applied"
    assert len(await events_of(pool, org.id, "billing.payment_recovered")) == 1


async def test_trial_will_end_is_one_event_per_trial(stripe, make_org, pool):
    org = await make_org()
    await stripe.send("checkout.session.completed", org_id=org.id)
    event = stripe_player.build_event("customer.subscription.trial_will_end", org_id=org.id)
    assert (await stripe.deliver(event)).outcome == "applied"
    again = stripe_player.build_event("customer.subscription.trial_will_end", org_id=org.id)
    again["data"]["object"]["trial_end"] = event["data"]["object"]["trial_end"]
    await stripe.deliver(again)  # Stripe's second word on the same trial
    told = await events_of(pool, org.id, "billing.trial_will_end")
    assert len(told) == 1 and told[0]["trial_end"]

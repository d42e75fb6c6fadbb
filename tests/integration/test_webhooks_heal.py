"""Stripe state that heals, over real HTTP and real PostgreSQL: an event stored as `failed` is applied again when
Stripe delivers it again; `webhooks replay` re-applies stored events; a payload jsonb cannot hold is stored as
received and applied; `invoice.paid` and `customer.subscription.paused|resumed` move the billing state."""

import asyncio
import json
import uuid

import pytest

from driftlock_cli import stripe_player
from tests.support.cli import run_cli
from tests.support.net import free_port
from tests.support.stripe import InProcessWebhooks, Stripe, now


@pytest.fixture(scope="module")
async def service(database_url):
    webhooks = await InProcessWebhooks(database_url).start(free_port())
    yield webhooks
    await webhooks.stop()


@pytest.fixture
def stripe(service) -> Stripe:
    return Stripe(service.webhook_url)


async def org_row(pool, org_id) -> dict:
    return dict(await pool.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org_id))


async def event_row(pool, event_id: str) -> dict:
    return dict(await pool.fetchrow("SELECT * FROM driftlock.stripe_events WHERE id = $1", event_id))


async def conflicting_checkout(stripe: Stripe, make_org, pool) -> tuple[dict, uuid.UUID, uuid.UUID]:
    """A checkout that fails: its customer already pays for another organisation."""
    owner, org = await make_org(), await make_org()
    customer = f"cus_{uuid.uuid4().hex[:14]}"
    await pool.execute("UPDATE driftlock.organizations SET stripe_customer_id = $2 WHERE id = $1", owner.id, customer)
    event, reply = await stripe.send("checkout.session.completed", org_id=org.id, customer_id=customer)
    assert (reply.status, reply.outcome) == (200, "failed"), reply.body
    return event, owner.id, org.id


async def test_a_failed_event_delivered_again_is_applied_not_taken_for_a_duplicate(stripe, make_org, pool):
    event, owner, org = await conflicting_checkout(stripe, make_org, pool)
    assert "already belongs to organisation" in (await event_row(pool, event["id"]))["detail"]
    # Stripe's retries (or a resend from the Dashboard) while the cause is there: still failed, counted.
    again = await stripe.deliver(event)
    assert (again.status, again.outcome) == (200, "failed")
    # The operator fixes the cause; the next delivery of the same event applies it.
    await pool.execute("UPDATE driftlock.organizations SET stripe_customer_id = NULL WHERE id = $1", owner)
    fixed = await stripe.deliver(event)
    assert (fixed.status, fixed.outcome) == (200, "applied"), fixed.body
    stored = await event_row(pool, event["id"])
    assert (stored["outcome"], stored["attempts"], stored["org_id"]) == ("applied", 3, org)
    assert stored["replayed_at"] is not None
    assert (await org_row(pool, org))["stripe_customer_id"] == event["data"]["object"]["customer"]
    # Applied now: a further delivery is a duplicate again.
    assert (await stripe.deliver(event)).outcome == "duplicate"


async def test_webhooks_replay_applies_a_fixed_failed_event_again(stripe, make_org, pool, database_url):
    event, owner, org = await conflicting_checkout(stripe, make_org, pool)
    await pool.execute("UPDATE driftlock.organizations SET stripe_customer_id = NULL WHERE id = $1", owner)
    result = (
        await asyncio.to_thread(run_cli, "webhooks", "replay", event["id"], "--json", database_url=database_url)
    ).json()
    assert result == {
        "replayed": [
            {
                "id": event["id"],
                "type": "checkout.session.completed",
                "previous_outcome": "failed",
                "outcome": "applied",
                "org_id": str(org),
                "detail": f"linked customer {event['data']['object']['customer']}",
            }
        ]
    }
    stored = await event_row(pool, event["id"])
    assert (stored["outcome"], stored["attempts"]) == ("applied", 2)


async def test_webhooks_replay_by_outcome_applies_deferred_events_whose_organisation_is_now_known(
    stripe, make_org, pool, database_url
):
    org = await make_org()
    customer = f"cus_{uuid.uuid4().hex[:14]}"
    event, reply = await stripe.send(
        "customer.subscription.updated", org_id=org.id, customer_id=customer, org_metadata=False, status="past_due"
    )
    assert reply.outcome == "deferred"
    # Linked outside Checkout (by hand, or an import): nothing would re-apply the deferred event by itself.
    await pool.execute("UPDATE driftlock.organizations SET stripe_customer_id = $2 WHERE id = $1", org.id, customer)
    replayed = (
        await asyncio.to_thread(
            run_cli, "webhooks", "replay", "--outcome", "deferred", "--since", "1h", "--json", database_url=database_url
        )
    ).json()["replayed"]
    mine = [r for r in replayed if r["id"] == event["id"]]
    assert [(r["previous_outcome"], r["outcome"]) for r in mine] == [("deferred", "applied")]
    assert (await org_row(pool, org.id))["billing_status"] == "past_due"


def test_webhooks_replay_needs_an_event_or_an_outcome_and_names_an_unknown_event(database_url):
    neither = run_cli("webhooks", "replay", database_url=database_url)
    assert neither.code == 1 and "EVENT_ID or --outcome" in neither.stderr and "Traceback" not in neither.stderr
    unknown = run_cli("webhooks", "replay", "evt_nothing_here", database_url=database_url)
    assert unknown.code == 1 and "no stored Stripe event with id 'evt_nothing_here'" in unknown.stderr


async def test_a_payload_with_a_nul_character_is_stored_as_received_and_applied(stripe, make_org, pool, database_url):
    org = await make_org()
    await stripe.send("checkout.session.completed", org_id=org.id)
    event = stripe_player.build_event("customer.subscription.updated", org_id=org.id, status="past_due")
    # JSON may carry U+0000 (Stripe passes on what a customer typed); jsonb cannot.
    event["data"]["object"]["description"] = "Acme\u0000 GmbH"
    body = json.dumps(event).encode()
    assert b"\\u0000" in body
    reply = await stripe.deliver(body)
    assert (reply.status, reply.outcome) == (200, "applied"), reply.body
    stored = await event_row(pool, event["id"])
    assert stored["payload"] is None and stored["payload_text"] == body.decode()
    assert (await org_row(pool, org.id))["billing_status"] == "past_due"
    # Replaying reads it back from the text, losslessly.
    result = (
        await asyncio.to_thread(run_cli, "webhooks", "replay", event["id"], "--json", database_url=database_url)
    ).json()
    assert result["replayed"][0]["previous_outcome"] == "applied"


async def test_invoice_paid_lifts_past_due_even_without_payment_succeeded(stripe, make_org, pool):
    org = await make_org()
    await stripe.send("checkout.session.completed", org_id=org.id)
    await stripe.send("invoice.payment_failed", org_id=org.id, created=now() - 60)
    assert (await org_row(pool, org.id))["billing_status"] == "past_due"
    _event, reply = await stripe.send("invoice.paid", org_id=org.id)  # paid out of band: no payment_succeeded
    assert (reply.status, reply.outcome) == (200, "applied")
    row = await org_row(pool, org.id)
    assert (row["billing_status"], row["past_due_since"]) == ("active", None)


async def test_a_paused_subscription_falls_back_and_a_resumed_one_is_in_force_again(stripe, make_org, pool):
    org = await make_org()
    await stripe.send("checkout.session.completed", org_id=org.id)
    await stripe.send("customer.subscription.created", org_id=org.id, created=now() - 120)
    _event, paused = await stripe.send("customer.subscription.paused", org_id=org.id, created=now() - 60)
    assert paused.outcome == "applied"
    assert (await org_row(pool, org.id))["billing_status"] == "paused"
    _event, resumed = await stripe.send("customer.subscription.resumed", org_id=org.id)
    assert resumed.outcome == "applied"
    assert (await org_row(pool, org.id))["billing_status"] == "active"

"""The webhook service over real HTTP against real PostgreSQL: every handled event type in both API shapes,
duplicates, disorder, the signature and body checks, and the outcomes and metrics an operator sees."""

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from driftlock_cli import stripe_player
from driftlock_kernel import plans
from tests.support.http import raw_request
from tests.support.net import free_port
from tests.support.stripe import OLD_SECRET, UNKNOWN_SECRET, InProcessWebhooks, Stripe, get, metric, now

BASIL = "2025-03-31.basil"
LEGACY = "2024-06-20"
BOTH_SHAPES = pytest.mark.parametrize("api_version", [LEGACY, BASIL])


@pytest.fixture(scope="module")
async def service(database_url):
    webhooks = await InProcessWebhooks(database_url).start(free_port())
    yield webhooks
    await webhooks.stop()


@pytest.fixture
def stripe(service) -> Stripe:
    return Stripe(service.webhook_url)


@pytest.fixture
def priced_plan(pool):
    async def make(included_units: int = 100_000) -> tuple[str, str]:
        name = f"pro-{uuid.uuid4().hex[:8]}"
        price = f"price_{uuid.uuid4().hex[:14]}"
        async with pool.acquire() as conn:
            await plans.upsert_plan(conn, name, included_units=included_units, stripe_price_ids=[price])
        return name, price

    return make


async def org_row(pool, org_id) -> dict:
    async with pool.acquire() as conn:
        return dict(await conn.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org_id))


async def event_row(pool, event_id: str) -> dict:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM driftlock.stripe_events WHERE id = $1", event_id)
    assert row is not None, f"event {event_id} was not stored"
    return dict(row)


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


async def checkout(stripe: Stripe, org_id, **options):
    event, reply = await stripe.send("checkout.session.completed", org_id=org_id, **options)
    assert reply.status == 200 and reply.outcome == "applied", reply.body
    return event


# --- each handled event type -----------------------------------------------------------------------------------


@BOTH_SHAPES
async def test_checkout_links_customer_and_subscription(stripe, make_org, pool, api_version):
    org = await make_org()
    event = await checkout(stripe, org.id, api_version=api_version)
    row = await org_row(pool, org.id)
    assert row["stripe_customer_id"] == stripe_player.customer_for(org.id)
    assert row["stripe_subscription_id"] == stripe_player.subscription_for(org.id)
    assert row["billing_status"] == "none"  # nothing is known about the subscription yet
    stored = await event_row(pool, event["id"])
    assert stored["type"] == "checkout.session.completed"
    assert stored["api_version"] == api_version
    assert stored["created"] == at(event["created"])
    assert stored["outcome"] == "applied" and stored["org_id"] == org.id
    assert stored["payload"] == event
    assert stored["processed_at"] >= stored["received_at"]


@BOTH_SHAPES
async def test_subscription_created_sets_status_plan_period_and_trial(stripe, make_org, pool, priced_plan, api_version):
    plan, price = await priced_plan()
    org = await make_org()
    await checkout(stripe, org.id)
    start = now() - 3600
    event = stripe_player.event(
        "customer.subscription.created",
        stripe_player.subscription_object(
            subscription_id=stripe_player.subscription_for(org.id),
            customer_id=stripe_player.customer_for(org.id),
            status="trialing",
            price_ids=(price,),
            period_start=start,
            api_version=api_version,
            trial_end=start + 14 * 86400,
            cancel_at_period_end=True,
        ),
        api_version=api_version,
    )
    reply = await stripe.deliver(event)
    assert (reply.status, reply.outcome) == (200, "applied"), reply.body
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "trialing"
    assert row["plan_name"] == plan
    assert (row["period_start"], row["period_end"]) == (at(start), at(start + stripe_player.MONTH_SECONDS))
    assert row["trial_end"] == at(start + 14 * 86400)
    assert row["cancel_at_period_end"] is True


@BOTH_SHAPES
async def test_subscription_updated_moves_to_the_plan_of_the_new_price(
    stripe, make_org, pool, priced_plan, api_version
):
    (basic, basic_price), (pro, pro_price) = await priced_plan(), await priced_plan()
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    _, reply = await stripe.send(
        "customer.subscription.created",
        org_id=org.id,
        price_ids=(basic_price,),
        created=t - 10,
        api_version=api_version,
    )
    assert reply.outcome == "applied"
    assert (await org_row(pool, org.id))["plan_name"] == basic
    _, reply = await stripe.send(
        "customer.subscription.updated", org_id=org.id, price_ids=(pro_price,), created=t, api_version=api_version
    )
    assert reply.outcome == "applied"
    row = await org_row(pool, org.id)
    assert row["plan_name"] == pro and row["billing_status"] == "active"


@BOTH_SHAPES
async def test_subscription_deleted_cancels_and_falls_back_to_free(stripe, make_org, pool, priced_plan, api_version):
    _plan, price = await priced_plan()
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    await stripe.send("customer.subscription.created", org_id=org.id, price_ids=(price,), created=t - 10)
    _, reply = await stripe.send(
        "customer.subscription.deleted", org_id=org.id, price_ids=(price,), created=t, api_version=api_version
    )
    assert (reply.status, reply.outcome) == (200, "applied")
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "canceled" and row["plan_name"] == "free"
    assert row["period_start"] is None and row["period_end"] is None


@BOTH_SHAPES
async def test_trial_will_end_is_kept_as_a_notification_and_counted(stripe, service, make_org, pool, api_version):
    org = await make_org()
    await checkout(stripe, org.id)
    before = await metric(
        service.base_url,
        "driftlock_webhook_events_total",
        type="customer.subscription.trial_will_end",
        outcome="applied",
    )
    event, reply = await stripe.send("customer.subscription.trial_will_end", org_id=org.id, api_version=api_version)
    assert (reply.status, reply.outcome) == (200, "applied")
    stored = await event_row(pool, event["id"])
    assert stored["detail"].startswith("trial ends ")
    assert (await org_row(pool, org.id))["trial_end"] == at(event["data"]["object"]["trial_end"])
    after = await metric(
        service.base_url,
        "driftlock_webhook_events_total",
        type="customer.subscription.trial_will_end",
        outcome="applied",
    )
    assert after == before + 1


@BOTH_SHAPES
async def test_payment_failed_starts_dunning_and_keeps_the_first_failure_time(stripe, make_org, pool, api_version):
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    await stripe.send("customer.subscription.created", org_id=org.id, created=t - 100, api_version=api_version)
    _, reply = await stripe.send("invoice.payment_failed", org_id=org.id, created=t - 50, api_version=api_version)
    assert (reply.status, reply.outcome) == (200, "applied")
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "past_due" and row["past_due_since"] == at(t - 50)
    _, reply = await stripe.send("invoice.payment_failed", org_id=org.id, created=t, api_version=api_version)
    assert reply.outcome == "applied"
    assert (await org_row(pool, org.id))["past_due_since"] == at(t - 50)


@BOTH_SHAPES
async def test_payment_succeeded_clears_dunning(stripe, make_org, pool, api_version):
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    await stripe.send("invoice.payment_failed", org_id=org.id, created=t - 50, api_version=api_version)
    _, reply = await stripe.send("invoice.payment_succeeded", org_id=org.id, created=t, api_version=api_version)
    assert (reply.status, reply.outcome) == (200, "applied")
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "active" and row["past_due_since"] is None


async def test_unhandled_type_is_stored_and_ignored(stripe, service, pool):
    before = await metric(service.base_url, "driftlock_webhook_events_total", type="other", outcome="ignored")
    event = stripe_player.event("charge.succeeded", {"id": "ch_3MmlLrLkdIwHu7ix0snN0B15", "object": "charge"})
    reply = await stripe.deliver(event)
    assert (reply.status, reply.outcome) == (200, "ignored")
    assert (await event_row(pool, event["id"]))["outcome"] == "ignored"
    assert (
        await metric(service.base_url, "driftlock_webhook_events_total", type="other", outcome="ignored") == before + 1
    )


async def test_a_one_off_invoice_is_ignored(stripe, make_org, pool):
    org = await make_org()
    await checkout(stripe, org.id)
    invoice = stripe_player.invoice_object(
        customer_id=stripe_player.customer_for(org.id), subscription_id=None, paid=False, created=now()
    )
    reply = await stripe.deliver(stripe_player.event("invoice.payment_failed", invoice))
    assert (reply.status, reply.outcome) == (200, "ignored")
    assert (await org_row(pool, org.id))["billing_status"] == "none"


# --- duplicates ------------------------------------------------------------------------------------------------


async def test_a_second_delivery_changes_nothing(stripe, service, make_org, pool):
    org = await make_org()
    await checkout(stripe, org.id)
    event = stripe_player.build_event("invoice.payment_failed", org_id=org.id)
    assert (await stripe.deliver(event)).outcome == "applied"
    # An operator (or a later event) changes the state; the redelivery must not undo that.
    async with pool.acquire() as conn:
        await conn.execute("UPDATE driftlock.organizations SET billing_status = 'active' WHERE id = $1", org.id)
    before = await metric(
        service.base_url, "driftlock_webhook_events_total", type="invoice.payment_failed", outcome="duplicate"
    )
    reply = await stripe.deliver(event)
    assert (reply.status, reply.outcome) == (200, "duplicate")
    assert (await org_row(pool, org.id))["billing_status"] == "active"
    assert (await event_row(pool, event["id"]))["outcome"] == "applied"
    after = await metric(
        service.base_url, "driftlock_webhook_events_total", type="invoice.payment_failed", outcome="duplicate"
    )
    assert after == before + 1


async def test_simultaneous_deliveries_of_one_event_apply_it_once(stripe, make_org, pool):
    org = await make_org()
    await checkout(stripe, org.id)
    event = stripe_player.build_event("invoice.payment_failed", org_id=org.id)
    # Watch the organisation's row: a second application would update it again.
    async with pool.acquire() as conn:
        updated_before = (await org_row(pool, org.id))["updated_at"]
        replies = await asyncio.gather(*(stripe.deliver(event) for _ in range(8)))
        rows = await conn.fetchval("SELECT count(*) FROM driftlock.stripe_events WHERE id = $1", event["id"])
    assert all(reply.status == 200 for reply in replies)
    assert sorted(reply.outcome for reply in replies) == ["applied"] + ["duplicate"] * 7
    assert rows == 1
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "past_due" and row["updated_at"] > updated_before
    # Re-delivering once more still changes nothing.
    updated_after = row["updated_at"]
    assert (await stripe.deliver(event)).outcome == "duplicate"
    assert (await org_row(pool, org.id))["updated_at"] == updated_after


async def test_simultaneous_different_events_of_one_customer_end_in_the_newest_state(stripe, make_org, pool):
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    statuses = ["active", "past_due", "unpaid", "active", "past_due", "active"]
    events = [
        stripe_player.build_event("customer.subscription.updated", org_id=org.id, status=status, created=t - 60 + i)
        for i, status in enumerate(statuses)
    ]
    replies = await asyncio.gather(*(stripe.deliver(event) for event in events))
    assert all(reply.status == 200 for reply in replies)
    assert (await org_row(pool, org.id))["billing_status"] == statuses[-1]


# --- disorder --------------------------------------------------------------------------------------------------


async def test_out_of_order_subscription_updates_keep_the_newest(stripe, make_org, pool, priced_plan):
    (_basic, basic_price), (pro, pro_price) = await priced_plan(), await priced_plan()
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    newer = stripe_player.build_event("customer.subscription.updated", org_id=org.id, price_ids=(pro_price,), created=t)
    older = stripe_player.build_event(
        "customer.subscription.updated", org_id=org.id, price_ids=(basic_price,), status="past_due", created=t - 30
    )
    assert (await stripe.deliver(newer)).outcome == "applied"
    reply = await stripe.deliver(older)
    assert (reply.status, reply.outcome) == (200, "skipped_stale")
    row = await org_row(pool, org.id)
    assert row["plan_name"] == pro and row["billing_status"] == "active"
    assert (await event_row(pool, older["id"]))["outcome"] == "skipped_stale"


async def test_same_second_created_and_updated_end_active_whichever_arrives_first(stripe, make_org, pool):
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    created = stripe_player.build_event("customer.subscription.created", org_id=org.id, status="incomplete", created=t)
    updated = stripe_player.build_event("customer.subscription.updated", org_id=org.id, status="active", created=t)
    assert (await stripe.deliver(updated)).outcome == "applied"
    assert (await stripe.deliver(created)).outcome == "skipped_stale"
    assert (await org_row(pool, org.id))["billing_status"] == "active"


async def test_old_payment_failure_does_not_reopen_dunning_after_a_newer_payment(stripe, make_org, pool):
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    succeeded = stripe_player.build_event("invoice.payment_succeeded", org_id=org.id, created=t)
    failed = stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=t - 3600)
    assert (await stripe.deliver(succeeded)).outcome == "applied"
    assert (await stripe.deliver(failed)).outcome == "skipped_stale"
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "active" and row["past_due_since"] is None


async def test_a_late_deletion_of_the_old_subscription_does_not_cancel_the_new_one(stripe, make_org, pool, priced_plan):
    plan, price = await priced_plan()
    org = await make_org()
    await checkout(stripe, org.id, subscription_id="sub_old" + uuid.uuid4().hex[:10])
    old = (await org_row(pool, org.id))["stripe_subscription_id"]
    new = "sub_new" + uuid.uuid4().hex[:10]
    t = now()
    await stripe.send("customer.subscription.created", org_id=org.id, subscription_id=old, created=t - 100)
    await stripe.send(
        "customer.subscription.created", org_id=org.id, subscription_id=new, price_ids=(price,), created=t
    )
    _, reply = await stripe.send("customer.subscription.deleted", org_id=org.id, subscription_id=old, created=t - 10)
    assert reply.outcome == "applied"
    row = await org_row(pool, org.id)
    assert row["stripe_subscription_id"] == new
    assert row["billing_status"] == "active" and row["plan_name"] == plan


# --- subscription before checkout --------------------------------------------------------------------------------


@BOTH_SHAPES
async def test_subscription_before_checkout_applies_through_metadata_org_id(
    stripe, make_org, pool, priced_plan, api_version
):
    plan, price = await priced_plan()
    org = await make_org()
    _, reply = await stripe.send(
        "customer.subscription.created", org_id=org.id, price_ids=(price,), api_version=api_version
    )
    assert (reply.status, reply.outcome) == (200, "applied"), reply.body
    row = await org_row(pool, org.id)
    assert row["plan_name"] == plan and row["billing_status"] == "active"
    assert row["stripe_customer_id"] == stripe_player.customer_for(org.id)
    # The checkout arriving afterwards links what is already linked and changes nothing else.
    await checkout(stripe, org.id)
    assert (await org_row(pool, org.id))["plan_name"] == plan


@BOTH_SHAPES
async def test_subscription_and_invoice_before_checkout_are_kept_and_linked_later(
    stripe, make_org, pool, priced_plan, api_version
):
    plan, price = await priced_plan()
    org = await make_org()
    t = now()
    _, created = await stripe.send(
        "customer.subscription.created",
        org_id=org.id,
        price_ids=(price,),
        org_metadata=False,
        created=t - 20,
        api_version=api_version,
    )
    _, failed = await stripe.send(
        "invoice.payment_failed", org_id=org.id, org_metadata=False, created=t - 10, api_version=api_version
    )
    assert (created.status, created.outcome) == (200, "deferred")
    assert (failed.status, failed.outcome) == (200, "deferred")
    assert (await org_row(pool, org.id))["billing_status"] == "none"
    await checkout(stripe, org.id, created=t)
    row = await org_row(pool, org.id)
    assert row["plan_name"] == plan
    assert row["billing_status"] == "past_due" and row["past_due_since"] == at(t - 10)
    assert row["stripe_subscription_id"] == stripe_player.subscription_for(org.id)


# --- what an operator must see -------------------------------------------------------------------------------------


async def test_unknown_price_keeps_the_plan_and_is_reported(stripe, service, make_org, pool, priced_plan, caplog):
    plan, price = await priced_plan()
    org = await make_org()
    await checkout(stripe, org.id)
    t = now()
    await stripe.send("customer.subscription.created", org_id=org.id, price_ids=(price,), created=t - 10)
    before = await metric(service.base_url, "driftlock_webhook_problems_total", problem="unknown_price")
    with caplog.at_level(logging.INFO, logger="billing_webhooks"):
        event, reply = await stripe.send(
            "customer.subscription.updated",
            org_id=org.id,
            price_ids=("price_nobody_knows",),
            status="past_due",
            created=t,
        )
    assert (reply.status, reply.outcome) == (200, "applied")
    row = await org_row(pool, org.id)
    assert row["plan_name"] == plan and row["billing_status"] == "past_due"
    detail = (await event_row(pool, event["id"]))["detail"]
    assert "price_nobody_knows" in detail and "plan kept" in detail
    assert await metric(service.base_url, "driftlock_webhook_problems_total", problem="unknown_price") == before + 1
    assert any(r.levelno == logging.WARNING and event["id"] in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("reference", "problem"),
    [(str(uuid.UUID(int=7)), "unknown_org"), ("org-acme", "malformed_org_id"), (None, "malformed_org_id")],
)
async def test_checkout_for_an_unknown_or_malformed_org_is_failed_with_2xx(
    stripe, service, pool, caplog, reference, problem
):
    session = stripe_player.checkout_session_object(
        customer_id="cus_" + uuid.uuid4().hex[:14],
        subscription_id="sub_" + uuid.uuid4().hex[:14],
        created=now(),
        client_reference_id=reference,
    )
    event = stripe_player.event("checkout.session.completed", session)
    before = await metric(service.base_url, "driftlock_webhook_problems_total", problem=problem)
    failed_before = await metric(
        service.base_url, "driftlock_webhook_events_total", type="checkout.session.completed", outcome="failed"
    )
    with caplog.at_level(logging.INFO, logger="billing_webhooks"):
        reply = await stripe.deliver(event)
    assert (reply.status, reply.outcome) == (200, "failed")
    stored = await event_row(pool, event["id"])
    assert stored["outcome"] == "failed" and stored["detail"]
    assert await metric(service.base_url, "driftlock_webhook_problems_total", problem=problem) == before + 1
    assert (
        await metric(
            service.base_url, "driftlock_webhook_events_total", type="checkout.session.completed", outcome="failed"
        )
        == failed_before + 1
    )
    assert any(r.levelno == logging.WARNING and event["id"] in r.getMessage() for r in caplog.records)


async def test_checkout_by_metadata_org_id(stripe, make_org, pool):
    org = await make_org()
    session = stripe_player.checkout_session_object(
        customer_id=stripe_player.customer_for(org.id),
        subscription_id=stripe_player.subscription_for(org.id),
        created=now(),
        metadata={"org_id": str(org.id)},
    )
    reply = await stripe.deliver(stripe_player.event("checkout.session.completed", session))
    assert reply.outcome == "applied"
    assert (await org_row(pool, org.id))["stripe_customer_id"] == stripe_player.customer_for(org.id)


async def test_a_customer_cannot_be_linked_to_a_second_org(stripe, make_org, pool):
    first, second = await make_org(), await make_org()
    customer = stripe_player.customer_for(first.id)
    await checkout(stripe, first.id)
    _, reply = await stripe.send("checkout.session.completed", org_id=second.id, customer_id=customer)
    assert (reply.status, reply.outcome) == (200, "failed")
    assert (await org_row(pool, second.id))["stripe_customer_id"] is None


async def test_a_newer_checkout_relinks_the_customer_and_a_late_older_one_does_not(stripe, make_org, pool):
    org = await make_org()
    t = now()
    first, second, late = ("cus_" + uuid.uuid4().hex[:14] for _ in range(3))
    await checkout(stripe, org.id, customer_id=first, created=t - 20)
    await checkout(stripe, org.id, customer_id=second, created=t)
    assert (await org_row(pool, org.id))["stripe_customer_id"] == second
    _, reply = await stripe.send("checkout.session.completed", org_id=org.id, customer_id=late, created=t - 10)
    assert (reply.status, reply.outcome) == (200, "skipped_stale")
    assert (await org_row(pool, org.id))["stripe_customer_id"] == second


async def test_a_malformed_object_is_failed_not_retried(stripe, pool):
    event = stripe_player.event("customer.subscription.updated", {"id": "sub_x", "object": "subscription"})
    reply = await stripe.deliver(event)
    assert (reply.status, reply.outcome) == (200, "failed")
    assert "malformed" in (await event_row(pool, event["id"]))["detail"]


# --- the wire: signature and body ---------------------------------------------------------------------------------


async def signature_failures(service, reason: str) -> float:
    return await metric(service.base_url, "driftlock_webhook_signature_failures_total", reason=reason)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("body", "mismatch"),
        ("wrong_secret", "mismatch"),
        ("stale", "expired"),
        ("missing", "missing"),
        ("garbage", "malformed"),
    ],
)
async def test_bad_signatures_are_400_and_store_nothing(stripe, service, make_org, pool, tamper, reason):
    org = await make_org()
    event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
    body = stripe_player.encode(event)
    options: dict = {}
    if tamper == "body":
        options["signature"] = stripe_player.sign(body, stripe.secret)
        body = body.replace(str(org.id).encode(), str(uuid.uuid4()).encode())
    elif tamper == "wrong_secret":
        options["secret"] = UNKNOWN_SECRET
    elif tamper == "stale":
        options["timestamp"] = now() - 301
    elif tamper == "missing":
        options["signature"] = ""
    elif tamper == "garbage":
        options["signature"] = "v0=abc"
    before = await signature_failures(service, reason)
    reply = await stripe.deliver(body, **options)
    assert reply.status == 400, reply.body
    assert reply.body["error"]["code"] == "invalid_signature"
    assert await signature_failures(service, reason) == before + 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM driftlock.stripe_events WHERE id = $1", event["id"]) == 0


async def test_the_second_secret_verifies_during_a_rotation(stripe, make_org, pool):
    org = await make_org()
    event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
    reply = await stripe.deliver(event, secret=OLD_SECRET)
    assert (reply.status, reply.outcome) == (200, "applied")


async def test_a_header_signed_with_both_secrets_verifies(stripe, make_org):
    org = await make_org()
    body = stripe_player.encode(stripe_player.build_event("checkout.session.completed", org_id=org.id))
    t = now()
    old = stripe_player.sign(body, OLD_SECRET, t)
    unknown = stripe_player.sign(body, UNKNOWN_SECRET, t)
    header = f"{unknown},{old.split(',')[1]}"
    assert (await stripe.deliver(body, signature=header)).status == 200


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[]", b'{"id": "evt_1"}', b"\xff\xfe not utf-8"],
    ids=["not-json", "array", "no-type", "not-utf8"],
)
async def test_a_signed_body_that_is_not_an_event_is_400(stripe, service, body):
    before = await metric(service.base_url, "driftlock_webhook_rejected_total", reason="malformed_body")
    reply = await stripe.deliver(body)  # correctly signed
    assert reply.status == 400
    assert reply.body["error"]["code"] == "malformed_body"
    assert await metric(service.base_url, "driftlock_webhook_rejected_total", reason="malformed_body") == before + 1


async def test_a_body_past_one_mebibyte_is_413(stripe, make_org, pool):
    org = await make_org()
    event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
    body = stripe_player.encode(event)
    padded = body[:-1] + b"," + b'"padding":"' + b"x" * (1024 * 1024 - len(body) - 13) + b'"}'
    assert len(padded) == 1024 * 1024
    assert (await stripe.deliver(padded)).status == 200  # exactly 1 MiB is allowed
    event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
    oversized = stripe_player.encode(event)[:-1] + b',"padding":"' + b"x" * (1024 * 1024) + b'"}'
    reply = await stripe.deliver(oversized)
    assert reply.status == 413
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM driftlock.stripe_events WHERE id = $1", event["id"]) == 0


async def test_a_chunked_body_past_one_mebibyte_is_413(service):
    import aiohttp

    async def chunks():
        for _ in range(17):
            yield b"x" * 65536

    async with aiohttp.ClientSession() as session:
        async with session.post(service.webhook_url, data=chunks(), headers={"Stripe-Signature": "t=1,v1=00"}) as r:
            assert r.status == 413


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_another_method_than_post_is_a_json_405_allowing_post(service, pool, method):
    before = await pool.fetchval("SELECT count(*) FROM driftlock.stripe_events")
    request_id = f"req-{uuid.uuid4()}"
    reply = await raw_request(service.port, method, "/stripe/webhook", {"x-request-id": request_id}, b"{}")
    assert (reply.status, reply.headers.get("allow")) == (405, "POST")
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {
        "error": {"code": "method_not_allowed", "message": "This route takes POST only.", "request_id": request_id}
    }
    assert await pool.fetchval("SELECT count(*) FROM driftlock.stripe_events") == before


async def test_a_path_the_service_does_not_serve_is_a_json_404(service):
    reply = await raw_request(service.port, "GET", "/stripe/webhooks", {"x-request-id": "req-404"})
    assert reply.status == 404 and reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"] == {"code": "not_found", "message": "No such route.", "request_id": "req-404"}


# --- health and metrics ------------------------------------------------------------------------------------------


async def test_healthz_and_metrics(service):
    status, body = await get(f"{service.base_url}/healthz")
    assert status == 200 and '"ok"' in body
    status, text = await get(f"{service.base_url}/metrics")
    assert status == 200
    for name in (
        "driftlock_webhook_events_total",
        "driftlock_webhook_signature_failures_total",
        "driftlock_webhook_handling_duration_seconds_bucket",
        "driftlock_webhook_api_versions_total",
    ):
        assert name in text


async def test_api_versions_are_counted_by_release(stripe, service, make_org):
    org = await make_org()
    before = await metric(service.base_url, "driftlock_webhook_api_versions_total", release="legacy")
    await stripe.send("checkout.session.completed", org_id=org.id, api_version=LEGACY)
    assert await metric(service.base_url, "driftlock_webhook_api_versions_total", release="legacy") == before + 1


# --- retention ---------------------------------------------------------------------------------------------------


async def test_prune_deletes_only_events_received_before_the_cutoff(stripe, make_org, pool):
    from driftlock_kernel.retention import TABLES, prune_table

    org = await make_org()
    old = await checkout(stripe, org.id)
    recent = await checkout(stripe, org.id)
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE driftlock.stripe_events SET received_at = now() - interval '40 days' WHERE id = $1", old["id"]
        )
        deleted = await prune_table(conn, TABLES["stripe_events"], timedelta(days=30), batch=1)
        remaining = {
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM driftlock.stripe_events WHERE id = ANY($1::text[])", [old["id"], recent["id"]]
            )
        }
    assert deleted >= 1
    assert remaining == {recent["id"]}


async def test_dunning_starts_at_the_earliest_failure_whatever_the_delivery_order(stripe, make_org, pool):
    """Failures 9, 6 and 4 days ago and the past_due update they cause, delivered in every order: the episode
    starts 9 days ago each time, so with a 7-day grace billable calls are refused in every order."""
    import itertools

    from driftlock_kernel.billing import DEFAULT_POLICY, BillingStatus, payment_blocks_billable

    t, day = now(), 86400
    starts = set()
    for order in itertools.permutations(range(4)):
        org = await make_org()
        await checkout(stripe, org.id, created=t - 40 * day)
        await stripe.send("customer.subscription.created", org_id=org.id, created=t - 30 * day, status="active")
        story = [
            stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=t - 9 * day),
            stripe_player.build_event(
                "customer.subscription.updated", org_id=org.id, status="past_due", created=t - 9 * day + 1
            ),
            stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=t - 6 * day),
            stripe_player.build_event("invoice.payment_failed", org_id=org.id, created=t - 4 * day),
        ]
        for index in order:
            reply = await stripe.deliver(story[index])
            assert reply.status == 200 and reply.outcome in ("applied", "skipped_stale"), reply.body
        row = await org_row(pool, org.id)
        assert row["billing_status"] == "past_due"
        starts.add(row["past_due_since"])
        assert payment_blocks_billable(BillingStatus.PAST_DUE, row["past_due_since"].timestamp(), t, DEFAULT_POLICY)
    assert starts == {at(t - 9 * day)}

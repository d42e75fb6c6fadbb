"""`stripe sync` against the local Stripe API through the real `stripe` library: a missed
`customer.subscription.updated` (and a missed cancellation) repaired, nothing stored when nothing changed, a
subscription Stripe does not have reported, and the periodic job run by one replica at a time."""

import asyncio
import uuid
from datetime import UTC, datetime

import pytest

from billing_webhooks.inbox.sync import SyncJob, sync
from billing_webhooks.stripe_client import StripeApi
from driftlock_cli import stripe_player
from driftlock_kernel import plans
from tests.support.cli import run_cli
from tests.support.net import free_port
from tests.support.stripe import InProcessWebhooks, Stripe, now
from tests.support.stripe_api import LocalStripe

API_KEY = "sk_test_driftlock_sync"


@pytest.fixture(scope="module")
async def local_stripe():
    server = await LocalStripe(api_key=API_KEY).start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def webhooks(database_url):
    service = await InProcessWebhooks(database_url).start(free_port())
    yield Stripe(service.webhook_url)
    await service.stop()


@pytest.fixture
async def api(local_stripe):
    client = StripeApi(API_KEY, api_base=local_stripe.url, timeout=5)
    yield client
    await client.close()


@pytest.fixture
async def subscribed(make_org, pool, webhooks, local_stripe):
    """An organisation subscribed to `pro` as webhooks told it, and the same subscription at Stripe."""
    pro, team = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("pro", "team"))
    prices = {pro: f"price_{uuid.uuid4().hex[:12]}", team: f"price_{uuid.uuid4().hex[:12]}"}
    async with pool.acquire() as conn:
        for name, price in prices.items():
            await plans.upsert_plan(conn, name, included_units=1000, stripe_price_ids=[price])
    org = await make_org()
    started = now() - 3600
    await webhooks.send("checkout.session.completed", org_id=org.id, created=started)
    _event, reply = await webhooks.send(
        "customer.subscription.created", org_id=org.id, price_ids=(prices[pro],), created=started, period_start=started
    )
    assert reply.outcome == "applied"
    customer = stripe_player.customer_for(org.id)
    local_stripe.put_customer(customer)

    def at_stripe(status: str, price: str) -> None:
        local_stripe.put_subscription(
            stripe_player.subscription_object(
                subscription_id=stripe_player.subscription_for(org.id),
                customer_id=customer,
                status=status,
                price_ids=(price,),
                period_start=started,
                created=started,
                metadata={"org_id": str(org.id)},
                api_version="2026-10-28.endive",
            )
        )

    at_stripe("active", prices[pro])
    return org.id, prices, pro, team, at_stripe


async def org_row(pool, org_id) -> dict:
    return dict(await pool.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org_id))


async def sync_events(pool, org_id) -> list[dict]:
    return [
        dict(r)
        for r in await pool.fetch(
            "SELECT id, type, outcome, detail FROM driftlock.stripe_events WHERE org_id = $1 AND id LIKE 'sync_%'",
            org_id,
        )
    ]


async def test_a_missed_subscription_update_is_repaired_by_stripe_sync(subscribed, pool, local_stripe, database_url):
    org_id, prices, pro, team, at_stripe = subscribed
    assert (await org_row(pool, org_id))["plan_name"] == pro
    # At Stripe: upgraded to team and a payment failed; the webhooks never arrived.
    at_stripe("past_due", prices[team])
    env = {"STRIPE_API_KEY": API_KEY, "STRIPE_API_BASE": local_stripe.url}
    result = (
        await asyncio.to_thread(
            run_cli, "stripe", "sync", "--org", str(org_id), "--json", database_url=database_url, env=env
        )
    ).json()
    (change,) = result["changed"]
    assert (change["org_id"], change["subscription_id"], change["outcome"]) == (
        str(org_id),
        stripe_player.subscription_for(org_id),
        "applied",
    )
    assert change["changes"]["billing_status"] == {"from": "active", "to": "past_due"}
    assert change["changes"]["plan_name"] == {"from": pro, "to": team}
    assert result["errors"] == []
    row = await org_row(pool, org_id)
    assert (row["billing_status"], row["plan_name"]) == ("past_due", team)
    assert row["past_due_since"] is not None
    (stored,) = await sync_events(pool, org_id)
    assert stored["type"] == "customer.subscription.updated" and stored["detail"].startswith("stripe sync")
    # Nothing differs now: a second sync reports nothing and stores nothing.
    again = (
        await asyncio.to_thread(
            run_cli, "stripe", "sync", "--org", str(org_id), "--json", database_url=database_url, env=env
        )
    ).json()
    assert again["changed"] == [] and again["checked"] == 1
    assert len(await sync_events(pool, org_id)) == 1


async def test_a_missed_cancellation_puts_the_organisation_on_the_free_plan(subscribed, pool, api):
    org_id, prices, pro, _team, at_stripe = subscribed
    at_stripe("canceled", prices[pro])
    report = await sync(pool, api, org_id=org_id)
    (change,) = report.changed
    assert change.changes["billing_status"] == ["active", "canceled"]
    row = await org_row(pool, org_id)
    assert (row["billing_status"], row["plan_name"], row["period_start"]) == ("canceled", "free", None)


async def test_a_webhook_older_than_the_sync_does_not_undo_it(subscribed, pool, api, webhooks):
    org_id, prices, _pro, team, at_stripe = subscribed
    at_stripe("active", prices[team])
    await sync(pool, api, org_id=org_id)
    # A delivery from before the read, arriving late, says what the read already includes.
    _event, reply = await webhooks.send(
        "customer.subscription.updated",
        org_id=org_id,
        price_ids=(prices[team],),
        status="past_due",
        created=now() - 300,
    )
    assert reply.outcome == "skipped_stale"
    assert (await org_row(pool, org_id))["billing_status"] == "active"


async def test_an_ended_subscription_is_applied_at_once_however_recent_the_last_event(subscribed, pool, api, webhooks):
    """The sync's snapshot is dated a minute before its read: an update applied seconds before the read looks newer.
    An ended subscription can never come back, so Stripe's `canceled` wins anyway."""
    org_id, prices, pro, _team, at_stripe = subscribed
    _event, reply = await webhooks.send(
        "customer.subscription.updated", org_id=org_id, price_ids=(prices[pro],), status="active", created=now() - 5
    )
    assert reply.outcome == "applied"
    at_stripe("canceled", prices[pro])
    report = await sync(pool, api, org_id=org_id)
    (change,) = report.changed
    assert change.changes["billing_status"] == ["active", "canceled"]
    row = await org_row(pool, org_id)
    assert (row["billing_status"], row["plan_name"]) == ("canceled", "free")
    # And nothing brings it back: a later update of the ended subscription changes nothing.
    _event, reply = await webhooks.send(
        "customer.subscription.updated", org_id=org_id, price_ids=(prices[pro],), status="active", created=now()
    )
    assert (await org_row(pool, org_id))["billing_status"] == "canceled"


async def test_an_item_that_names_its_price_only_as_plan_is_read(subscribed, pool, api, local_stripe):
    """Webhook endpoints and API versions before 2020 send items with `plan` and no `price`."""
    org_id, prices, _pro, team, _at_stripe = subscribed
    subscription = stripe_player.subscription_object(
        subscription_id=stripe_player.subscription_for(org_id),
        customer_id=stripe_player.customer_for(org_id),
        status="active",
        price_ids=(prices[team],),
        period_start=now() - 3600,
        created=now() - 3600,
        metadata={"org_id": str(org_id)},
        api_version="2019-12-03",
    )
    for item in subscription["items"]["data"]:
        item.pop("price", None)
        item["plan"] = {"id": prices[team], "object": "plan", "active": True, "amount": 4900, "interval": "month"}
    local_stripe.put_subscription(subscription)
    await sync(pool, api, org_id=org_id)
    assert (await org_row(pool, org_id))["plan_name"] == team


async def test_a_subscription_stripe_does_not_have_is_reported_and_changes_nothing(
    make_org, pool, local_stripe, database_url
):
    org = await make_org()
    missing = f"sub_{uuid.uuid4().hex[:14]}"
    await pool.execute("UPDATE driftlock.organizations SET stripe_subscription_id = $2 WHERE id = $1", org.id, missing)
    env = {"STRIPE_API_KEY": API_KEY, "STRIPE_API_BASE": local_stripe.url}
    result = await asyncio.to_thread(
        run_cli, "stripe", "sync", "--org", str(org.id), database_url=database_url, env=env
    )
    assert result.code == 1
    assert f"subscription {missing} not found at Stripe" in result.stdout
    assert result.stderr.strip().splitlines() == [
        "driftlock-gateway: error: 1 organisation(s) could not be synced; see the errors above"
    ]
    assert (await org_row(pool, org.id))["stripe_subscription_id"] == missing


def test_stripe_sync_without_a_key_says_what_is_missing(database_url):
    result = run_cli("stripe", "sync", database_url=database_url, env={"STRIPE_API_KEY": ""})
    assert result.code == 1 and "STRIPE_API_KEY is not set" in result.stderr and "Traceback" not in result.stderr
    wrong = run_cli("stripe", "sync", database_url=database_url, env={"STRIPE_API_KEY": "pk_live_nope"})
    assert wrong.code == 1 and "pk_live_nope" not in wrong.stderr and "secret (sk_...)" in wrong.stderr


async def test_the_periodic_sync_runs_on_one_replica_per_interval(pool, api):
    name = f"stripe_sync_test_{uuid.uuid4().hex[:8]}"
    replicas = [SyncJob(pool, api, interval=3600, runner=f"replica-{n}", name=name) for n in range(3)]
    reports = await asyncio.gather(*(job.run_if_due() for job in replicas))
    assert sum(report is not None for report in reports) == 1
    assert [await job.run_if_due() for job in replicas] == [None, None, None]
    row = await pool.fetchrow("SELECT * FROM driftlock.maintenance_runs WHERE task = $1", name)
    assert row["finished_at"] is not None and set(row["detail"]) == {"read", "changed", "errors"}
    assert row["started_at"] <= datetime.now(UTC)

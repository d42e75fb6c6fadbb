"""The webhook service when PostgreSQL goes away: a delivery that cannot be stored gets 5xx (so Stripe retries),
nothing is half-written, /healthz says so, and the retried delivery applies once the database is back."""

import pytest

from driftlock_cli import stripe_player
from tests.support.net import eventually, free_port
from tests.support.stripe import InProcessWebhooks, Stripe, get
from tests.support.tcp_proxy import FaultProxy


@pytest.fixture
async def proxied_service(database_url):
    proxy = await FaultProxy(database_url).start()
    service = await InProcessWebhooks(proxy.url()).start(free_port())
    yield service, proxy
    await service.stop()
    await proxy.stop()


async def healthz(service) -> int:
    return (await get(f"{service.base_url}/healthz"))[0]


async def test_database_down_is_5xx_and_the_retried_delivery_applies(proxied_service, make_org, pool):
    service, proxy = proxied_service
    stripe = Stripe(service.webhook_url)
    org = await make_org()
    # One delivery first, so the pool holds connections that the outage then breaks.
    _, warm = await stripe.send("checkout.session.completed", org_id=org.id)
    assert (warm.status, warm.outcome) == (200, "applied")
    event = stripe_player.build_event("invoice.payment_failed", org_id=org.id)

    await proxy.cut()
    for _ in range(2):  # a broken pooled connection, then a refused new one
        reply = await stripe.deliver(event)
        assert reply.status == 503, reply.body
        assert reply.body["error"]["code"] == "storage_unavailable"
    assert await healthz(service) == 503
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM driftlock.stripe_events WHERE id = $1", event["id"]) == 0
        assert await conn.fetchval("SELECT billing_status FROM driftlock.organizations WHERE id = $1", org.id) == "none"

    await proxy.restore()

    async def healthy() -> bool:
        return await healthz(service) == 200

    await eventually(healthy, within=15, what="/healthz to answer 200 after the database came back", interval=0.1)
    retried = await stripe.deliver(event)  # Stripe's retry: the same event, signed anew
    assert (retried.status, retried.outcome) == (200, "applied"), retried.body
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT billing_status FROM driftlock.organizations WHERE id = $1", org.id) == (
            "past_due"
        )
    assert (await stripe.deliver(event)).outcome == "duplicate"


async def test_the_service_starts_while_the_database_is_down(database_url):
    proxy = await FaultProxy(database_url).start()
    await proxy.cut()
    service = await InProcessWebhooks(proxy.url()).start(free_port())
    try:
        assert await healthz(service) == 503
        await proxy.restore()

        async def healthy() -> bool:
            return await healthz(service) == 200

        await eventually(healthy, within=15, what="/healthz to answer 200", interval=0.1)
    finally:
        await service.stop()
        await proxy.stop()


async def test_a_database_without_the_schema_is_503_so_stripe_retries(fresh_database_url):
    service = await InProcessWebhooks(fresh_database_url).start(free_port())
    try:
        event = stripe_player.build_event("invoice.payment_failed", org_id="00000000-0000-0000-0000-000000000001")
        reply = await Stripe(service.webhook_url).deliver(event)
        assert reply.status == 503
        assert reply.body["error"]["code"] == "storage_unavailable"
    finally:
        await service.stop()

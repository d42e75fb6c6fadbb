"""The webhook service's promise, as a property against real PostgreSQL (hypothesis): a random subscription
story (checkout, created, updates, failures, payments, deletion, re-subscription), delivered in any order and
with random redeliveries, leaves the organisation row the same, every column. Two organisations per example:
one gets the story in its own order, the other shuffled with duplicates."""

import asyncio
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing_webhooks.inbox.events import envelope
from billing_webhooks.inbox.webhook import store_and_apply
from driftlock_cli import stripe_player
from driftlock_kernel import orgs, plans

PRICES = ("price_story_basic", "price_story_pro")
STATUSES = ("incomplete", "trialing", "active", "past_due", "unpaid", "paused")
KINDS = (
    "customer.subscription.updated",
    "customer.subscription.updated",
    "invoice.payment_failed",
    "invoice.payment_succeeded",
    "customer.subscription.deleted",
)
# Columns an organisation gets from its own creation rather than from the story.
OWN_COLUMNS = {"id", "name", "created_at", "updated_at"}


@st.composite
def stories(draw) -> list[tuple]:
    subscriptions = draw(st.integers(1, 2))
    steps = [("customer.subscription.created", k) for k in range(subscriptions)]
    steps += [
        (kind, draw(st.integers(0, subscriptions - 1))) for kind in draw(st.lists(st.sampled_from(KINDS), max_size=7))
    ]
    story: list[tuple[str, int, str | None, str, int]] = [("checkout.session.completed", 0, None, PRICES[0], 0)]
    for kind, sub in steps:
        status = "canceled" if kind.endswith(".deleted") else draw(st.sampled_from(STATUSES))
        story.append((kind, sub, status, draw(st.sampled_from(PRICES)), draw(st.integers(0, 30))))
    return story


def events_for(org_id: uuid.UUID, story: list[tuple], base: int) -> list[dict]:
    tag = org_id.hex[:12]
    built = []
    for i, (kind, sub, status, price, offset) in enumerate(story):
        built.append(
            stripe_player.build_event(
                kind,
                org_id=org_id,
                created=base + offset,
                event_id=f"evt_{i}_{tag}",
                subscription_id=f"sub_{sub}_{tag}",
                price_ids=(price,),
                status=status if kind.startswith("customer.subscription.") else None,
            )
        )
    return built


def normalised(row, org_id: uuid.UUID) -> dict:
    tag, customer = org_id.hex[:12], stripe_player.customer_for(org_id)
    out = {}
    for column, value in dict(row).items():
        if column in OWN_COLUMNS:
            continue
        if isinstance(value, str):
            value = value.replace(customer, "CUSTOMER").replace(tag, "TAG")
        out[column] = value
    return out


@pytest.fixture(scope="module")
async def story_plans(pool):
    async with pool.acquire() as conn:
        for i, price in enumerate(PRICES):
            await plans.upsert_plan(conn, f"story-{i}", included_units=1000 * (i + 1), stripe_price_ids=[price])


async def test_a_story_leaves_the_same_organisation_row_in_any_order(pool, story_plans):
    base = int(time.time()) - 3600

    async def deliver(event: dict) -> None:
        result = await store_and_apply(pool, envelope(event), event)
        assert result.outcome.value != "failed", result

    async def row_after(deliveries: list[int], story: list[tuple]) -> dict:
        async with pool.acquire() as conn:
            org = await orgs.create_org(conn, "story")
        built = events_for(org.id, story, base)
        for index in deliveries:
            await deliver(built[index])
        return normalised(await pool.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org.id), org.id)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data(), story=stories())
    def check(data, story):
        indices = list(range(len(story)))
        redelivered = data.draw(st.lists(st.sampled_from(indices), max_size=len(story)), label="redeliveries")
        shuffled = data.draw(st.permutations(indices + redelivered), label="delivery order")
        in_order = asyncio.run_coroutine_threadsafe(row_after(indices, story), loop).result()
        disordered = asyncio.run_coroutine_threadsafe(row_after(shuffled, story), loop).result()
        assert disordered == in_order

    loop = asyncio.get_running_loop()
    # hypothesis drives a synchronous test: it runs in a thread, and each example's deliveries on this loop.
    await asyncio.to_thread(check)

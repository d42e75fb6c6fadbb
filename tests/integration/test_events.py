"""Events to the product against real PostgreSQL and real HTTP receivers: every change writes its event once,
every event reaches every subscribed endpoint at least once (through failures, timeouts and a restart), signed
as Standard Webhooks (checked by the test's own verifier), never twice by two replicas, never to an address a
customer may not reach."""

import asyncio
import uuid
from datetime import timedelta

import pytest

from authz_service.events.delivery import EventDeliverer, OperatorEndpoint
from driftlock_kernel import api_keys, db, event_endpoints, events, orgs
from driftlock_kernel.billing import BillingPolicy
from driftlock_kernel.events import EventType, UrlRefused
from tests.support.net import eventually
from tests.support.webhook_receiver import WebhookReceiver

OPERATOR_SECRET = events.new_secret()


@pytest.fixture
async def events_db(fresh_database_url, transaction_pooler):
    """A database of its own: no other replica (the session's gateway) delivers its events."""
    from driftlock_kernel import migrate

    async with db.connection(fresh_database_url, transaction_pooler=transaction_pooler) as conn:
        await migrate.migrate(conn)
        org = await orgs.create_org(conn, "events")
    pool = await db.create_pool(
        fresh_database_url, application_name="tests-events", max_size=6, transaction_pooler=transaction_pooler
    )
    yield pool, org
    await pool.close()


def deliverer(pool, operator: WebhookReceiver | None = None, **options) -> EventDeliverer:
    options = {"poll_interval": 0.05, "first_delay": 0.05, "max_delay": 0.3, "http_timeout": 1.0, **options}
    options.setdefault("lease_seconds", 20.0)
    op = OperatorEndpoint(operator.url, (events.secret_key(OPERATOR_SECRET),)) if operator else None
    return EventDeliverer(pool, operator=op, allow_private=True, **options)


async def endpoint(pool, org_id, receiver: WebhookReceiver, types=()) -> str:
    async with pool.acquire() as conn:
        created, secret = await event_endpoints.create_endpoint(conn, org_id, receiver.url, types, allow_private=True)
    receiver.secret = secret
    return str(created.id)


async def count_events(pool, event_type: str, org_id) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM driftlock.events WHERE type = $1 AND org_id = $2", event_type, org_id
    )


async def test_each_change_is_one_event_delivered_signed_to_the_org_and_the_operator(events_db):
    pool, org = events_db
    customer = await WebhookReceiver("").start()
    operator = await WebhookReceiver(OPERATOR_SECRET).start()
    await endpoint(pool, org.id, customer)
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO driftlock.plans (name, included_units) VALUES ('pro', 100)")
        key, _secret = await api_keys.create_key(conn, org.id)
        second, _ = await api_keys.create_key(conn, org.id)
        for _ in range(2):  # a second revocation, suspension, resumption changes nothing: no second event
            await api_keys.revoke_key(conn, key.id)
            await orgs.set_suspended(conn, org.id, True)
        for _ in range(2):
            await orgs.set_suspended(conn, org.id, False)
        await api_keys.roll_key(conn, second.id, overlap=timedelta(hours=1))
        await orgs.set_plan(conn, org.id, "pro")
        await conn.execute(
            """INSERT INTO driftlock.usage_alerts (org_id, period_start, period_end, threshold, used_units,
                   included_units, plan_name) VALUES ($1, date_trunc('month', now()),
                   date_trunc('month', now()) + interval '1 month', 70, 70, 100, 'pro')""",
            org.id,
        )
        await conn.execute(
            "UPDATE driftlock.organizations SET billing_status = 'past_due', past_due_since = now() WHERE id = $1",
            org.id,
        )
        await conn.execute("UPDATE driftlock.organizations SET billing_status = 'active' WHERE id = $1", org.id)
        period = org.billing_period(org.created_at).start
        for _ in range(2):
            await events.emit_spend_cap_reached(conn, org.id, period, used=150, cap=150)
    expected = {
        "key.revoked",
        "key.rolled",
        "org.suspended",
        "org.resumed",
        "billing.plan_changed",
        "usage.threshold_reached",
        "billing.payment_recovered",
        "usage.spend_cap_reached",
    }
    sender = deliverer(pool, operator)
    sender.start()
    try:

        async def all_delivered() -> bool:
            recorded = await pool.fetchval("SELECT count(*) FROM driftlock.event_deliveries WHERE state = 'delivered'")
            return recorded == 2 * len(expected)

        await eventually(all_delivered, within=15, what="every event at both endpoints")
    finally:
        await sender.close()
        await customer.stop()
        await operator.stop()
    for receiver in (customer, operator):
        assert all(d.verified for d in receiver.received), "a signature failed the independent verifier"
        types = [d.body["type"] for d in receiver.acknowledged()]
        assert sorted(types) == sorted(expected), types  # each exactly once
        assert all(d.body["data"]["org_id"] == str(org.id) for d in receiver.received)
        assert all(d.webhook_id.startswith("evt_") and d.body["timestamp"].endswith("Z") for d in receiver.received)
    bodies = {d.body["type"]: d.body["data"] for d in customer.acknowledged()}
    assert bodies["key.revoked"]["key_id"] == str(key.id)
    assert bodies["key.rolled"]["key_id"] == str(second.id) and bodies["key.rolled"]["new_key_id"]
    assert (bodies["billing.plan_changed"]["plan"], bodies["billing.plan_changed"]["previous_plan"]) == ("pro", "free")
    assert bodies["usage.threshold_reached"]["threshold"] == 70
    assert bodies["usage.spend_cap_reached"]["cap"] == 150
    # The operator's copy of the usage alert marks the alert acknowledged, as the alert webhook did.
    assert await pool.fetchval("SELECT webhook_delivered_at IS NOT NULL FROM driftlock.usage_alerts") is True


async def test_an_event_is_retried_through_an_error_a_timeout_and_a_restart_with_one_webhook_id(events_db):
    pool, org = events_db
    receiver = await WebhookReceiver("", answers=[500, "timeout"], slow_seconds=3).start()
    await endpoint(pool, org.id, receiver)
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)
    # A short lease: the attempt the restart interrupts is taken over soon after.
    sender = deliverer(pool, http_timeout=1.0, lease_seconds=3.0)
    sender.start()
    try:

        async def two_attempts() -> bool:
            return len(receiver.received) >= 2

        await eventually(two_attempts, within=15, what="a refused and a timed-out attempt")
        await receiver.stop()  # the receiver is down ...
        await sender.close()  # ... while the gateway restarts

        async def failed_while_down() -> bool:
            return await pool.fetchval("SELECT attempts FROM driftlock.event_deliveries") >= 2

        await eventually(failed_while_down, within=10, what="the attempts recorded")
        sender = deliverer(pool, http_timeout=1.0, lease_seconds=3.0)
        sender.start()

        async def down_attempt_recorded() -> bool:
            row = await pool.fetchrow("SELECT attempts, last_error FROM driftlock.event_deliveries")
            return row["attempts"] >= 3 and "Connect" in (row["last_error"] or "")

        await eventually(down_attempt_recorded, within=15, what="an attempt refused while the receiver is down")
        await receiver.start()  # back, on the same port

        async def delivered() -> bool:
            return await pool.fetchval("SELECT state FROM driftlock.event_deliveries") == "delivered"

        await eventually(delivered, within=15, what="the event delivered once the receiver is back")
    finally:
        await sender.close()
        await receiver.stop()
    assert len({d.webhook_id for d in receiver.received}) == 1, "every retry carries the same webhook-id"
    assert all(d.verified for d in receiver.received)
    row = await pool.fetchrow("SELECT state, attempts FROM driftlock.event_deliveries")
    assert row["state"] == "delivered" and row["attempts"] >= 4


async def test_two_replicas_deliver_each_event_once(events_db):
    pool, org = events_db
    receiver = await WebhookReceiver("").start()
    await endpoint(pool, org.id, receiver)
    async with pool.acquire() as conn:
        for n in range(150):
            await events.emit(conn, EventType.KEY_REVOKED, org.id, {"key_id": str(n)}, dedupe_key=f"k{n}")
    replicas = [deliverer(pool, batch=20), deliverer(pool, batch=20)]
    for replica in replicas:
        replica.start()
    try:

        async def all_delivered() -> bool:
            return len(receiver.acknowledged()) >= 150

        await eventually(all_delivered, within=30, what="150 events delivered")
        await asyncio.sleep(0)  # let any racing duplicate land before counting
    finally:
        for replica in replicas:
            await replica.close()
        await receiver.stop()
    ids = [d.webhook_id for d in receiver.received]
    assert len(ids) == 150 and len(set(ids)) == 150
    assert await pool.fetchval("SELECT count(*) FROM driftlock.event_deliveries") == 150


async def test_the_same_occurrence_seen_twice_is_one_event(events_db):
    pool, org = events_db
    async with pool.acquire() as conn:
        first = await events.emit(conn, EventType.KEY_EXPIRING, org.id, {}, dedupe_key="same")
        second = await events.emit(conn, EventType.KEY_EXPIRING, org.id, {}, dedupe_key="same")
    assert first is not None and second is None


async def test_clock_events_key_expiring_and_service_restricted_are_written_once_by_any_number_of_scans(events_db):
    pool, org = events_db
    async with pool.acquire() as conn:
        key, _ = await api_keys.create_key(conn, org.id)
        soon, _ = await api_keys.create_key(conn, org.id)
        await conn.execute(
            """UPDATE driftlock.api_keys SET created_at = now() - interval '30 days',
                   expires_at = CASE WHEN id = $1 THEN now() + interval '6 days' ELSE now() + interval '20 hours' END
               WHERE id = ANY($2::uuid[])""",
            key.id,
            [key.id, soon.id],
        )
        await conn.execute(
            """UPDATE driftlock.organizations SET billing_status = 'past_due',
                   past_due_since = now() - interval '8 days' WHERE id = $1""",
            org.id,
        )
    policy = BillingPolicy(grace_seconds=7 * 86400)
    replicas = [deliverer(pool, policy=policy), deliverer(pool, policy=policy)]
    for replica in replicas * 2:
        await replica.scan_clock()
    rows = await pool.fetch(
        "SELECT data->>'key_id' AS key_id, (data->>'days_before')::int AS days FROM driftlock.events "
        "WHERE type = 'key.expiring' ORDER BY 1, 2"
    )
    assert sorted((r["key_id"], r["days"]) for r in rows) == sorted([(str(key.id), 7), (str(soon.id), 1)])
    assert await count_events(pool, "billing.service_restricted", org.id) == 1


# --- where events may go ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://[::1]/hook",
        "http://169.254.10.1/hook",
        "http://2130706433/hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "http://user:pw@example.com/hook",
    ],
)
async def test_a_customer_url_to_a_private_address_or_not_http_is_refused(events_db, url):
    pool, org = events_db
    async with pool.acquire() as conn:
        with pytest.raises(UrlRefused):
            await event_endpoints.create_endpoint(conn, org.id, url, (), allow_private=False)
    assert await pool.fetchval("SELECT count(*) FROM driftlock.event_endpoints") == 0


async def test_the_metadata_address_is_refused_even_when_private_urls_are_allowed(events_db):
    pool, org = events_db
    async with pool.acquire() as conn:
        with pytest.raises(UrlRefused, match="metadata"):
            await event_endpoints.create_endpoint(
                conn, org.id, "http://169.254.169.254/latest/meta-data/", (), allow_private=True
            )


async def test_at_delivery_an_address_or_a_name_resolving_to_loopback_is_refused(events_db):
    pool, org = events_db
    receiver = await WebhookReceiver("", answers=["redirect"]).start()
    await endpoint(pool, org.id, receiver)  # allowed when created (as in dev) ...
    # ... and a second one, stored when the name still resolved elsewhere: now it resolves to loopback.
    rebound = await pool.fetchval(
        """INSERT INTO driftlock.event_endpoints (org_id, url, secret) VALUES ($1, $2, $3) RETURNING id""",
        org.id,
        f"http://localhost:{receiver.port}/hook",
        events.new_secret(),
    )
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)
    sender = deliverer(pool, first_delay=30, max_delay=30)
    sender._allow_private = False  # production's policy, for the attempts
    sender.start()
    try:

        async def both_attempted() -> bool:
            errors = "SELECT count(*) FROM driftlock.event_deliveries WHERE last_error IS NOT NULL"
            return await pool.fetchval(errors) == 2

        await eventually(both_attempted, within=10, what="an attempt at each endpoint")
    finally:
        await sender.close()
        await receiver.stop()
    refused = await pool.fetchrow(
        "SELECT state, last_error FROM driftlock.event_deliveries WHERE endpoint_id = $1", rebound
    )
    assert refused["state"] == "pending" and "loopback" in refused["last_error"]
    # The IP-literal endpoint (127.0.0.1) is refused too under that policy: nothing reached the receiver.
    assert receiver.received == []


async def test_a_redirect_is_a_failure_not_followed(events_db):
    pool, org = events_db
    receiver = await WebhookReceiver("", answers=["redirect"]).start()
    await endpoint(pool, org.id, receiver)
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)
    sender = deliverer(pool, first_delay=30, max_delay=30)
    sender.start()
    try:

        async def attempted() -> bool:
            return await pool.fetchval("SELECT last_status FROM driftlock.event_deliveries") == 307

        await eventually(attempted, within=10, what="the redirect answer recorded")
    finally:
        await sender.close()
        await receiver.stop()
    assert [d.answered for d in receiver.received] == ["redirect"], "the redirect was followed"


async def test_an_endpoint_failing_too_long_is_disabled_the_operator_told_and_an_update_enables_it(events_db):
    pool, org = events_db
    receiver = await WebhookReceiver("", answers=[500] * 1000).start()
    operator = await WebhookReceiver(OPERATOR_SECRET).start()
    endpoint_id = await endpoint(pool, org.id, receiver)
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)
    sender = deliverer(pool, operator, disable_after_seconds=0.5)
    sender.start()
    try:

        async def told() -> bool:
            return bool(operator.of_type("event_endpoint.disabled"))

        await eventually(told, within=15, what="the operator told of the disabled endpoint")
        async with pool.acquire() as conn:
            assert (await event_endpoints.get_endpoint(conn, uuid.UUID(endpoint_id))).disabled_at is not None
            receiver.answers = []
            await event_endpoints.update_endpoint(conn, uuid.UUID(endpoint_id), allow_private=True)

        async def delivered() -> bool:
            return bool(receiver.of_type("org.suspended"))

        await eventually(delivered, within=15, what="the pending event delivered after the update")
    finally:
        await sender.close()
        await receiver.stop()
        await operator.stop()
    assert operator.of_type("event_endpoint.disabled")[0].body["data"]["endpoint_id"] == endpoint_id
    assert not receiver.of_type("event_endpoint.disabled"), "only the operator hears of a disabled endpoint"


async def test_a_plans_hard_cap_reached_is_one_event_per_period(events_db):
    pool, org = events_db
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO driftlock.plans (name, included_units, overage) VALUES ('capped', 10, 'block')")
        await orgs.set_plan(conn, org.id, "capped")
        for units in (5, 10, 12):  # below, at, past the cap: the event once, when it is reached
            await conn.execute(
                """INSERT INTO driftlock.usage_totals (org_id, period_start, units)
                   VALUES ($1, date_trunc('month', now()), $2)
                   ON CONFLICT (org_id, period_start) DO UPDATE SET units = EXCLUDED.units""",
                org.id,
                units,
            )
    rows = await pool.fetch("SELECT data FROM driftlock.events WHERE type = 'usage.spend_cap_reached'")
    assert [(r["data"]["used"], r["data"]["cap"], r["data"]["cap_kind"]) for r in rows] == [(10, 10, "hard_cap")]


async def test_pruning_events_keeps_those_still_being_delivered(events_db):
    from driftlock_kernel import retention

    pool, org = events_db
    async with pool.acquire() as conn:
        for n in range(2):
            await events.emit(conn, EventType.KEY_REVOKED, org.id, {}, dedupe_key=f"old{n}")
        await conn.execute("UPDATE driftlock.events SET occurred_at = now() - interval '100 days'")
    receiver = await WebhookReceiver("", answers=[500] * 100).start()
    await endpoint(pool, org.id, receiver)
    sender = deliverer(pool, first_delay=60, max_delay=60)
    await sender.fan_out()
    # One delivered, one still pending.
    await pool.execute(
        "UPDATE driftlock.event_deliveries SET state = 'delivered' "
        "WHERE id = (SELECT min(id) FROM driftlock.event_deliveries)"
    )
    async with pool.acquire() as conn:
        deleted = await retention.prune_table(conn, retention.TABLES["events"], timedelta(days=90))
    await receiver.stop()
    assert deleted == 1
    assert await pool.fetchval("SELECT count(*) FROM driftlock.event_deliveries WHERE state = 'pending'") == 1


async def test_a_slow_endpoint_does_not_hold_back_another_organisations_events(events_db):
    pool, org = events_db
    async with pool.acquire() as conn:
        other = await orgs.create_org(conn, "fast")
    slow = await WebhookReceiver("", answers=["timeout"] * 5, slow_seconds=15).start()
    fast = await WebhookReceiver("").start()
    await endpoint(pool, org.id, slow)
    await endpoint(pool, other.id, fast)
    async with pool.acquire() as conn:
        for n in range(5):
            await events.emit(conn, EventType.KEY_REVOKED, org.id, {}, dedupe_key=f"slow{n}")
    sender = deliverer(pool, http_timeout=14.0, lease_seconds=30.0)
    sender.start()
    try:

        async def slow_ones_in_flight() -> bool:
            return len(slow.received) == 5

        await eventually(slow_ones_in_flight, within=10, what="the slow endpoint's events in flight")
        async with pool.acquire() as conn:
            for n in range(5):
                await events.emit(conn, EventType.KEY_REVOKED, other.id, {}, dedupe_key=f"fast{n}")

        async def fast_ones_delivered() -> bool:
            return len(fast.acknowledged()) == 5

        # Well before the slow endpoint's attempts end (14 s).
        await eventually(fast_ones_delivered, within=10, what="the other organisation's events delivered")
    finally:
        await sender.close()
        await slow.stop()
        await fast.stop()

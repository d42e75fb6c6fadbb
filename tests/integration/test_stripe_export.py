"""Usage to Stripe Billing Meters through the outbox, against real PostgreSQL and the local Stripe API driven by
the real `stripe` library: exactly once through 500s, 429s, lost replies, two exporters at once and a sender that
died mid-call; refusals recorded and healed; refunds after export; periods that close; Stripe's 24-hour window.

The module has a database of its own: every exporter decides over the whole outbox, and the session's gateway
runs one (against its own local Stripe) over the session database."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from billing_webhooks.stripe_client import StripeApi
from billing_webhooks.usage_export import export_store
from billing_webhooks.usage_export.exporter import Exporter
from billing_webhooks.usage_export.exports import ExportRules, identifier, summary_window
from driftlock_kernel import db, migrate, orgs, plans
from driftlock_kernel.periods import Period, calendar_month
from tests.support.cli import run_cli
from tests.support.stripe_api import LocalStripe

API_KEY = "sk_test_driftlock_exports"
METER = "driftlock_api_calls"
PLAN = "metered"
# Counted units are reported at the second pass that sees them (a test that waits for refunds says so).
RULES = ExportRules(settle=timedelta(0), finalization_grace=timedelta(hours=1))


@pytest.fixture(scope="module")
async def export_db(databases, pooler, transaction_pooler):
    """A database of this module's own, reached as the session's is (through PgBouncer when it runs)."""
    if not await databases.can_create():
        pytest.skip("the server named by DATABASE_URL does not let this user create databases")
    direct = await databases.create("driftlock_export")
    async with db.connection(direct) as conn:
        await migrate.migrate(conn)
        await plans.upsert_plan(conn, PLAN, included_units=10, stripe_meter=METER)
    url = direct if pooler is None else pooler.pooled(direct)
    pool = await db.create_pool(
        url, application_name="driftlock-tests", max_size=8, transaction_pooler=transaction_pooler
    )
    yield url, pool
    await pool.close()


@pytest.fixture(scope="module")
async def local_stripe():
    server = await LocalStripe(api_key=API_KEY).start()
    server.add_meter(METER)
    yield server
    await server.stop()


@pytest.fixture
async def stripe_api(local_stripe):
    local_stripe.clear_faults()
    apis = []

    def make(server: LocalStripe = local_stripe) -> StripeApi:
        api = StripeApi(API_KEY, api_base=server.url, timeout=5)
        apis.append(api)
        return api

    yield make
    for api in apis:
        await api.close()


@pytest.fixture
def exporter(export_db, stripe_api):
    _url, pool = export_db

    def make(runner: str = "tests", server: LocalStripe | None = None, **options) -> Exporter:
        api = stripe_api(server) if server is not None else stripe_api()
        return Exporter(pool, api, rules=options.pop("rules", RULES), runner=runner, **options)

    return make


async def metered_org(pool, local_stripe, *, plan: str = PLAN) -> tuple[uuid.UUID, str]:
    customer = f"cus_{uuid.uuid4().hex[:14]}"
    local_stripe.put_customer(customer)
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "metered", plan=plan)
        await conn.execute("UPDATE driftlock.organizations SET stripe_customer_id = $2 WHERE id = $1", org.id, customer)
    return org.id, customer


async def count(pool, org_id, units: int, period_start: datetime | None = None, product: str = "stream") -> None:
    """Units as a meter flush stores them (a negative number is a refund), under the terms the organisation is
    on now (its plan, that plan's meter, its customer), as authz records them."""
    start = period_start or calendar_month(datetime.now(UTC)).start
    await pool.execute(
        """INSERT INTO driftlock.usage_counters AS u
               (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id, units)
           SELECT o.id, $2, $3, o.plan_name, coalesce(p.stripe_meter, ''), coalesce(o.stripe_customer_id, ''), $4
           FROM driftlock.organizations o LEFT JOIN driftlock.plans p ON p.name = o.plan_name WHERE o.id = $1
           ON CONFLICT (org_id, period_start, product, plan_name, stripe_meter, stripe_customer_id)
               DO UPDATE SET units = u.units + $4, updated_at = now()""",
        org_id,
        start,
        product,
        units,
    )


async def rows_of(pool, org_id) -> list[dict]:
    async with pool.acquire() as conn:
        return list(reversed(await export_store.list_exports(conn, org_id=org_id)))


async def drain(exporter: Exporter, pool, org_id, *, passes: int = 20) -> list[dict]:
    """Run passes until rows cover everything the organisation's counters hold and none is pending; backoff
    waits are skipped (the clock is the one fake)."""
    for _ in range(passes):
        await exporter.run_once()
        rows = await rows_of(pool, org_id)
        stored = await pool.fetchval(
            # What is owed at Stripe: units counted under a plan with a meter.
            "SELECT coalesce(sum(units), 0) FROM driftlock.usage_counters WHERE org_id = $1 AND stripe_meter <> ''",
            org_id,
        )
        if rows and not any(r["state"] == "pending" for r in rows) and sum(r["units"] for r in rows) >= stored:
            return rows
        await pool.execute(
            "UPDATE driftlock.stripe_exports SET next_attempt_at = now() WHERE org_id = $1 AND state = 'pending'",
            org_id,
        )
    raise AssertionError(f"rows still pending after {passes} passes: {await rows_of(pool, org_id)}")


async def settled(exporter: Exporter) -> None:
    """Decide twice: the first pass notes what the counters hold, the second reports it (settle 0)."""
    await exporter.decide()
    await exporter.decide()


def month_total(local_stripe: LocalStripe, customer: str, period: Period | None = None) -> int:
    period = period or calendar_month(datetime.now(UTC))
    return int(local_stripe.total(customer, METER, int(period.start.timestamp()), int(period.end.timestamp())))


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- exactly once -----------------------------------------------------------------------------------------------


async def test_units_reach_stripe_exactly_once_through_500s_429s_and_lost_replies(export_db, local_stripe, exporter):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter()
    sent_before = metric("driftlock_stripe_export_units_total", outcome="sent")
    stored = 0
    for units, fault in ((5, "500"), (3, "429"), (4, "lost"), (2, "500 twice")):
        await count(pool, org_id, units)
        stored += units
        if fault == "500":
            local_stripe.fail_next(1)
        elif fault == "429":
            local_stripe.rate_limit_next(1, retry_after=1)
        elif fault == "lost":
            local_stripe.lose_reply_next(1)
        else:
            local_stripe.fail_next(2, 503)
        await drain(run, pool, org_id)
    rows = await rows_of(pool, org_id)
    assert [(r["units"], r["state"]) for r in rows] == [(5, "sent"), (3, "sent"), (4, "sent"), (2, "sent")]
    assert [r["identifier"] for r in rows] == [
        identifier(org_id, calendar_month(datetime.now(UTC)), n) for n in (1, 2, 3, 4)
    ]
    assert [r["attempts"] for r in rows] == [2, 2, 2, 3]
    assert all(r["stripe_request_id"] and r["stripe_request_id"].startswith("req_") for r in rows)
    # Stripe's total for the customer and period equals the stored total; each row is one event at Stripe.
    assert month_total(local_stripe, customer) == stored == 14
    assert sorted(e.identifier for e in local_stripe.events(customer)) == sorted(r["identifier"] for r in rows)
    assert metric("driftlock_stripe_export_units_total", outcome="sent") - sent_before == 14
    assert metric("driftlock_stripe_export_lag_units") == 0
    # The lost reply was replayed by Stripe under its Idempotency-Key, not executed twice.
    replayed = [r for r in local_stripe.requests if r.replayed]
    assert len(replayed) == 1 and replayed[0].params["identifier"] == rows[2]["identifier"]


async def test_two_exporters_at_once_never_send_the_same_units_twice(export_db, local_stripe, exporter):
    _url, pool = export_db
    org_ids = [await metered_org(pool, local_stripe) for _ in range(3)]
    first, second = exporter("replica-a"), exporter("replica-b")
    local_stripe.delay_next(6, 0.2)  # calls overlap with the other exporter's passes
    local_stripe.fail_next(2)
    stored = dict.fromkeys(org_ids, 0)

    async def keep_counting() -> None:
        for wave in range(6):
            for org in org_ids:
                await count(pool, org[0], wave + 1)
                stored[org] += wave + 1
            await asyncio.sleep(0.05)

    async def keep_exporting(run: Exporter) -> None:
        for _ in range(12):
            await run.run_once()
            await pool.execute("UPDATE driftlock.stripe_exports SET next_attempt_at = now() WHERE state = 'pending'")

    await asyncio.gather(keep_counting(), keep_exporting(first), keep_exporting(second))
    for org_id, customer in org_ids:
        rows = await drain(first, pool, org_id)
        assert month_total(local_stripe, customer) == stored[(org_id, customer)] == 21
        identifiers = [e.identifier for e in local_stripe.events(customer)]
        assert len(identifiers) == len(set(identifiers)) == len(rows)
        assert {r["state"] for r in rows} == {"sent"}


async def test_a_sender_that_died_mid_call_leaves_its_row_to_the_next_sender(
    export_db, local_stripe, exporter, stripe_api
):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    await count(pool, org_id, 9)
    dying = exporter("dying", lease=timedelta(seconds=1))
    await settled(dying)
    (claimed,) = [
        row
        for row in await export_store.claim_due(
            pool, runner="dying", lease=timedelta(seconds=1), limit=50, token=uuid.uuid4()
        )
        if row.org_id == org_id
    ]
    # Its call reached Stripe; then the process was gone before it could record the answer.
    assert claimed.first_attempt_at is not None  # set by the claim
    window_start = int(claimed.first_attempt_at.timestamp())
    answer = await stripe_api().create_meter_event(
        event_name=claimed.event_name,
        customer=claimed.stripe_customer_id,
        value=claimed.units,
        timestamp=claimed.event_timestamp,
        identifier=claimed.identifier,
        idempotency_key=f"{claimed.identifier}-{window_start}",
    )
    assert answer.status == 200
    nothing_while_claimed = await exporter("next").send_due()
    assert claimed.id not in nothing_while_claimed
    await asyncio.sleep(1.2)  # the claim's lease runs out
    rows = await drain(exporter("next"), pool, org_id)
    assert [(r["units"], r["state"], r["attempts"]) for r in rows] == [(9, "sent", 2)]
    assert month_total(local_stripe, customer) == 9
    assert len(local_stripe.events(customer)) == 1


async def test_a_rate_limit_stops_the_pass_and_leaves_the_other_rows_unattempted(export_db, local_stripe, exporter):
    _url, pool = export_db
    org_ids = [await metered_org(pool, local_stripe) for _ in range(10)]
    for org_id, _customer in org_ids:
        await count(pool, org_id, 2)
    # The first call is refused; the three sent beside it (four at a time) are slow enough to be in flight then.
    local_stripe.rate_limit_next(1, retry_after=1)
    local_stripe.delay_next(3, 0.3)
    run = exporter()
    await settled(run)
    await run.send_due()
    rows = [row for org_id, _ in org_ids for row in await rows_of(pool, org_id)]
    assert (
        sorted((r["state"], r["attempts"]) for r in rows) == [("pending", 0)] * 6 + [("pending", 1)] + [("sent", 1)] * 3
    )
    (limited,) = [r for r in rows if r["state"] == "pending" and r["attempts"] == 1]
    assert limited["error"].startswith("429 ")
    for org_id, customer in org_ids:
        await drain(run, pool, org_id)
        assert month_total(local_stripe, customer) == 2


# --- refusals, refunds, periods -------------------------------------------------------------------------------


async def test_a_refusal_is_recorded_with_stripes_message_listed_by_the_cli_and_healed_once_fixed(
    export_db, local_stripe, exporter
):
    url, pool = export_db
    meter = f"meter_{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, f"plan-{meter}", included_units=0, stripe_meter=meter)
    org_id, customer = await metered_org(pool, local_stripe, plan=f"plan-{meter}")
    await count(pool, org_id, 6)
    failed_before = metric("driftlock_stripe_export_units_total", outcome="failed")
    (row,) = await drain(exporter(), pool, org_id)
    assert row["state"] == "failed"
    assert row["error"] == f'400 invalid_request_error: No active meter found for event name "{meter}".'
    assert metric("driftlock_stripe_export_units_total", outcome="failed") - failed_before == 6
    listed = (
        await asyncio.to_thread(
            run_cli, "stripe", "exports", "list", "--org", str(org_id), "--state", "failed", "--json", database_url=url
        )
    ).json()["exports"]
    assert [(e["identifier"], e["units"], e["state"], e["error"]) for e in listed] == [
        (row["identifier"], 6, "failed", row["error"])
    ]
    # Fixed at Stripe; `stripe export --once` does not wait for the failed row's hour: the units go in a new row.
    local_stripe.add_meter(meter)
    env = {"STRIPE_API_KEY": API_KEY, "STRIPE_API_BASE": local_stripe.url}
    once = await asyncio.to_thread(run_cli, "stripe", "export", "--once", "--json", database_url=url, env=env)
    exported = once.json()
    assert [(e["units"], e["state"], e["seq"]) for e in exported["exports"] if e["org_id"] == str(org_id)] == [
        (6, "sent", 2)
    ]
    assert local_stripe.total(customer, meter) == 6


async def test_a_refund_after_export_is_never_reported_negative_and_shrinks_the_next_report(
    export_db, local_stripe, exporter
):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter()
    await count(pool, org_id, 10)
    await drain(run, pool, org_id)
    await count(pool, org_id, -3)  # three refunds after the units were reported
    await run.run_once()
    assert [r["units"] for r in await rows_of(pool, org_id)] == [10]
    await count(pool, org_id, 5)
    rows = await drain(run, pool, org_id)
    assert [r["units"] for r in rows] == [10, 2]
    assert month_total(local_stripe, customer) == 12  # the stored total


async def refund(pool, org_id, units: int = 1) -> None:
    """A refund as a meter flush stores it: its own row, and the counter taken down."""
    start = calendar_month(datetime.now(UTC)).start
    await pool.execute(
        """INSERT INTO driftlock.usage_refunds (request_id, org_id, period_start, product, units, reason)
           VALUES ($1, $2, $3, 'stream', $4, 'UT')""",
        uuid.uuid4().hex,
        org_id,
        start,
        units,
    )
    await count(pool, org_id, -units)


async def test_units_wait_for_their_refunds_before_they_are_reported(export_db, local_stripe, exporter):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter(rules=ExportRules(settle=timedelta(seconds=1.5)))
    await count(pool, org_id, 5)
    await run.run_once()
    await count(pool, org_id, 2)
    await refund(pool, org_id)  # one of the first five calls timed out at the backend; its log came late
    await run.run_once()
    assert await rows_of(pool, org_id) == []  # nothing has waited long enough yet
    await asyncio.sleep(1.6)
    await run.run_once()
    (row,) = await rows_of(pool, org_id)
    assert row["units"] == 4  # the first five, less their refund; the two later ones wait their turn
    await asyncio.sleep(1.6)
    rows = await drain(run, pool, org_id)
    assert [r["units"] for r in rows] == [4, 2]
    assert month_total(local_stripe, customer) == 6  # never the refunded call


async def period_ending(pool, org_id, ago: timedelta) -> Period:
    """Give the organisation a Stripe period that ended `ago` (30 days long), as a subscription event would."""
    end = (datetime.now(UTC) - ago).replace(microsecond=0)
    period = Period(end - timedelta(days=30), end)
    await pool.execute(
        "UPDATE driftlock.organizations SET period_start = $2, period_end = $3 WHERE id = $1",
        org_id,
        period.start,
        period.end,
    )
    return period


async def test_a_closed_period_gets_its_final_report_at_its_last_second_once_late_refunds_are_in(
    export_db, local_stripe, exporter
):
    _url, pool = export_db
    run = exporter(rules=ExportRules(settle=timedelta(minutes=3)))
    just_closed, just_customer = await metered_org(pool, local_stripe)
    closed, customer = await metered_org(pool, local_stripe)
    just_period = await period_ending(pool, just_closed, timedelta(minutes=1))
    period = await period_ending(pool, closed, timedelta(minutes=20))
    # The organisations moved on to their next period (Stripe's renewal), which the exporter must not need.
    for org_id, p in ((just_closed, just_period), (closed, period)):
        await count(pool, org_id, 8, p.start)
        await pool.execute(
            "UPDATE driftlock.organizations SET period_start = $2, period_end = $3 WHERE id = $1",
            org_id,
            p.end,
            p.end + timedelta(days=30),
        )
    await run.run_once()
    assert await rows_of(pool, just_closed) == []  # within the settle time: refunds may still come
    (row,) = await drain(run, pool, closed)
    window = summary_window(period)
    assert window is not None
    assert (row["units"], row["state"], row["period_end"]) == (8, "sent", period.end)
    assert row["event_timestamp"] == window[1] - timedelta(seconds=1)
    (event,) = local_stripe.events(customer)
    assert period.start.timestamp() <= event.timestamp < period.end.timestamp()
    assert month_total(local_stripe, customer, period) == 8
    assert month_total(local_stripe, just_customer, just_period) == 0


async def test_units_counted_after_stripe_finalised_the_invoice_are_skipped_and_shown(
    export_db, local_stripe, exporter
):
    url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    period = await period_ending(pool, org_id, timedelta(hours=2))
    await count(pool, org_id, 4, period.start)  # a spill file replayed late, say
    skipped_before = metric("driftlock_stripe_export_units_total", outcome="skipped")
    await exporter().run_once()
    (row,) = await rows_of(pool, org_id)
    assert (row["units"], row["state"]) == (4, "skipped")
    assert "finalised the invoice" in row["error"]
    assert metric("driftlock_stripe_export_units_total", outcome="skipped") - skipped_before == 4
    assert local_stripe.events(customer) == []
    await exporter().run_once()
    assert len(await rows_of(pool, org_id)) == 1  # skipped once, not again on every pass
    listed = (
        await asyncio.to_thread(run_cli, "stripe", "exports", "list", "--org", str(org_id), database_url=url)
    ).stdout
    assert "skipped" in listed and "finalised" in listed


# --- after Stripe's 24-hour identifier window ----------------------------------------------------------------------


@pytest.fixture
async def forgetful_stripe():
    """A local Stripe of its own, whose clock the test moves a day on (so it forgets identifiers and keys)."""
    server = await LocalStripe(api_key=API_KEY).start()
    server.add_meter(METER)
    yield server
    await server.stop()


async def a_day_later(pool, server: LocalStripe, org_id) -> None:
    await pool.execute(
        """UPDATE driftlock.stripe_exports
           SET first_attempt_at = first_attempt_at - interval '25 hours', next_attempt_at = now()
           WHERE org_id = $1 AND state = 'pending'""",
        org_id,
    )
    server.advance(25 * 3600)


async def test_a_row_whose_reply_was_lost_a_day_ago_is_confirmed_by_stripes_total_not_sent_twice(
    export_db, forgetful_stripe, exporter
):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, forgetful_stripe)
    await count(pool, org_id, 5)
    run = exporter(server=forgetful_stripe)
    forgetful_stripe.lose_reply_next(1)
    await settled(run)
    await run.send_due()
    await a_day_later(pool, forgetful_stripe, org_id)
    (row,) = await drain(run, pool, org_id)
    assert (row["state"], row["error"]) == ("sent", "confirmed by Stripe's meter total")
    assert forgetful_stripe.total(customer, METER) == 5  # a blind resend would have made it 10


async def test_a_row_that_never_reached_stripe_a_day_ago_is_sent_again(export_db, forgetful_stripe, exporter):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, forgetful_stripe)
    await count(pool, org_id, 5)
    run = exporter(server=forgetful_stripe)
    forgetful_stripe.fail_next(1)
    await settled(run)
    await run.send_due()
    await a_day_later(pool, forgetful_stripe, org_id)
    (row,) = await drain(run, pool, org_id)
    assert row["state"] == "sent"
    assert forgetful_stripe.total(customer, METER) == 5


async def test_a_row_stripes_total_cannot_account_for_is_skipped_for_an_operator(export_db, forgetful_stripe, exporter):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, forgetful_stripe)
    await count(pool, org_id, 5)
    run = exporter(server=forgetful_stripe)
    forgetful_stripe.lose_reply_next(1)
    await settled(run)
    await run.send_due()
    # Something else reported usage for the customer too: the total is neither with nor without the row.
    other = stripe_api_for(forgetful_stripe)
    await other.create_meter_event(
        event_name=METER,
        customer=customer,
        value=2,
        timestamp=datetime.now(UTC),
        identifier="manual-1",
        idempotency_key="manual-1",
    )
    await other.close()
    await a_day_later(pool, forgetful_stripe, org_id)
    (row,) = await drain(run, pool, org_id)
    assert row["state"] == "skipped"
    assert "total for the period (7)" in row["error"]
    assert forgetful_stripe.total(customer, METER) == 7


def stripe_api_for(server: LocalStripe) -> StripeApi:
    return StripeApi(API_KEY, api_base=server.url, timeout=5)


# --- plan changes and cancellations: every unit under the terms it was used on ------------------------------------


async def unmetered_plan(pool) -> str:
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, "unmetered", included_units=1000, stripe_meter=None)
    return "unmetered"


async def set_plan(pool, org_id, plan: str) -> None:
    await pool.execute("UPDATE driftlock.organizations SET plan_name = $2 WHERE id = $1", org_id, plan)


async def test_an_upgrade_bills_only_what_was_used_after_it(export_db, local_stripe, exporter):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe, plan=await unmetered_plan(pool))
    run = exporter()
    await count(pool, org_id, 500)  # on a plan without a meter: owed to no one at Stripe
    await settled(run)
    assert await rows_of(pool, org_id) == []
    upgraded_at = datetime.now(UTC).replace(microsecond=0)
    await set_plan(pool, org_id, PLAN)
    await count(pool, org_id, 10)
    rows = await drain(run, pool, org_id)
    assert [(r["units"], r["event_name"], r["state"]) for r in rows] == [(10, METER, "sent")]
    assert rows[0]["event_timestamp"] >= upgraded_at
    assert month_total(local_stripe, customer) == 10  # was 510: the whole open period followed the new plan
    figures_line = f"upgrade: 500 used unmetered + 10 metered; Stripe {month_total(local_stripe, customer)}"
    print("\n" + figures_line)


async def test_a_downgrade_reports_what_the_old_plan_counted_timestamped_before_it(export_db, local_stripe, exporter):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter(rules=ExportRules(settle=timedelta(minutes=3)))
    await count(pool, org_id, 300)
    await run.run_once()  # a candidate mark; nothing settled yet
    used_until = datetime.now(UTC)
    await set_plan(pool, org_id, await unmetered_plan(pool))
    await count(pool, org_id, 7)  # after the downgrade: never reported
    await run.run_once()
    assert await rows_of(pool, org_id) == []  # the old terms' last calls may still be refunded
    # The old terms' counters stopped growing; once their settle time has passed, all they hold is owed.
    await pool.execute(
        "UPDATE driftlock.usage_counters SET updated_at = updated_at - interval '4 minutes' WHERE org_id = $1", org_id
    )
    rows = await drain(run, pool, org_id)
    assert [(r["units"], r["event_name"], r["state"]) for r in rows] == [(300, METER, "sent")]
    assert rows[0]["event_timestamp"] <= used_until  # inside the period, when the old plan was last used
    assert month_total(local_stripe, customer) == 300  # was 0: the export followed the new plan's (no) meter
    print(f"\ndowngrade: 300 used metered + 7 unmetered; Stripe {month_total(local_stripe, customer)}")


async def test_a_cancellation_reports_the_last_periods_unreported_usage_on_the_old_meter(
    export_db, local_stripe, exporter
):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter()
    await count(pool, org_id, 300)
    # customer.subscription.deleted: the organisation is on the free plan (no meter) from now on.
    await set_plan(pool, org_id, "free")
    await count(pool, org_id, 4)
    rows = await drain(run, pool, org_id)
    assert [(r["units"], r["event_name"], r["stripe_customer_id"]) for r in rows] == [(300, METER, customer)]
    assert month_total(local_stripe, customer) == 300  # was 0
    print(f"\ncancellation: 300 used metered + 4 free; Stripe {month_total(local_stripe, customer)}")


async def test_a_period_used_under_two_meters_reports_each_to_its_own(export_db, local_stripe, exporter):
    _url, pool = export_db
    other = f"meter_{uuid.uuid4().hex[:8]}"
    local_stripe.add_meter(other)
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, f"plan-{other}", included_units=0, stripe_meter=other)
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter()
    await count(pool, org_id, 6)
    await set_plan(pool, org_id, f"plan-{other}")
    await count(pool, org_id, 9)
    rows = await drain(run, pool, org_id)
    assert sorted((r["event_name"], r["units"], r["state"]) for r in rows) == [(METER, 6, "sent"), (other, 9, "sent")]
    assert sorted(r["seq"] for r in rows) == [1, 2]  # one sequence of identifiers per period
    assert (month_total(local_stripe, customer), local_stripe.total(customer, other)) == (6, 9)


# --- a refusal after an attempt that may have landed ----------------------------------------------------------


async def test_a_row_refused_after_an_unanswered_attempt_is_reconciled_not_billed_twice(
    export_db, local_stripe, exporter
):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter(rules=ExportRules(settle=timedelta(0), failed_retry_after=timedelta(0)))
    await count(pool, org_id, 100)
    local_stripe.lose_reply_next(1)  # recorded by Stripe, the answer lost
    local_stripe.fail_next(1, 400)  # the retry refused for another reason
    await settled(run)
    await run.send_due()  # no answer
    await pool.execute("UPDATE driftlock.stripe_exports SET next_attempt_at = now() WHERE org_id = $1", org_id)
    await run.send_due()  # refused
    (row,) = await rows_of(pool, org_id)
    assert row["state"] == "pending" and "reconciling" in row["error"]
    rows = await drain(run, pool, org_id)  # reconciled: Stripe's total includes the row
    assert [(r["units"], r["state"]) for r in rows] == [(100, "sent")]
    assert rows[0]["error"] == "confirmed by Stripe's meter total"
    assert month_total(local_stripe, customer) == 100  # was 200: the failed row's units went in a new row


async def test_a_refused_row_whose_earlier_attempt_never_landed_fails_and_its_units_go_again(
    export_db, local_stripe, exporter
):
    _url, pool = export_db
    org_id, customer = await metered_org(pool, local_stripe)
    run = exporter(rules=ExportRules(settle=timedelta(0), failed_retry_after=timedelta(0)))
    await count(pool, org_id, 100)
    local_stripe.fail_next(1, 500)  # answered 500, nothing recorded (it might have been)
    local_stripe.fail_next(1, 400)
    await settled(run)
    await run.send_due()
    await pool.execute("UPDATE driftlock.stripe_exports SET next_attempt_at = now() WHERE org_id = $1", org_id)
    await run.send_due()
    (row,) = await drain(run, pool, org_id)  # reconciled: Stripe has none of it, so the refusal stands
    assert (row["state"], row["error"]) == (
        "failed",
        "400 api_error: An unknown error occurred (injected by the local Stripe API).",
    )
    for _ in range(2):  # and its units go in the period's next row
        await run.run_once()
    rows = await rows_of(pool, org_id)
    assert [(r["units"], r["state"]) for r in rows] == [(100, "failed"), (100, "sent")]
    assert month_total(local_stripe, customer) == 100

"""The webhook commands of the real `driftlock-gateway` CLI: `webhooks` as a process (start, serve, SIGTERM),
`stripe send-event` for every handled type and both API shapes, `webhooks events` and `webhooks prune`."""

import asyncio
import signal
import sys
import uuid

import pytest

from billing_webhooks.inbox import events
from driftlock_cli import stripe_player, webhook_commands
from driftlock_cli.supervisor import http_ok, start_child, wait_until
from tests.integration.test_cli import assert_one_line_error
from tests.support.cli import run_cli
from tests.support.net import free_port
from tests.support.stripe import OLD_SECRET, SECRET, Stripe


@pytest.fixture(scope="module")
async def webhooks_process(database_url, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("webhooks") / "webhooks.log"
    child = await start_child(
        "webhooks",
        [sys.executable, "-m", "driftlock_cli", "webhooks"],
        env={
            "DATABASE_URL": database_url,
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "DRIFTLOCK_WEBHOOKS_HOST": "127.0.0.1",
            "DRIFTLOCK_WEBHOOKS_PORT": str(port),
        },
        log_file=log,
    )
    await wait_until(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="webhooks to serve", child=child)
    yield f"http://127.0.0.1:{port}/stripe/webhook", child, log
    if child.running:
        assert await child.stop() == 0, log.read_text()


def send_event(url: str, database_url: str, *args: str, secret: str | None = SECRET):
    env = {"STRIPE_WEBHOOK_SECRET": secret or ""}
    return run_cli("stripe", "send-event", *args, "--url", url, "--json", database_url=database_url, env=env)


async def org_row(pool, org_id) -> dict:
    async with pool.acquire() as conn:
        return dict(await conn.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org_id))


def test_the_cli_knows_every_handled_type():
    assert set(webhook_commands.HANDLED_TYPES) == {t.value for t in events.HANDLED_TYPES}


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [("", "STRIPE_WEBHOOK_SECRET is not set"), ("sk_live_123", "must start with whsec_")],
)
def test_webhooks_refuses_to_start_without_a_valid_secret(database_url, secret, fragment):
    result = run_cli("webhooks", database_url=database_url, env={"STRIPE_WEBHOOK_SECRET": secret})
    assert_one_line_error(result, fragment)
    assert "whsec_" not in result.stderr.replace("whsec_ secrets", "").replace("start with whsec_", "")


def test_webhooks_refuses_to_start_without_a_database_url():
    result = run_cli("webhooks", database_url=None, env={"STRIPE_WEBHOOK_SECRET": SECRET})
    assert_one_line_error(result, "DATABASE_URL is not set")
    assert SECRET not in result.stderr


@pytest.mark.parametrize("api_version", ["2024-06-20", "2025-03-31.basil"])
async def test_send_event_delivers_every_handled_type(webhooks_process, database_url, make_org, pool, api_version):
    url, _child, _log = webhooks_process
    org = await make_org()
    outcomes = {}
    story = [
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.trial_will_end",
        "customer.subscription.updated",
        "invoice.payment_failed",
        "invoice.payment_succeeded",
        "customer.subscription.deleted",
    ]
    for step, event_type in enumerate(story):
        # Ten seconds apart in Stripe's time: events of one second are ordered by status rank, then id.
        ago = ("--ago", f"{(len(story) - step) * 10}s")
        extra = ("--status", "trialing") if event_type == "customer.subscription.trial_will_end" else ()
        result = await asyncio.to_thread(
            send_event, url, database_url, event_type, "--org", str(org.id), "--api-version", api_version, *ago, *extra
        )
        sent = result.json()
        assert sent["type"] == event_type and sent["status"] == 200 and sent["id"].startswith("evt_")
        outcomes[event_type] = sent["response"]["outcome"]
    assert set(outcomes.values()) == {"applied"}, outcomes
    async with pool.acquire() as conn:
        versions = await conn.fetch(
            "SELECT DISTINCT api_version FROM driftlock.stripe_events WHERE org_id = $1", org.id
        )
    assert [row["api_version"] for row in versions] == [api_version]
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "canceled" and row["plan_name"] == "free"


async def test_send_event_backdated_and_repeated(webhooks_process, database_url, make_org, pool):
    url, _child, _log = webhooks_process
    org = await make_org()
    await asyncio.to_thread(send_event, url, database_url, "checkout.session.completed", "--org", str(org.id))
    first = await asyncio.to_thread(
        send_event,
        url,
        database_url,
        "invoice.payment_failed",
        "--org",
        str(org.id),
        "--ago",
        "8d",
        "--event-id",
        "evt_cli_" + uuid.uuid4().hex,
    )
    sent = first.json()
    assert sent["response"]["outcome"] == "applied"
    row = await org_row(pool, org.id)
    assert row["billing_status"] == "past_due"
    assert 7.9 * 86400 < (row["updated_at"] - row["past_due_since"]).total_seconds() < 8.1 * 86400
    again = await asyncio.to_thread(
        send_event, url, database_url, "invoice.payment_failed", "--org", str(org.id), "--event-id", sent["id"]
    )
    assert again.json()["response"]["outcome"] == "duplicate"
    text = await asyncio.to_thread(
        run_cli,
        "stripe",
        "send-event",
        "invoice.payment_succeeded",
        "--org",
        str(org.id),
        "--url",
        url,
        database_url=database_url,
        env={"STRIPE_WEBHOOK_SECRET": SECRET},
    )
    assert text.code == 0 and "applied" in text.stdout


async def test_send_event_errors_are_one_line(webhooks_process, database_url):
    url, _child, _log = webhooks_process
    org = str(uuid.uuid4())
    no_secret = await asyncio.to_thread(
        run_cli,
        "stripe",
        "send-event",
        "invoice.payment_failed",
        "--org",
        org,
        "--url",
        url,
        database_url=None,
        env={"STRIPE_WEBHOOK_SECRET": ""},
    )
    assert_one_line_error(no_secret, "no signing secret")
    wrong = await asyncio.to_thread(
        send_event, url, database_url, "invoice.payment_failed", "--org", org, secret="whsec_" + "x" * 32
    )
    assert_one_line_error(wrong, "answered 400", "did not verify")
    nobody = f"http://127.0.0.1:{free_port()}/stripe/webhook"
    unreachable = await asyncio.to_thread(send_event, nobody, database_url, "invoice.payment_failed", "--org", org)
    assert_one_line_error(unreachable, "cannot reach the webhook service")
    bad_org = await asyncio.to_thread(send_event, url, database_url, "invoice.payment_failed", "--org", "acme")
    assert_one_line_error(bad_org, "malformed organisation id")
    assert bad_org.code == 2
    bad_type = await asyncio.to_thread(send_event, url, database_url, "charge.succeeded", "--org", org)
    assert_one_line_error(bad_type, "invalid choice")


async def test_webhooks_events_lists_outcomes(webhooks_process, database_url, make_org):
    url, _child, _log = webhooks_process
    org = await make_org()
    stripe = Stripe(url)
    await stripe.send("checkout.session.completed", org_id=org.id)
    failed = stripe_player.event(
        "checkout.session.completed",
        stripe_player.checkout_session_object(
            customer_id="cus_x",
            subscription_id=None,
            created=stripe_player.event("x", {})["created"],
            client_reference_id="not-an-org",
        ),
    )
    assert (await stripe.deliver(failed)).outcome == "failed"
    mine = (
        await asyncio.to_thread(
            run_cli, "webhooks", "events", "--org", str(org.id), "--json", database_url=database_url
        )
    ).json()
    assert [e["type"] for e in mine["events"]] == ["checkout.session.completed"]
    assert mine["events"][0]["outcome"] == "applied" and mine["events"][0]["org_id"] == str(org.id)
    failures = (
        await asyncio.to_thread(
            run_cli, "webhooks", "events", "--outcome", "failed", "--limit", "500", "--json", database_url=database_url
        )
    ).json()
    assert failed["id"] in {e["id"] for e in failures["events"]}
    text = await asyncio.to_thread(run_cli, "webhooks", "events", "--org", str(org.id), database_url=database_url)
    assert text.code == 0 and "checkout.session.completed" in text.stdout


async def test_webhooks_prune(database_url, make_org, pool, webhooks_process):
    url, _child, _log = webhooks_process
    org = await make_org()
    event, _reply = await Stripe(url).send("checkout.session.completed", org_id=org.id)
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE driftlock.stripe_events SET received_at = now() - interval '100 days' WHERE id = $1", event["id"]
        )
    result = (
        await asyncio.to_thread(
            run_cli, "webhooks", "prune", "--older-than", "90d", "--json", database_url=database_url
        )
    ).json()
    assert result["deleted"] >= 1 and result["received_before"].endswith("Z")
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM driftlock.stripe_events WHERE id = $1", event["id"]) == 0
    too_short = run_cli("webhooks", "prune", "--older-than", "1d", database_url=database_url)
    assert_one_line_error(too_short, "at least 3d")
    assert too_short.code == 2
    assert_one_line_error(
        run_cli("webhooks", "prune", "--older-than", "soon", database_url=database_url), "malformed duration"
    )


async def test_orgs_show_reports_the_billing_state_webhooks_keep(webhooks_process, database_url, make_org):
    url, _child, _log = webhooks_process
    org = await make_org()
    stripe = Stripe(url)
    await stripe.send("checkout.session.completed", org_id=org.id)
    await stripe.send("customer.subscription.created", org_id=org.id, status="trialing", cancel_at_period_end=True)
    shown = (await asyncio.to_thread(run_cli, "orgs", "show", str(org.id), "--json", database_url=database_url)).json()
    assert shown["billing_status"] == "trialing"
    assert shown["trial_end"].endswith("Z") and shown["cancel_at_period_end"] is True
    assert shown["stripe_customer_id"] == stripe_player.customer_for(org.id)


async def test_webhooks_process_drains_and_exits_0_on_sigterm(database_url, tmp_path):
    port = free_port()
    child = await start_child(
        "webhooks",
        [sys.executable, "-m", "driftlock_cli", "webhooks"],
        env={
            "DATABASE_URL": database_url,
            "STRIPE_WEBHOOK_SECRET": f"{SECRET},{OLD_SECRET}",
            "DRIFTLOCK_WEBHOOKS_HOST": "127.0.0.1",
            "DRIFTLOCK_WEBHOOKS_PORT": str(port),
        },
        log_file=tmp_path / "webhooks.log",
    )
    await wait_until(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="webhooks to serve", child=child)
    child.signal(signal.SIGTERM)
    assert await asyncio.wait_for(child.process.wait(), 30) == 0
    log = (tmp_path / "webhooks.log").read_text()
    assert "webhooks stopped" in log
    assert SECRET not in log and OLD_SECRET not in log

"""What an operator's Prometheus and log shipper get from the running gateway (Envoy, two authz replicas, the
webhook service): every metric family the alert rules and the dashboard use is really exported, Envoy's stats
are scrapeable without its admin interface, and the services log one JSON object per line without secrets."""

import aiohttp
import pytest

from driftlock_cli import stripe_player
from tests.support.http import raw_request
from tests.support.log_scan import not_json_lines, scan_logs, secrets_in
from tests.support.observability import metric_list
from tests.support.scrape import family_names, scrape_text


async def exercise(gateway, make_org, make_key) -> None:
    """One request of each kind, so that per-route and per-outcome families exist."""
    org = await make_org()
    _key, secret = await make_key(org.id)
    auth = {"Authorization": f"Bearer {secret}"}
    for path in ("/api/v1/stream/detect", "/api/v1/things", "/api/v1/stream/ingest"):
        assert (await raw_request(gateway.port, "POST", path, auth, b"{}")).status == 200
    assert (await raw_request(gateway.port, "POST", "/api/v1/things", {}, b"")).status == 401
    event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
    body = stripe_player.encode(event)
    headers = {"Stripe-Signature": stripe_player.sign(body, gateway.webhook_secret)}
    assert (await raw_request(gateway.port, "POST", "/stripe/webhook", headers, body)).status == 200


@pytest.fixture(scope="module")
async def scraped(gateway, make_org, make_key) -> dict[str, list[set[str]]]:
    await exercise(gateway, make_org, make_key)
    stack = gateway.stack
    return {
        "authz": [family_names(await scrape_text(stack.authz_metrics_url(i))) for i in range(2)],
        "webhooks": [family_names(await scrape_text(f"{gateway.webhooks_url}/metrics"))],
        "envoy": [family_names(await scrape_text(stack.envoy_stats_url))],
    }


@pytest.fixture(scope="module")
def make_org(pool):
    from driftlock_kernel import orgs
    from tests.conftest import TEST_PLAN

    async def make(*, plan: str = TEST_PLAN):
        async with pool.acquire() as conn:
            return await orgs.create_org(conn, "Observability", plan=plan)

    return make


@pytest.fixture(scope="module")
def make_key(pool):
    from driftlock_kernel import api_keys

    async def make(org_id):
        async with pool.acquire() as conn:
            return await api_keys.create_key(conn, org_id)

    return make


@pytest.mark.parametrize("process", ["authz", "webhooks", "envoy"])
def test_every_listed_metric_is_exported(scraped, process):
    wanted = set(metric_list()["exported"][process])
    for replica, families in enumerate(scraped[process]):
        assert wanted - families == set(), f"{process} #{replica + 1} does not export these"


def test_metrics_another_branch_adds_are_not_exported_yet(scraped):
    """When one appears, move it from `pending` to `exported` in deploy/prometheus/metrics.yml."""
    everything = set().union(*(families for scrapes in scraped.values() for families in scrapes))
    assert set(metric_list()["pending"]) & everything == set()


async def test_envoy_stats_are_served_without_the_admin_interface(gateway):
    stats = f"http://127.0.0.1:{gateway.stack.ports.envoy_stats}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{stats}/stats/prometheus") as response:
            assert response.status == 200 and "envoy_cluster_membership_healthy" in await response.text()
        async with session.get(f"{stats}/ready") as response:
            assert response.status == 200
        for method, path in [("GET", "/stats"), ("GET", "/config_dump"), ("POST", "/quitquitquit"),
                             ("POST", "/stats/prometheus"), ("GET", "/stats/prometheus/../config_dump")]:  # fmt: skip
            async with session.request(method, f"{stats}{path}") as response:
                assert response.status == 404, (method, path)


async def test_per_route_request_counts_are_labelled_by_route(gateway, scraped):
    text = await scrape_text(gateway.stack.envoy_stats_url)
    routes = {
        line.split('envoy_route="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("envoy_vhost_route_upstream_rq_completed{")
    }
    assert {"stream_detect", "read", "stream_ingest", "stripe_webhook"} <= routes


def test_services_log_one_json_object_per_line(gateway, scraped):
    logs = {path.name: path.read_text() for path in gateway.log_dir.glob("*.log")}
    services = {name: text for name, text in logs.items() if name.startswith(("authz", "webhooks", "envoy"))}
    assert {"authz-1.log", "authz-2.log", "webhooks.log", "envoy.log"} <= set(services)
    for name, text in services.items():
        assert not_json_lines(text) == [], name
    assert any('"logger": "authz_service.server"' in text for text in services.values())


def test_no_secret_reached_a_log_line_so_far(gateway, scraped, jwt_secret):
    """The gateway fixture greps the complete logs again when the session ends."""
    assert scan_logs(gateway.log_dir, known=(jwt_secret, gateway.webhook_secret)) == []


def test_the_scanner_finds_each_kind_of_secret():
    lines = [
        "key dlk_live_4fGh8JkL2mNpQrStUvWxYz0123456789abcdef",
        'secret "whsec_abcdefghijklmnop"',
        "stripe sk_test_51AbCdEfGhIjKl",
        "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvcmcifQ.c2lnbmF0dXJlLWhlcmU",
        "jwt secret s3cr3t-s3cr3t-s3cr3t",
    ]
    assert len(secrets_in("\n".join(lines), known=("s3cr3t-s3cr3t-s3cr3t",))) == 5
    assert secrets_in('{"message": "key 1f0e… (dlk_live_4fGh8J…) revoked"}') == []

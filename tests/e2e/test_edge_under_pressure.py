"""An Envoy of its own (the shipped config, rendered) in front of the tests' authz replicas and webhook service:
the per-source limit, slow bodies on the unauthenticated webhook route, and the JSON of replies Envoy makes when
the backend is down or slow."""

import asyncio
import contextlib

import pytest

from driftlock_cli import envoy_config, stripe_player
from driftlock_cli.supervisor import http_ok, start_child, wait_until
from driftlock_kernel.keys import Environment, generate_key
from driftlock_kernel.settings import HostPort
from tests.support.authz_requests import EXT_AUTHZ_SECRET
from tests.support.http import raw_request
from tests.support.net import free_port

DETECT = "/api/v1/stream/detect"


@contextlib.asynccontextmanager
async def edge(gateway, folder, *, backend_port: int, requests_per_source: int = 0, adjust=lambda config: None):
    port, admin = free_port(), free_port()
    config = envoy_config.render(
        envoy_config.load_shipped(),
        listen=HostPort("127.0.0.1", port),
        admin_port=admin,
        backend=HostPort("127.0.0.1", backend_port),
        authz=[HostPort("127.0.0.1", p) for p in gateway.stack.ports.authz],
        webhooks=HostPort("127.0.0.1", gateway.stack.ports.webhooks),
        ext_authz_secret=EXT_AUTHZ_SECRET,
        requests_per_source=requests_per_source,
    )
    adjust(config)
    child = await start_child(
        "edge", envoy_config.command(envoy_config.write(config, folder)), log_file=folder / "envoy.log"
    )
    try:
        await wait_until(http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="Envoy", child=child)
        yield port
    finally:
        await child.stop()


@pytest.fixture
async def tenant_key(make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    return secret


async def test_an_address_whose_keys_are_refused_past_its_share_gets_429_and_another_address_is_served(
    gateway, tmp_path, tenant_key
):
    async with edge(gateway, tmp_path, backend_port=gateway.backend.port, requests_per_source=5) as port:
        invented = [generate_key(Environment.LIVE).secret for _ in range(30)]
        answers = [await raw_request(port, "POST", DETECT, {"Authorization": f"Bearer {k}"}, b"{}") for k in invented]
        limited = [a for a in answers if a.status == 429]
        assert limited and all(a.status in (401, 429) for a in answers)
        error = limited[0].json()["error"]
        assert error["code"] == "rate_limited" and error["request_id"] == limited[0].request_id
        assert int(limited[0].headers["retry-after"]) >= 1
        auth = {"Authorization": f"Bearer {tenant_key}"}
        elsewhere = await raw_request(port, "POST", DETECT, auth, b"{}", source="127.0.0.2")
        assert elsewhere.status == 200
        # Requests without a key from one address keep the plain per-address bucket.
        keyless = await asyncio.gather(
            *(raw_request(port, "POST", DETECT, {}, b"{}", source="127.0.0.3") for _ in range(12))
        )
        assert {a.status for a in keyless} == {401, 429}


async def test_a_paying_key_from_one_address_is_not_limited_by_the_address(gateway, tmp_path, tenant_key):
    """A customer's ingestion behind one NAT address: many more requests a second than the per-address share,
    all served (its plan sets no rate limit here)."""
    auth = {"Authorization": f"Bearer {tenant_key}"}
    async with edge(gateway, tmp_path, backend_port=gateway.backend.port, requests_per_source=5) as port:
        answers = await asyncio.gather(
            *(raw_request(port, "POST", "/api/v1/stream/ingest", auth, b"{}") for _ in range(40))
        )
    assert [a.status for a in answers] == [200] * 40


async def test_a_backend_that_is_down_is_a_json_503_with_retry_after(gateway, tmp_path, tenant_key):
    async with edge(gateway, tmp_path, backend_port=free_port()) as port:  # nothing listens there
        response = await raw_request(port, "POST", DETECT, {"Authorization": f"Bearer {tenant_key}"}, b"{}")
    assert response.status == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"] == {
        "code": "service_unavailable",
        "message": "The service is temporarily unavailable; retry shortly.",
        "request_id": response.request_id,
    }


async def test_a_backend_that_does_not_answer_in_time_is_a_json_504(gateway, tmp_path, tenant_key):
    async def hold(reader, writer):
        await reader.read()  # never answers

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]

    def short_timeout(config):
        # The shipped 60 s, shortened so that the test does not wait a minute; the reply's shape is the same.
        (listener,) = config["static_resources"]["listeners"]
        routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]
        for route in routes["routes"]:
            if route.get("name") == "stream_detect":
                route["route"]["timeout"] = "0.5s"

    try:
        async with edge(gateway, tmp_path, backend_port=silent_port, adjust=short_timeout) as port:
            response = await raw_request(port, "POST", DETECT, {"Authorization": f"Bearer {tenant_key}"}, b"{}")
    finally:
        silent.close()
    assert response.status == 504
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "gateway_timeout"
    assert response.json()["error"]["request_id"] == response.request_id


SLOW_BODIES = 1200


async def test_slow_bodies_on_the_webhook_route_do_not_hold_up_stripes_deliveries(gateway, tmp_path, make_org):
    """1,200 clients each send a webhook's headers and a few bytes of a body, then wait: more than Envoy's default
    1,024 connections to the webhook service. A real delivery still goes through while they wait."""
    async with edge(gateway, tmp_path, backend_port=gateway.backend.port) as port:
        slow = []
        head = (
            f"POST /stripe/webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            'Stripe-Signature: t=1,v1=00\r\nContent-Length: 100000\r\n\r\n{"id": '
        ).encode()
        try:
            for _ in range(SLOW_BODIES):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                slow.append((reader, writer))
            await asyncio.gather(*(writer.drain() for _reader, writer in slow))
            org = await make_org()
            event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
            body = stripe_player.encode(event)
            signed = {"Stripe-Signature": stripe_player.sign(body, gateway.webhook_secret)}
            # Well within the 10 s after which the webhook service would cut the slow ones itself.
            delivered = await asyncio.wait_for(raw_request(port, "POST", "/stripe/webhook", signed, body), 5)
            assert delivered.status == 200, delivered.body
            assert delivered.json()["outcome"] == "applied"
            # The slow ones are still waiting: Envoy holds them, the webhook service never saw them.
            assert sum(1 for reader, _writer in slow if not reader.at_eof()) > SLOW_BODIES // 2
        finally:
            for _reader, writer in slow:
                writer.close()

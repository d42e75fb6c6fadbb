"""TLS at the edge: with a certificate and key configured, Envoy's public listener speaks HTTPS (Stripe sends
live webhooks only over HTTPS) and the same route table and ext_authz run behind it."""

import ssl

import aiohttp
import pytest

from driftlock_cli.stack import start_stack
from tests.support.net import free_stack_ports
from tests.support.tls import client_context, self_signed


@pytest.fixture(scope="module")
async def tls_stack(database_url, jwt_secret, tmp_path_factory):
    state = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(state)
    stack = await start_stack(
        database_url=database_url,
        jwt_secret=jwt_secret,
        state_dir=state,
        ports=free_stack_ports(),
        log_dir=state / "logs",
        tls=(str(cert), str(key)),
    )
    yield stack
    await stack.stop()


async def test_the_edge_answers_https_with_the_configured_certificate(tls_stack, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    assert tls_stack.envoy_url.startswith("https://")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context())) as session:
        async with session.get(f"{tls_stack.envoy_url}/healthz") as response:
            assert response.status == 200
        async with session.post(
            f"{tls_stack.envoy_url}/api/v1/stream/detect", headers={"Authorization": f"Bearer {secret}"}
        ) as response:
            assert response.status == 200, await response.text()
        async with session.post(f"{tls_stack.envoy_url}/api/v1/stream/detect") as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "missing_api_key"


async def test_a_client_that_does_not_trust_the_certificate_is_refused(tls_stack):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl.create_default_context())) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"{tls_stack.envoy_url}/healthz")


async def test_plain_http_is_not_served_on_the_tls_listener(tls_stack):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{tls_stack.ports.envoy}/healthz") as response:
                await response.read()

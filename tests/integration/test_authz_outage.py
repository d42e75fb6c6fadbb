"""authz when PostgreSQL goes away: recently verified keys keep working, nothing unverified passes, and it all
comes back by itself."""

import json
import sys

import aiohttp
import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from driftlock_cli.supervisor import grpc_serving, start_child, wait_until
from driftlock_kernel import api_keys
from tests.support.admin import signing_key_env
from tests.support.authz_requests import bearer, check_request
from tests.support.net import eventually, free_port
from tests.support.tcp_proxy import FaultProxy


def code_of(response) -> str:
    if response.HasField("ok_response"):
        return "ok"
    return json.loads(response.denied_response.body)["error"]["code"]


@pytest.fixture
async def proxied_authz(database_url, jwt_secret, tmp_path):
    proxy = await FaultProxy(database_url).start()
    port, metrics_port = free_port(), free_port()
    child = await start_child(
        "authz",
        [sys.executable, "-m", "driftlock_cli", "authz"],
        env={
            "DATABASE_URL": proxy.url(),
            "DRIFTLOCK_JWT_SECRET": jwt_secret,
            **signing_key_env(),
            "DRIFTLOCK_AUTHZ_HOST": "127.0.0.1",
            "DRIFTLOCK_AUTHZ_PORT": str(port),
            "DRIFTLOCK_AUTHZ_METRICS_PORT": str(metrics_port),
            # Short trust, so the test exercises the outage fallback rather than plain cache hits.
            "DRIFTLOCK_KEY_CACHE_TTL_SECONDS": "0.2",
            "DRIFTLOCK_KEY_CACHE_NEGATIVE_TTL_SECONDS": "0.2",
            "DRIFTLOCK_KEY_CACHE_STALE_SECONDS": "60",
            "DRIFTLOCK_DB_LOOKUP_TIMEOUT_SECONDS": "0.5",
        },
        log_file=tmp_path / "authz.log",
    )
    await wait_until(grpc_serving(f"127.0.0.1:{port}"), timeout=30, what="authz to serve", child=child)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)

    async def check(secret: str) -> str:
        return code_of(await stub.Check(check_request(bearer(secret)), timeout=5))

    async def stale_answers() -> float:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "driftlock_authz_cache_events_total" and sample.labels["result"] == "stale":
                    return sample.value
        return 0.0

    yield check, proxy, stale_answers
    await channel.close()
    assert await child.stop() == 0, (tmp_path / "authz.log").read_text()
    await proxy.stop()


async def test_outage_keeps_recent_keys_and_refuses_unknown_ones(proxied_authz, make_org, make_key, pool):
    check, proxy, stale_answers = proxied_authz
    org = await make_org()
    _seen_key, seen = await make_key(org.id)
    unseen_key, unseen = await make_key(org.id)
    assert await check(seen) == "ok"

    await proxy.cut()
    assert await check(unseen) == "auth_unavailable"

    async def seen_served_from_the_outage_fallback() -> bool:
        assert await check(seen) == "ok"
        return await stale_answers() > 0

    await eventually(seen_served_from_the_outage_fallback, within=5, what="a cached key served past its TTL")
    for _ in range(5):
        assert await check(seen) == "ok"
        assert await check(unseen) == "auth_unavailable"

    await proxy.restore()

    async def unseen_works() -> bool:
        return await check(unseen) == "ok"

    await eventually(unseen_works, within=10, what="authz to reach the database again")

    # The listener reconnected too: a revocation is pushed again, not only picked up by the TTL.
    async with pool.acquire() as conn:
        await api_keys.revoke_key(conn, unseen_key.id)

    async def revoked() -> bool:
        return await check(unseen) == "revoked_api_key"

    await eventually(revoked, within=5, what="revocation after the outage")

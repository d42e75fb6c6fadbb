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
from driftlock_kernel.keys import Environment, generate_key
from tests.support.authz_child import authz_env
from tests.support.authz_requests import authz_channel, bearer, check_request
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
        env=authz_env(
            proxy.url(),
            jwt_secret,
            port,
            metrics_port,
            # Short trust, so the test exercises the outage fallback rather than plain cache hits.
            key_cache_ttl_seconds=0.2,
            key_cache_negative_ttl_seconds=0.2,
            key_cache_stale_seconds=60,
            database_lookup_timeout_seconds=0.5,
        ),
        log_file=tmp_path / "authz.log",
    )
    await wait_until(grpc_serving(f"127.0.0.1:{port}"), timeout=30, what="authz to serve", child=child)
    channel = authz_channel(f"127.0.0.1:{port}")
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

    async def invalidations() -> float:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                text = await response.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "driftlock_authz_invalidations_total"
        )

    check.invalidations = invalidations  # type: ignore[attr-defined]

    yield check, proxy, stale_answers, tmp_path / "authz.log"
    await channel.close(grace=None)
    assert await child.stop() == 0, (tmp_path / "authz.log").read_text()
    await proxy.stop()


async def test_outage_keeps_recent_keys_and_refuses_unknown_ones(proxied_authz, make_org, make_key, pool):
    check, proxy, stale_answers, _log = proxied_authz
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


async def test_an_outage_is_a_few_log_lines_not_one_per_check(proxied_authz, make_org, make_key):
    """Billable checks of a known key (each asking for usage the database cannot give) and checks of keys never
    seen (each a failed look-up), 400 in all while the database is away: each kind of failure is one line, the
    rest counted (and written when the minute ends)."""
    check, proxy, _stale_answers, log = proxied_authz
    before = await check.invalidations()
    org = await make_org()
    _key, known = await make_key(org.id)

    async def creation_pushed() -> bool:  # else it could drop the cached key after the check below
        return await check.invalidations() >= before + 1  # the key row inserted

    await eventually(creation_pushed, within=10, what="the new key's invalidation to arrive")
    assert await check(known) == "ok"
    await proxy.cut()
    before = log.read_text().splitlines()
    for _ in range(200):
        assert await check(known) == "ok"
        # Refused either way, without a look-up that could be served: from the key index while its listener is
        # up (through a transaction pooler LISTEN goes straight to the database, which is still there), or as
        # unavailable while it is down too.
        assert await check(generate_key(Environment.LIVE).secret) in ("invalid_api_key", "auth_unavailable")
    during = log.read_text().splitlines()[len(before) :]
    warnings = [line for line in during if "WARNING" in line]
    print(f"\n400 checks during an outage: {len(during)} log lines, {len(warnings)} warnings")
    assert len([line for line in warnings if "key look-up failed" in line]) <= 1
    assert len([line for line in warnings if "could not read usage" in line]) <= 1
    assert len(during) <= 10
    await proxy.restore()


async def _health(port: int) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization"), timeout=2
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def _start_authz(database_url: str, jwt_secret: str, log_file):
    port = free_port()
    child = await start_child(
        "authz",
        [sys.executable, "-m", "driftlock_cli", "authz"],
        env=authz_env(database_url, jwt_secret, port, free_port()),
        log_file=log_file,
    )

    async def answers_health() -> bool:
        return await _health(port) in ("SERVING", "NOT_SERVING")

    await wait_until(answers_health, timeout=30, what="authz to answer health checks", child=child)
    return child, port


async def test_authz_never_reached_the_database_is_not_serving_until_it_does(database_url, jwt_secret, tmp_path):
    proxy = await FaultProxy(database_url).start()
    await proxy.cut()
    log_file = tmp_path / "authz.log"
    child, port = await _start_authz(proxy.url(), jwt_secret, log_file)
    try:

        async def says_why() -> bool:
            return "NOT_SERVING: the database at 127.0.0.1" in log_file.read_text()

        await eventually(says_why, within=10, what="a log line saying why authz is not serving")
        assert await _health(port) == "NOT_SERVING"
        await proxy.restore()

        async def serving() -> bool:
            return await _health(port) == "SERVING"

        await eventually(serving, within=10, what="SERVING once the database answered")
        # From then on the cache's stale window decides: an outage does not take it out of rotation.
        await proxy.cut()
        for _ in range(5):
            assert await _health(port) == "SERVING"
    finally:
        assert await child.stop() == 0, log_file.read_text()
        await proxy.stop()


async def test_authz_with_an_unparseable_database_url_is_not_serving_and_says_why(jwt_secret, tmp_path):
    log_file = tmp_path / "authz.log"
    child, port = await _start_authz("postgresql://[not-a-host", jwt_secret, log_file)
    try:

        async def says_why() -> bool:
            return "NOT_SERVING" in log_file.read_text() and "ValueError" in log_file.read_text()

        await eventually(says_why, within=10, what="a log line saying why authz is not serving")
        assert await _health(port) == "NOT_SERVING"
    finally:
        assert await child.stop() == 0, log_file.read_text()

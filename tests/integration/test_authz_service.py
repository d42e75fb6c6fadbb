"""The authz process over real gRPC, without Envoy: each contract code, health, and push invalidation."""

import asyncio
import json
import time
from datetime import timedelta

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driftlock_kernel import api_keys, orgs
from driftlock_kernel.keys import Environment, generate_key
from tests.support.authz_requests import READ, STREAM_DETECT, authz_channel, bearer, check_request, response_headers
from tests.support.net import eventually


@pytest.fixture(scope="module")
async def channels(gateway):
    opened = [authz_channel(gateway.authz_target(i)) for i in range(2)]
    yield opened
    for channel in opened:
        await channel.close(grace=None)


@pytest.fixture
def check(channels):
    async def call(headers, context=STREAM_DETECT, *, replica: int = 0, **kwargs):
        stub = external_auth_pb2_grpc.AuthorizationStub(channels[replica])
        return await stub.Check(check_request(headers, context, **kwargs), timeout=5)

    return call


def denial(response) -> tuple[int, str]:
    assert response.HasField("denied_response"), "expected a denial"
    return response.denied_response.status.code, json.loads(response.denied_response.body)["error"]["code"]


async def test_health_reports_serving_for_the_authorization_service(channels):
    stub = health_pb2_grpc.HealthStub(channels[0])
    for service in ("", "envoy.service.auth.v3.Authorization"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_valid_key_is_allowed_with_context_headers(check, make_org, make_key):
    org = await make_org()
    key, secret = await make_key(org.id)
    response = await check(bearer(secret))
    assert response.HasField("ok_response")
    headers = response_headers(response)
    assert headers["x-driftlock-org-id"] == str(org.id)
    assert headers["x-driftlock-key-id"] == str(key.id)
    assert headers["x-driftlock-billable"] == "true"


async def test_missing_key(check):
    assert denial(await check({})) == (401, "missing_api_key")


async def test_malformed_key(check):
    assert denial(await check(bearer("dlk_live_nonsense"))) == (401, "invalid_api_key")


async def test_well_formed_unknown_key(check):
    assert denial(await check(bearer(generate_key(Environment.LIVE).secret))) == (401, "invalid_api_key")


async def test_revoked_key(check, make_org, make_key, pool):
    org = await make_org()
    key, secret = await make_key(org.id)
    async with pool.acquire() as conn:
        await api_keys.revoke_key(conn, key.id)
    assert denial(await check(bearer(secret))) == (401, "revoked_api_key")


async def test_expired_key(check, make_org, make_key, pool):
    org = await make_org()
    key, secret = await make_key(org.id, expires_in=timedelta(days=1))
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE driftlock.api_keys SET expires_at = now() - interval '1 second' WHERE id = $1", key.id
        )
    assert denial(await check(bearer(secret))) == (401, "expired_api_key")


async def test_insufficient_scope(check, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id, scopes=("read",))
    assert denial(await check(bearer(secret), STREAM_DETECT)) == (403, "insufficient_scope")
    assert (await check(bearer(secret), READ)).HasField("ok_response")


async def test_suspended_org(check, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)
    assert denial(await check(bearer(secret))) == (403, "org_suspended")


async def test_route_without_context_fails_closed(check, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    assert denial(await check(bearer(secret), {})) == (503, "auth_unavailable")


async def test_test_key_is_never_billable(check, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id, test=True)
    headers = response_headers(await check(bearer(secret)))
    assert headers["x-driftlock-environment"] == "test"
    assert headers["x-driftlock-billable"] == "false"


async def test_revocation_reaches_both_replicas_within_one_second(check, make_org, make_key, pool):
    org = await make_org()
    key, secret = await make_key(org.id)
    for replica in (0, 1):  # both replicas have the key cached as valid
        assert (await check(bearer(secret), replica=replica)).HasField("ok_response")
    async with pool.acquire() as conn:
        await api_keys.revoke_key(conn, key.id)
    revoked_at = time.monotonic()

    async def revoked_everywhere() -> bool:
        results = [await check(bearer(secret), replica=r) for r in (0, 1)]
        return all(r.HasField("denied_response") for r in results)

    await eventually(revoked_everywhere, within=1.0, what="revocation seen by both authz replicas")
    assert time.monotonic() - revoked_at < 1.0


async def test_suspension_made_in_plain_sql_reaches_both_replicas(check, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    for replica in (0, 1):
        assert (await check(bearer(secret), replica=replica)).HasField("ok_response")
    async with pool.acquire() as conn:  # as an operator would in Supabase's SQL editor
        await conn.execute("UPDATE driftlock.organizations SET suspended_at = now() WHERE id = $1", org.id)

    async def suspended_everywhere() -> bool:
        codes = [denial_code(await check(bearer(secret), replica=r)) for r in (0, 1)]
        return codes == ["org_suspended", "org_suspended"]

    await eventually(suspended_everywhere, within=1.0, what="suspension seen by both replicas")
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, False)

    async def serving_everywhere() -> bool:
        results = [await check(bearer(secret), replica=r) for r in (0, 1)]
        return all(r.HasField("ok_response") for r in results)

    await eventually(serving_everywhere, within=1.0, what="resumption seen by both replicas")


def denial_code(response) -> str | None:
    if not response.HasField("denied_response"):
        return None
    return json.loads(response.denied_response.body)["error"]["code"]


async def test_many_concurrent_checks_are_all_answered(check, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    responses = await asyncio.gather(*(check(bearer(secret), request_id=f"r{i}") for i in range(200)))
    assert all(r.HasField("ok_response") for r in responses)


async def test_dunning_grace_then_402_on_billable_only_then_payment_lifts_it(check, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    async with pool.acquire() as conn:  # failed a day ago: within the default 7-day grace
        await conn.execute(
            "UPDATE driftlock.organizations SET billing_status = 'past_due', past_due_since = now() - interval '1 day'"
            " WHERE id = $1",
            org.id,
        )
    assert denial_code(await check(bearer(secret))) is None
    async with pool.acquire() as conn:  # and now past it
        await conn.execute(
            "UPDATE driftlock.organizations SET past_due_since = now() - interval '8 days' WHERE id = $1", org.id
        )

    async def blocked_on_both() -> bool:
        codes = [denial_code(await check(bearer(secret), replica=r)) for r in (0, 1)]
        return codes == ["payment_required", "payment_required"]

    await eventually(blocked_on_both, within=1.0, what="payment_required on both replicas")
    assert denial(await check(bearer(secret))) == (402, "payment_required")
    assert denial_code(await check(bearer(secret), READ)) is None
    ingest = {"scope": "ingest", "billable": "false", "product": "stream"}
    assert denial_code(await check(bearer(secret), ingest)) is None

    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE driftlock.organizations SET billing_status = 'active', past_due_since = NULL WHERE id = $1", org.id
        )

    async def lifted_on_both() -> bool:
        codes = [denial_code(await check(bearer(secret), replica=r)) for r in (0, 1)]
        return codes == [None, None]

    await eventually(lifted_on_both, within=1.0, what="payment lifting the block on both replicas")


async def test_canceled_subscription_is_served_as_free(check, make_org, make_key, pool):
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO driftlock.plans (name, included_units) VALUES ('pro-test', 100) ON CONFLICT DO NOTHING"
        )
    org = await make_org(plan="pro-test")
    _key, secret = await make_key(org.id)
    assert response_headers(await check(bearer(secret)))["x-driftlock-plan"] == "pro-test"
    async with pool.acquire() as conn:
        await conn.execute("UPDATE driftlock.organizations SET billing_status = 'canceled' WHERE id = $1", org.id)

    async def free_now() -> bool:
        response = await check(bearer(secret))
        return response.HasField("ok_response") and response_headers(response)["x-driftlock-plan"] == "free"

    await eventually(free_now, within=1.0, what="canceled organisation served as free")


@pytest.mark.parametrize("secret", [None, "not-the-secret-" + "x" * 40])
async def test_only_a_caller_with_the_ext_authz_secret_may_call_check(gateway, make_org, make_key, secret):
    """Anything else that reaches the port (another container, another pod) can neither have keys checked nor get
    a context token signed for context extensions of its own choosing."""
    org = await make_org()
    _key, key = await make_key(org.id)
    request = check_request(bearer(key), {"scope": "detect", "billable": "false"})
    channel = (
        authz_channel(gateway.authz_target(0), secret) if secret else grpc.aio.insecure_channel(gateway.authz_target(0))
    )
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health stays open to Envoy's health checks, which carry no secret.
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

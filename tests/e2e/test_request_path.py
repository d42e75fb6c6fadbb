"""Client -> real Envoy -> real authz (two replicas) -> real PostgreSQL -> a recording backend."""

import asyncio
import time
import uuid
from datetime import timedelta

import pytest

from driftlock_cli import stripe_player
from driftlock_kernel import api_keys, orgs
from driftlock_kernel.keys import Environment, generate_key
from tests.conftest import TEST_PLAN
from tests.support.http import raw_request
from tests.support.net import eventually

DETECT = "/api/v1/stream/detect"


@pytest.fixture
def send(gateway):
    async def request(path: str = DETECT, headers=(), method: str = "POST", body: bytes = b"{}"):
        return await raw_request(gateway.port, method, path, headers, body)

    return request


@pytest.fixture
async def tenant(make_org, make_key):
    org = await make_org(name="E2E")
    key, secret = await make_key(org.id)
    return org, key, secret


def assert_error(response, status: int, code: str) -> None:
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.request_id and response.request_id
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1


async def test_allowed_request_reaches_backend_with_the_contract_headers(gateway, send, tenant, context_signing_keys):
    org, key, secret = tenant
    response = await send(headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 200
    received = gateway.backend.by_request_id(response.request_id)
    assert received.path == DETECT
    assert received.header("x-driftlock-org-id") == str(org.id)
    assert received.header("x-driftlock-key-id") == str(key.id)
    assert received.header("x-driftlock-plan") == TEST_PLAN
    assert received.header("x-driftlock-environment") == "live"
    assert received.header("x-driftlock-billable") == "true"
    claims = context_signing_keys[0].verify(received.header("x-driftlock-context"))
    assert claims["sub"] == str(org.id)
    assert claims["key_id"] == str(key.id)
    assert claims["plan"] == TEST_PLAN and claims["env"] == "live" and claims["billable"] is True
    assert sorted(claims["scopes"]) == ["detect", "ingest", "read"]
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert "authorization" not in received.names()
    assert "x-api-key" not in received.names()


async def test_x_api_key_header_works_too(gateway, send, tenant):
    _org, key, secret = tenant
    response = await send(headers={"X-API-Key": secret})
    assert response.status == 200
    received = gateway.backend.by_request_id(response.request_id)
    assert received.header("x-driftlock-key-id") == str(key.id)
    assert "x-api-key" not in received.names()


async def test_spoofed_context_headers_never_reach_the_backend(gateway, send, tenant):
    org, _key, secret = tenant
    spoofs = [
        ("X-Driftlock-Org-Id", str(uuid.uuid4())),
        ("x-driftlock-org-id", "second-copy"),
        ("X-DriftLock-Plan", "enterprise"),
        ("x-driftlock-billable", "false"),
        ("x-driftlock-environment", "test"),
        ("x-driftlock-context", "forged.token.value"),
        ("x-driftlock-key-id", "forged"),
        ("x-driftlock-anything-else", "1"),
    ]
    response = await send(headers=[("Authorization", f"Bearer {secret}"), *spoofs])
    assert response.status == 200
    received = gateway.backend.by_request_id(response.request_id)
    assert received.header("x-driftlock-org-id") == str(org.id)
    assert received.header("x-driftlock-plan") == TEST_PLAN
    assert received.header("x-driftlock-billable") == "true"
    assert received.header("x-driftlock-environment") == "live"
    assert received.header("x-driftlock-context") != "forged.token.value"
    assert "x-driftlock-anything-else" not in received.names()
    forwarded = {k for k in received.names() if k.startswith("x-driftlock-")}
    assert forwarded == {f"x-driftlock-{n}" for n in ("org-id", "key-id", "plan", "environment", "billable", "context")}


async def test_underscore_spelling_of_a_context_header_is_refused_at_the_edge(gateway, send, tenant):
    _org, _key, secret = tenant
    before = len(gateway.backend.received)
    response = await send(headers=[("Authorization", f"Bearer {secret}"), ("x_driftlock_org_id", "spoof")])
    assert response.status == 400
    assert len(gateway.backend.received) == before


async def test_client_chosen_request_id_is_replaced(gateway, send, tenant):
    _org, _key, secret = tenant
    response = await send(headers={"Authorization": f"Bearer {secret}", "X-Request-Id": "client-chosen-1"})
    assert response.status == 200
    assert response.request_id != "client-chosen-1"
    assert gateway.backend.by_request_id(response.request_id).header("x-request-id") != "client-chosen-1"


async def test_missing_key(send):
    assert_error(await send(), 401, "missing_api_key")


@pytest.mark.parametrize("credential", ["dlk_live_short", "sk_live_123", generate_key(Environment.LIVE).secret])
async def test_invalid_key(send, credential):
    assert_error(await send(headers={"Authorization": f"Bearer {credential}"}), 401, "invalid_api_key")


async def test_revoked_key(send, tenant, pool):
    _org, key, secret = tenant
    async with pool.acquire() as conn:
        await api_keys.revoke_key(conn, key.id)
    assert_error(await send(headers={"Authorization": f"Bearer {secret}"}), 401, "revoked_api_key")


async def test_key_expires(send, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id, expires_in=timedelta(seconds=2))
    assert (await send(headers={"Authorization": f"Bearer {secret}"})).status == 200

    async def expired() -> bool:
        response = await send(headers={"Authorization": f"Bearer {secret}"})
        return response.status == 401 and response.json()["error"]["code"] == "expired_api_key"

    await eventually(expired, within=10, what="the key to answer expired_api_key", interval=0.2)


async def test_insufficient_scope(send, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id, scopes=("read", "ingest"))
    assert_error(await send(headers={"Authorization": f"Bearer {secret}"}), 403, "insufficient_scope")
    assert (await send("/api/v1/stream/ingest", headers={"Authorization": f"Bearer {secret}"})).status == 200
    assert (await send("/api/v1/models", headers={"Authorization": f"Bearer {secret}"}, method="GET")).status == 200


async def test_suspended_org_answers_within_a_second_and_resumes(send, tenant, pool):
    org, _key, secret = tenant
    auth = {"Authorization": f"Bearer {secret}"}
    for _ in range(4):  # warm both replicas' caches
        assert (await send(headers=auth)).status == 200
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)

    async def all_suspended() -> bool:
        responses = [await send(headers=auth) for _ in range(4)]
        return all(r.status == 403 for r in responses)

    await eventually(all_suspended, within=1.0, what="suspension through Envoy")
    assert_error(await send(headers=auth), 403, "org_suspended")
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, False)

    async def all_serving() -> bool:
        responses = [await send(headers=auth) for _ in range(4)]
        return all(r.status == 200 for r in responses)

    await eventually(all_serving, within=1.0, what="resumption through Envoy")


async def test_revocation_through_envoy_on_both_replicas_within_a_second(send, tenant, pool):
    _org, key, secret = tenant
    auth = {"Authorization": f"Bearer {secret}"}
    for _ in range(4):  # round robin: both replicas now hold the key
        assert (await send(headers=auth)).status == 200
    async with pool.acquire() as conn:
        await api_keys.revoke_key(conn, key.id)
    started = time.monotonic()

    async def revoked() -> bool:
        responses = await asyncio.gather(*(send(headers=auth) for _ in range(6)))
        return all(r.status == 401 for r in responses)

    await eventually(revoked, within=1.0, what="revocation through Envoy")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "path",
    [
        "//api/v1/stream/detect",
        "/api/v1//stream/detect",
        "/api/v1/./stream/detect",
        "/api/v1/x/../stream/detect",
        "/api/v1/stream/%64etect",
        "/api/v1/%73tream/detect",
        "/api/v1/stream/detect/",
        "/api/v1/stream/detect/x",
        "/api/v1/stream/detect?x=1",
        "/api/v1/stream\\detect",
        "/api/v1/monitor/../stream/detect",
    ],
)
async def test_path_spellings_of_a_billable_route_stay_billable(gateway, send, tenant, path):
    _org, _key, secret = tenant
    response = await send(path, headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 200, response.body
    received = gateway.backend.by_request_id(response.request_id)
    assert received.path.split("?")[0].rstrip("/").startswith(DETECT)
    assert received.header("x-driftlock-billable") == "true"
    assert received.header("x-driftlock-context")


@pytest.mark.parametrize("path", ["/api/v1/stream%2Fdetect", "/api/v1/stream%2fdetect", "/api/v1%2Fstream/detect"])
async def test_encoded_slashes_are_redirected_to_the_plain_path_not_forwarded(gateway, send, tenant, path):
    _org, _key, secret = tenant
    before = len(gateway.backend.received)
    response = await send(path, headers={"Authorization": f"Bearer {secret}"})
    assert response.status in (301, 307, 308)
    assert response.headers["location"].endswith(DETECT)
    assert len(gateway.backend.received) == before


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/admin",
        "/api/v2/stream/detect",
        "/api/v1",
        "/API/v1/stream/detect",
        "/api/v1/Stream/detect",
        "/api/v1/stream/DETECT",
        "/api/v1/stream/detectx",
        "/api/v1/stream/detect%3F",
        "/api/v1/stream/detect;x=1",
        "/api/v1/monitor/ingestion",
    ],
)
async def test_unknown_and_lookalike_paths_are_404_at_the_edge(gateway, send, tenant, path):
    _org, _key, secret = tenant
    before = len(gateway.backend.received)
    response = await send(path, headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 404
    assert response.json()["error"]["code"] == "not_found"
    assert response.json()["error"]["request_id"] == response.request_id
    assert len(gateway.backend.received) == before


async def test_healthz_is_answered_by_envoy_without_a_key(gateway, send):
    before = len(gateway.backend.received)
    response = await send("/healthz", method="GET", body=b"")
    assert response.status == 200
    assert len(gateway.backend.received) == before


async def test_stripe_webhook_goes_to_the_webhooks_service_without_a_key(gateway, send, make_org, pool):
    # No API key: with ext_authz on this route, Envoy would answer 401 missing_api_key before any service.
    org = await make_org()
    event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
    body = stripe_player.encode(event)
    signed = {"Stripe-Signature": stripe_player.sign(body, gateway.webhook_secret), "Content-Type": "application/json"}
    response = await send("/stripe/webhook", headers=signed, body=body)
    assert response.status == 200, response.body
    assert response.json()["id"] == event["id"] and response.json()["outcome"] == "applied"
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT org_id FROM driftlock.stripe_events WHERE id = $1", event["id"])
    assert stored == org.id
    # An unsigned delivery reaches the service too, which refuses it itself (its error, not Envoy's).
    unsigned = await send("/stripe/webhook", headers={"Stripe-Signature": "t=1,v1=x"}, body=b'{"id":"evt_1"}')
    assert unsigned.status == 400
    assert unsigned.json()["error"]["code"] == "invalid_signature"
    assert unsigned.json()["error"]["request_id"] == unsigned.request_id
    assert not any(r.path == "/stripe/webhook" for r in gateway.backend.received)


async def test_read_routes_are_not_billable(gateway, send, tenant):
    _org, _key, secret = tenant
    response = await send("/api/v1/monitor/ingest/batch", headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 200
    assert gateway.backend.by_request_id(response.request_id).header("x-driftlock-billable") == "false"

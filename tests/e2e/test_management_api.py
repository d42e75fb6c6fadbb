"""The management API as the dashboard's server uses it: JSON over HTTP on Envoy's management listener
(gRPC-JSON transcoding) -> real authz (two replicas) -> real PostgreSQL; and what each call changes on the public
listener. Errors come back as JSON (google.rpc.Status) with the HTTP status of their gRPC code."""

import asyncio
import time
import uuid

import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from driftlock_kernel import admin_audit, context_keys
from tests.conftest import TEST_PLAN
from tests.support.admin import JsonApi, admin_token
from tests.support.authz_requests import authz_channel, bearer, check_request
from tests.support.http import raw_request
from tests.support.net import eventually

DETECT = "/api/v1/stream/detect"


@pytest.fixture
def api(gateway, admin_secret) -> JsonApi:
    return JsonApi(gateway.management_port, admin_secret)


@pytest.fixture
def public(gateway):
    async def send(secret: str, path: str = DETECT, method: str = "POST"):
        return await raw_request(gateway.port, method, path, {"Authorization": f"Bearer {secret}"}, b"{}")

    return send


@pytest.fixture(scope="module")
async def replicas(gateway):
    channels = [authz_channel(gateway.authz_target(i)) for i in range(2)]
    yield [external_auth_pb2_grpc.AuthorizationStub(channel) for channel in channels]
    for channel in channels:
        await channel.close(grace=None)


def ok(response) -> dict:
    assert response.status == 200, (response.status, response.body)
    assert response.headers["content-type"] == "application/json"
    return response.json()


def refused(response, status: int, reason: str) -> dict:
    """A gRPC error as the transcoder renders it: the HTTP status of its code, google.rpc.Status as JSON."""
    assert response.status == status, (response.status, response.body)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["message"]
    (info,) = [d for d in body["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert info["reason"] == reason and info["domain"] == "driftlock-gateway"
    assert info["metadata"]["request_id"] == response.request_id  # Envoy's id, also in the audit log
    return body


async def new_org(api: JsonApi, name: str = "Management API org") -> dict:
    return ok(await api.call("POST", "/v1/orgs", {"name": name, "plan": TEST_PLAN}))


async def test_the_jwks_is_public_and_verifies_the_context_token_the_backend_gets(
    gateway, api, public, context_signing_keys, make_org, make_key
):
    response = await api.call("GET", "/.well-known/jwks.json", token="")
    jwks = ok(response)
    assert jwks == context_signing_keys[0].jwks()
    assert [key["kid"] for key in jwks["keys"]] == ["tests-current", "tests-next"]
    org = await make_org()
    key, secret = await make_key(org.id)
    sent = await public(secret)
    assert sent.status == 200
    token = gateway.backend.by_request_id(sent.request_id).header("x-driftlock-context")
    claims = context_keys.verify_with_jwks(token, jwks)
    assert (claims["sub"], claims["key_id"]) == (str(org.id), str(key.id))


async def test_an_organisation_and_its_keys_through_json(api, public, gateway):
    org = await new_org(api)
    assert (org["plan"], org["billing_status"], org["suspended"]) == (TEST_PLAN, "none", False)
    assert ok(await api.call("GET", f"/v1/orgs/{org['id']}")) == org

    created = ok(
        await api.call(
            "POST",
            f"/v1/orgs/{org['id']}/keys",
            {"name": "dashboard key", "scopes": ["detect", "read"], "expires_in_seconds": 3600, "metadata": {"u": 7}},
        )
    )
    secret, key = created["key"], created["api_key"]
    assert secret.startswith("dlk_live_") and key["prefix"] == secret[: len(key["prefix"])]
    assert (key["name"], key["scopes"], key["environment"]) == ("dashboard key", ["detect", "read"], "live")
    assert key["metadata"] == {"u": 7} and key["expires_at"] and "last_used_at" not in key
    assert (await public(secret)).status == 200

    listed = await api.call("GET", f"/v1/orgs/{org['id']}/keys")
    assert secret.encode() not in listed.body  # the secret is never shown again
    assert [k["id"] for k in ok(listed)["keys"]] == [key["id"]]

    # last_used_at is written in batches (every 0.5 s in the tests), not on the request path.
    async def last_used() -> bool:
        return "last_used_at" in ok(await api.call("GET", f"/v1/keys/{key['id']}"))

    await eventually(last_used, within=10, what="last_used_at to be recorded", interval=0.2)

    updated = ok(await api.call("PATCH", f"/v1/keys/{key['id']}", {"scopes": ["read"], "metadata": {}}))
    assert (updated["scopes"], updated["metadata"], updated["name"]) == (["read"], {}, "dashboard key")

    async def narrowed() -> bool:
        responses = [await public(secret) for _ in range(4)]
        return all(r.status == 403 and r.json()["error"]["code"] == "insufficient_scope" for r in responses)

    await eventually(narrowed, within=1.0, what="the narrower scope on both replicas")
    assert (await public(secret, "/api/v1/models", "GET")).status == 200

    test_key = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {"environment": "test"}))
    assert test_key["key"].startswith("dlk_test_")
    assert test_key["api_key"]["scopes"] == ["detect", "ingest", "read"]
    assert "expires_at" not in test_key["api_key"]


async def test_keys_and_organisations_are_listed_a_page_at_a_time(api):
    org = await new_org(api)
    made = [ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {"name": f"k{i}"}))["api_key"] for i in range(3)]
    first = ok(await api.call("GET", f"/v1/orgs/{org['id']}/keys?page_size=2"))
    assert [k["name"] for k in first["keys"]] == ["k0", "k1"] and first["next_page_token"]
    rest = ok(await api.call("GET", f"/v1/orgs/{org['id']}/keys?page_size=2&page_token={first['next_page_token']}"))
    assert [k["id"] for k in rest["keys"]] == [made[2]["id"]] and rest["next_page_token"] == ""

    seen, token = [], ""
    while True:
        page = ok(await api.call("GET", f"/v1/orgs?page_size=50&page_token={token}"))
        seen += [o["id"] for o in page["orgs"]]
        token = page["next_page_token"]
        if not token:
            break
    assert org["id"] in seen and len(seen) == len(set(seen))
    # Listing organisations is an operator's call (contract: "Management API").
    refused(await api.call("GET", "/v1/orgs", org_id=org["id"]), 403, "operator_only")
    refused(await api.call("GET", f"/v1/orgs/{org['id']}/keys?page_size=5000"), 400, "invalid_argument")
    refused(await api.call("GET", f"/v1/orgs/{org['id']}/keys?page_token=bogus"), 400, "invalid_argument")


async def test_missing_bad_and_foreign_tokens_are_refused_as_json(api, admin_secret, jwt_secret):
    mine, theirs = await new_org(api, "mine"), await new_org(api, "theirs")
    their_key = ok(await api.call("POST", f"/v1/orgs/{theirs['id']}/keys", {}))["api_key"]
    path = f"/v1/orgs/{theirs['id']}"
    refused(await api.call("GET", path, token=""), 401, "missing_token")
    refused(await api.call("GET", path, token="not.a.jwt"), 401, "invalid_token")
    other_secret = "another-secret-of-32-bytes-or-more!!"
    refused(await api.call("GET", path, token=admin_token(other_secret)), 401, "invalid_token")
    refused(await api.call("GET", path, token=admin_token(jwt_secret)), 401, "invalid_token")  # the context secret
    refused(await api.call("GET", path, token=admin_token(admin_secret, lifetime_seconds=3600)), 401, "invalid_token")
    refused(await api.call("GET", path, token=admin_token(admin_secret, now=time.time() - 400)), 401, "invalid_token")

    as_mine = {"org_id": mine["id"]}
    assert ok(await api.call("GET", f"/v1/orgs/{mine['id']}", **as_mine))["id"] == mine["id"]
    body: object
    for method, target, body in (
        ("GET", path, None),
        ("GET", f"{path}/keys", None),
        ("POST", f"{path}/keys", {}),
        ("GET", f"/v1/keys/{their_key['id']}", None),
        ("POST", f"/v1/keys/{their_key['id']}:revoke", {}),
        ("POST", f"/v1/keys/{their_key['id']}:roll", {}),
        ("PATCH", f"/v1/keys/{their_key['id']}", {"name": "mine now"}),
        ("GET", f"{path}/usage", None),
        ("GET", f"{path}/alerts", None),
    ):
        refused(await api.call(method, target, body, **as_mine), 403, "wrong_organisation")
    own = f"/v1/orgs/{mine['id']}"
    for method, target, body in (
        ("POST", "/v1/orgs", {"name": "x"}),
        ("GET", "/v1/orgs", None),
        ("POST", f"{path}:suspend", {}),
        ("POST", f"{own}:suspend", {}),
        ("POST", f"{own}:resume", {}),
        ("POST", f"{own}:setPlan", {"plan": "free"}),
        ("POST", f"{own}/usage:report", {"request_id": "r1", "product": "stream", "units": 1}),
    ):
        refused(await api.call(method, target, body, **as_mine), 403, "operator_only")
    still = ok(await api.call("GET", f"/v1/keys/{their_key['id']}"))
    assert "revoked_at" not in still and still["name"] == ""


async def test_unknown_ids_and_bad_arguments(api):
    org = await new_org(api)
    refused(await api.call("GET", f"/v1/orgs/{uuid.uuid4()}"), 404, "not_found")
    refused(await api.call("GET", f"/v1/keys/{uuid.uuid4()}"), 404, "not_found")
    refused(await api.call("GET", "/v1/orgs/not-a-uuid"), 400, "invalid_argument")
    refused(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {"scopes": ["admin"]}), 400, "invalid_argument")
    refused(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {"environment": "prod"}), 400, "invalid_argument")
    big = {"metadata": {"blob": "x" * 5000}}
    refused(await api.call("POST", f"/v1/orgs/{org['id']}/keys", big), 400, "invalid_argument")
    refused(await api.call("POST", "/v1/orgs", {"name": ""}), 400, "invalid_argument")
    refused(await api.call("POST", "/v1/orgs", {"name": "x", "plan": "no-such-plan"}), 400, "invalid_argument")
    refused(await api.call("POST", f"/v1/orgs/{org['id']}:setPlan", {"plan": "nope"}), 400, "invalid_argument")
    key = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {}))["api_key"]
    refused(await api.call("PATCH", f"/v1/keys/{key['id']}", {}), 400, "invalid_argument")
    refused(await api.call("POST", f"/v1/keys/{key['id']}:roll", {"overlap_seconds": -1}), 400, "invalid_argument")
    report = {"request_id": str(uuid.uuid4()), "product": "not_a_product", "units": 1}
    unknown_product = refused(
        await api.call("POST", f"/v1/orgs/{org['id']}/usage:report", report), 400, "invalid_argument"
    )
    assert unknown_product["message"] == "product must be one of stream, monitor"

    # Answers Envoy gives itself have the same shape, without details.
    for response, status in (
        (await api.call("GET", "/v1/nothing-here"), 404),
        (await raw_request(api.port, "POST", f"/v1/orgs/{org['id']}/keys", {}, b'{"name": '), 400),
    ):
        assert response.status == status and response.headers["content-type"] == "application/json"
        assert response.json()["code"] in (3, 5) and response.json()["message"]


async def test_revocation_through_the_api_reaches_every_replica_within_a_second(api, replicas):
    org = await new_org(api)
    created = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {}))
    secret, key_id = created["key"], created["api_key"]["id"]
    for stub in replicas:  # both replicas hold the key as valid
        assert (await stub.Check(check_request(bearer(secret)), timeout=5)).HasField("ok_response")
    revoked = ok(await api.call("POST", f"/v1/keys/{key_id}:revoke", {}))
    started = time.monotonic()
    assert revoked["revoked_at"]

    async def revoked_everywhere() -> bool:
        answers = await asyncio.gather(*(stub.Check(check_request(bearer(secret)), timeout=5) for stub in replicas))
        return all(answer.HasField("denied_response") for answer in answers)

    await eventually(revoked_everywhere, within=1.0, what="revocation through the API on both replicas")
    assert time.monotonic() - started < 1.0
    again = ok(await api.call("POST", f"/v1/keys/{key_id}:revoke", {}))
    assert again["revoked_at"] == revoked["revoked_at"]  # the first revocation time stays


async def test_a_rolled_key_keeps_working_until_the_overlap_ends(api, public):
    org = await new_org(api)
    created = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {"name": "rolling", "scopes": ["detect"]}))
    old_secret, old_id = created["key"], created["api_key"]["id"]
    assert (await public(old_secret)).status == 200
    rolled = ok(await api.call("POST", f"/v1/keys/{old_id}:roll", {"overlap_seconds": 2}))
    new_secret, new_key = rolled["key"], rolled["api_key"]
    assert rolled["old_key_id"] == old_id and rolled["old_expires_at"]
    assert new_secret != old_secret and new_key["id"] != old_id
    assert (new_key["name"], new_key["scopes"]) == ("rolling", ["detect"])
    assert ok(await api.call("GET", f"/v1/keys/{old_id}"))["rolled_to_key_id"] == new_key["id"]
    assert (await public(new_secret)).status == 200
    assert (await public(old_secret)).status == 200  # within the overlap
    refused(await api.call("POST", f"/v1/keys/{old_id}:roll", {}), 400, "failed_precondition")

    async def old_expired() -> bool:
        responses = [await public(old_secret) for _ in range(4)]
        return all(r.status == 401 and r.json()["error"]["code"] == "expired_api_key" for r in responses)

    await eventually(old_expired, within=10, what="the old key to expire at the end of the overlap", interval=0.2)
    assert (await public(new_secret)).status == 200


async def test_suspend_resume_set_plan_usage_and_alerts(api, public, pool):
    org = await new_org(api)
    secret = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {}))["key"]
    assert ok(await api.call("POST", f"/v1/orgs/{org['id']}:suspend", {}))["suspended"] is True

    async def all_answer(status: int) -> bool:
        return all(r.status == status for r in [await public(secret) for _ in range(4)])

    await eventually(lambda: all_answer(403), within=1.0, what="suspension through the API")
    resumed = ok(await api.call("POST", f"/v1/orgs/{org['id']}:resume", {}))
    assert resumed["suspended"] is False and "suspended_at" not in resumed
    await eventually(lambda: all_answer(200), within=1.0, what="resumption through the API")

    assert ok(await api.call("POST", f"/v1/orgs/{org['id']}:setPlan", {"plan": "free"}))["plan"] == "free"

    async def on_free() -> bool:
        sent = await public(secret, "/api/v1/models", "GET")
        return sent.status == 200 and sent.json()["headers"]["x-driftlock-plan"] == "free"

    await eventually(on_free, within=1.0, what="the new plan on the request path")

    usage = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage"))
    assert (usage["org_id"], usage["plan"]) == (org["id"], "free")
    assert int(usage["used_units"]) >= 1  # int64 is a string in proto3 JSON

    await pool.execute(
        """INSERT INTO driftlock.usage_alerts (org_id, period_start, period_end, threshold, used_units, included_units,
                                               plan_name)
           VALUES ($1, now() - interval '1 day', now() + interval '1 day', 70, 700, 1000, 'free')""",
        uuid.UUID(org["id"]),
    )
    alerts = ok(await api.call("GET", f"/v1/orgs/{org['id']}/alerts"))
    assert [(a["threshold"], a["used_units"]) for a in alerts["alerts"]] == [(70, "700")]


async def test_every_change_and_refusal_is_audited_with_the_caller(api, admin_secret, pool):
    org = await new_org(api)
    key = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {}))["api_key"]
    revoked = await api.call("POST", f"/v1/keys/{key['id']}:revoke", {})
    ok(revoked)
    foreign = await api.call("GET", f"/v1/orgs/{org['id']}", org_id=uuid.uuid4())
    refused(foreign, 403, "wrong_organisation")
    async with pool.acquire() as conn:
        entries = await admin_audit.actions(conn, org_id=uuid.UUID(org["id"]))
    by_action = {entry.action: entry for entry in entries}
    assert set(by_action) == {"orgs.create", "keys.create", "keys.revoke"}
    revoke = by_action["keys.revoke"]
    assert (revoke.actor_issuer, revoke.actor_subject, revoke.method, revoke.code) == ("tests", "tester", "grpc", "ok")
    assert str(revoke.key_id) == key["id"] and revoke.request_id == revoked.request_id
    async with pool.acquire() as conn:
        refusal = await conn.fetchrow(
            "SELECT * FROM driftlock.audit_log WHERE request_id = $1 AND action IS NOT NULL", foreign.request_id
        )
    assert (refusal["decision"], refusal["code"], refusal["action"]) == ("deny", "wrong_organisation", "orgs.get")


async def test_the_backend_reaches_usage_service_over_grpc_through_envoys_management_listener(
    gateway, admin_secret, make_org
):
    """What the backend does now that only Envoy may reach authz's port (docs/backend.md): native gRPC to the
    management listener, passed through to authz."""
    import grpc

    from driftlock_api.usage.v1 import usage_pb2, usage_pb2_grpc
    from tests.support.admin import admin_metadata

    org = await make_org()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.management_port}") as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        usage = await stub.GetUsage(
            usage_pb2.GetUsageRequest(org_id=str(org.id)), metadata=admin_metadata(admin_secret), timeout=10
        )
        assert usage.org_id == str(org.id)
        report = await stub.ReportUsage(
            usage_pb2.ReportUsageRequest(request_id=str(uuid.uuid4()), org_id=str(org.id), product="stream", units=2),
            metadata=admin_metadata(admin_secret),
            timeout=10,
        )
        assert report.accepted

"""Customer controls end to end (issue 20), through the real Envoy, both authz replicas and PostgreSQL: the
JSON management API (plans, spend cap, per-key limits, erasure) and what a client of the public listener gets
(the contract's codes, the RateLimit headers, CORS exposing them)."""

import json
import uuid

import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from driftlock_kernel import admin_audit
from tests.conftest import CORS_ORIGIN
from tests.support.admin import JsonApi
from tests.support.authz_requests import authz_channel, bearer, check_request
from tests.support.http import raw_request
from tests.support.net import eventually

DETECT = "/api/v1/stream/detect"
MONITOR = "/api/v1/monitor/detect"
INGEST = "/api/v1/stream/ingest"


@pytest.fixture
def api(gateway, admin_secret) -> JsonApi:
    return JsonApi(gateway.management_port, admin_secret)


@pytest.fixture
def public(gateway):
    async def send(secret: str, path: str = DETECT, method: str = "POST", source: str | None = None, **headers):
        sent = {"Authorization": f"Bearer {secret}", **headers}
        return await raw_request(gateway.port, method, path, sent, b"{}", source=source)

    return send


@pytest.fixture(scope="module")
async def replicas(gateway):
    channels = [authz_channel(gateway.authz_target(i)) for i in range(2)]
    yield [external_auth_pb2_grpc.AuthorizationStub(channel) for channel in channels]
    for channel in channels:
        await channel.close(grace=None)


def ok(response) -> dict:
    assert response.status == 200, (response.status, response.body)
    return response.json()


def refused(response, status: int, reason: str) -> None:
    assert response.status == status, (response.status, response.body)
    (info,) = [d for d in response.json()["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert info["reason"] == reason


def code_of(response) -> str | None:
    if response.status == 200:
        return None
    return response.json()["error"]["code"]


async def new_plan(api: JsonApi, **fields) -> str:
    name = f"controls-{uuid.uuid4().hex[:8]}"
    ok(await api.call("PUT", f"/v1/plans/{name}", {"included_units": 1000, "overage": "soft", **fields}))
    return name


async def new_org(api: JsonApi, plan: str) -> str:
    return ok(await api.call("POST", "/v1/orgs", {"name": "Controls", "plan": plan}))["id"]


async def new_key(api: JsonApi, org_id: str, **limits) -> tuple[str, str]:
    created = ok(await api.call("POST", f"/v1/orgs/{org_id}/keys", {"name": "ci", **limits}, org_id=org_id))
    return created["api_key"]["id"], created["key"]


async def test_the_plan_catalogue_is_read_by_any_token_and_changed_by_operators_only(api):
    name = await new_plan(api, products=["stream"], rate_limit_rps=50, hard_cap_percent=150)
    org_id = await new_org(api, name)
    listed = ok(await api.call("GET", "/v1/plans", org_id=org_id))["plans"]
    plan = next(p for p in listed if p["name"] == name)
    assert plan["products"] == ["stream"] and plan["rate_limit_rps"] == 50 and plan["hard_cap_percent"] == 150
    assert ok(await api.call("GET", f"/v1/plans/{name}", org_id=org_id))["included_units"] == "1000"
    refused(await api.call("PUT", f"/v1/plans/{name}", {"included_units": 10**9}, org_id=org_id), 403, "operator_only")
    refused(await api.call("GET", "/v1/plans/no-such-plan"), 404, "not_found")
    refused(await api.call("PUT", "/v1/plans/new-without-units", {}), 400, "invalid_argument")
    # Fields left out keep their value; null clears one.
    changed = ok(await api.call("PUT", f"/v1/plans/{name}", {"hard_cap_percent": None, "products": None}))
    assert changed["rate_limit_rps"] == 50 and "hard_cap_percent" not in changed and changed["products"] == []


async def test_a_plans_products_and_a_keys_products_are_enforced_at_the_edge(api, public):
    stream_only = await new_plan(api, products=["stream"])
    org_id = await new_org(api, stream_only)
    _key_id, secret = await new_key(api, org_id)
    assert code_of(await public(secret)) is None
    denied = await public(secret, MONITOR)
    assert denied.status == 403 and code_of(denied) == "product_not_allowed"
    both = await new_plan(api)
    monitor_org = await new_org(api, both)
    _key_id, monitor_key = await new_key(api, monitor_org, products=["monitor"])
    assert code_of(await public(monitor_key, MONITOR)) is None
    assert code_of(await public(monitor_key, DETECT)) == "product_not_allowed"


async def test_an_organisation_token_may_lower_its_keys_rate_limit_but_not_raise_it_above_the_plan(api, public):
    plan = await new_plan(api, rate_limit_rps=20)
    org_id = await new_org(api, plan)
    refused(
        await api.call("POST", f"/v1/orgs/{org_id}/keys", {"rate_limit_rps": 21}, org_id=org_id),
        403,
        "rate_limit_above_plan",
    )
    key_id, secret = await new_key(api, org_id, rate_limit_rps=1)
    refused(await api.call("PATCH", f"/v1/keys/{key_id}", {"rate_limit_rps": 40}, org_id=org_id), 403,
            "rate_limit_above_plan")  # fmt: skip
    codes = [code_of(await public(secret, "/api/v1/things", "GET")) for _ in range(4)]
    assert codes[0] is None and "rate_limited" in codes
    # An operator may raise it above the plan's.
    raised = ok(await api.call("PATCH", f"/v1/keys/{key_id}", {"rate_limit_rps": 40}))
    assert raised["rate_limit_rps"] == 40
    removed = ok(await api.call("PATCH", f"/v1/keys/{key_id}", {"rate_limit_rps": None}, org_id=org_id))
    assert "rate_limit_rps" not in removed


async def test_a_keys_allowed_networks_refuse_other_sources_ipv4_through_envoy_and_ipv6(api, public, replicas):
    plan = await new_plan(api)
    org_id = await new_org(api, plan)
    key_id, secret = await new_key(api, org_id, allowed_cidrs=["127.0.0.1/32", "2001:db8::/32"])
    assert code_of(await public(secret)) is None
    denied = await public(secret, source="127.0.0.2")
    assert denied.status == 403 and code_of(denied) == "ip_not_allowed"
    for source, allowed in (("2001:db8:1::5", True), ("2001:db9::5", False)):
        response = await replicas[0].Check(check_request(bearer(secret), source=source), timeout=5)
        assert response.HasField("ok_response") is allowed, source
    bad = await api.call("PATCH", f"/v1/keys/{key_id}", {"allowed_cidrs": ["10.0.0.0/33"]}, org_id=org_id)
    refused(bad, 400, "invalid_argument")
    # null removes the allow-list: the key serves from anywhere within a second, on every replica.
    ok(await api.call("PATCH", f"/v1/keys/{key_id}", {"allowed_cidrs": None}, org_id=org_id))

    async def served_from_elsewhere() -> bool:
        return code_of(await public(secret, source="127.0.0.2")) is None

    await eventually(served_from_elsewhere, within=1.5, what="the allow-list removed")


async def test_a_keys_unit_cap_answers_key_quota_exceeded_and_the_headers_state_the_quota(api, public):
    plan = await new_plan(api, rate_limit_rps=100)
    org_id = await new_org(api, plan)
    key_id, secret = await new_key(api, org_id, max_units_per_period=3)
    listed = ok(await api.call("GET", f"/v1/keys/{key_id}", org_id=org_id))
    assert listed["max_units_per_period"] == "3"  # int64 in proto JSON is a string
    responses = [await public(secret, Origin=CORS_ORIGIN) for _ in range(4)]
    assert [code_of(r) for r in responses] == [None, None, None, "key_quota_exceeded"]
    assert responses[3].status == 429 and int(responses[3].headers["retry-after"]) > 0
    first = responses[0].headers
    assert first["ratelimit-policy"].startswith('"rate";q=') and '"quota";q=1000;w=' in first["ratelimit-policy"]
    assert '"quota";r=999;t=' in first["ratelimit"]
    exposed = {name.strip() for name in first["access-control-expose-headers"].split(",")}
    assert {"ratelimit-policy", "ratelimit", "x-ratelimit-remaining", "x-driftlock-overage-units"} <= exposed
    ok(await api.call("PATCH", f"/v1/keys/{key_id}", {"max_units_per_period": None}, org_id=org_id))

    async def serves_again() -> bool:
        return code_of(await public(secret)) is None

    await eventually(serves_again, within=1.5, what="the key's cap removed")


async def test_a_spend_cap_set_by_the_customer_stops_billable_calls_but_not_ingestion(api, public, pool):
    plan = await new_plan(api, included_units=2)
    org_id = await new_org(api, plan)
    _key_id, secret = await new_key(api, org_id)
    capped = ok(await api.call("PATCH", f"/v1/orgs/{org_id}", {"max_overage_units": 1}, org_id=org_id))
    assert capped["max_overage_units"] == "1"
    codes = [code_of(await public(secret)) for _ in range(3)]
    assert codes == [None, None, None]  # 2 included + 1 overage
    over = await public(secret)
    assert over.status == 429 and code_of(over) == "spend_cap_reached" and int(over.headers["retry-after"]) > 0
    assert code_of(await public(secret, INGEST)) is None
    # Removed (null), the soft plan serves on, in overage, and says so.
    ok(await api.call("PATCH", f"/v1/orgs/{org_id}", {"max_overage_units": None}, org_id=org_id))

    async def in_overage() -> bool:
        response = await public(secret)
        return response.status == 200 and int(response.headers.get("x-driftlock-overage-units", "0")) >= 2

    await eventually(in_overage, within=1.5, what="the spend cap removed")
    block = await new_plan(api, overage="block")
    block_org = await new_org(api, block)
    refused(await api.call("PATCH", f"/v1/orgs/{block_org}", {"max_overage_units": 5}), 400, "failed_precondition")


async def test_deleting_an_organisation_stops_its_keys_erases_names_and_keeps_usage(api, public, pool):
    plan = await new_plan(api)
    org_id = await new_org(api, plan)
    ok(await api.call("PATCH", f"/v1/orgs/{org_id}", {"max_overage_units": 10}, org_id=org_id))
    created = ok(
        await api.call(
            "POST", f"/v1/orgs/{org_id}/keys", {"name": "Jane's laptop", "metadata": {"email": "jane@example.com"}}
        )
    )
    secret = created["key"]
    assert code_of(await public(secret)) is None
    refused(await api.call("DELETE", f"/v1/orgs/{org_id}", org_id=org_id), 403, "operator_only")
    deleted = ok(await api.call("DELETE", f"/v1/orgs/{org_id}"))
    assert deleted["org_id"] == org_id and deleted["keys_revoked"] == 1

    async def stopped() -> bool:
        return (await public(secret)).status == 401

    assert await eventually(stopped, within=1.0, what="the erased organisation's key refused") <= 1.0
    refused(await api.call("GET", f"/v1/orgs/{org_id}"), 404, "not_found")
    listed = ok(await api.call("GET", "/v1/orgs?page_size=1000"))["orgs"]
    assert org_id not in [org["id"] for org in listed]
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT name FROM driftlock.organizations WHERE id = $1", uuid.UUID(org_id))
        key = await conn.fetchrow("SELECT name, metadata FROM driftlock.api_keys WHERE org_id = $1", uuid.UUID(org_id))
        entries = await admin_audit.actions(conn, org_id=uuid.UUID(org_id))
    metadata = json.loads(key["metadata"]) if isinstance(key["metadata"], str) else key["metadata"]
    assert row["name"] == "erased" and key["name"] is None and metadata == {}

    async def usage_kept() -> bool:
        async with pool.acquire() as conn:
            return (
                await conn.fetchval(
                    "SELECT coalesce(sum(units), 0) FROM driftlock.usage_counters WHERE org_id = $1", uuid.UUID(org_id)
                )
                == 1
            )

    await eventually(usage_kept, within=5, what="the served unit flushed and kept")
    # What was recorded before the erasure keeps ids, times, actions and codes only.
    before = [e for e in entries if e.action != "orgs.delete"]
    assert before and all(e.detail is None and e.actor_subject is None for e in before)
    assert {"orgs.delete", "keys.create"} <= {e.action for e in entries}

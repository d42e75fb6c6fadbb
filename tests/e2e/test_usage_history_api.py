"""Usage history, a key's usage and the audit log through Envoy's management listener (gRPC-JSON transcoding) ->
real authz -> real PostgreSQL, after real calls on the public listener."""

import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import pytest

from tests.conftest import TEST_PLAN
from tests.support.admin import JsonApi
from tests.support.http import raw_request
from tests.support.net import eventually
from tests.support.usage import wait_for_usage

DETECT = "/api/v1/stream/detect"


@pytest.fixture
def api(gateway, admin_secret) -> JsonApi:
    return JsonApi(gateway.management_port, admin_secret)


def ok(response) -> dict:
    assert response.status == 200, (response.status, response.body)
    return response.json()


def refused(response, status: int, reason: str) -> None:
    assert response.status == status, (response.status, response.body)
    (info,) = [d for d in response.json()["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert info["reason"] == reason


async def org_with_key(api: JsonApi) -> tuple[dict, dict, str]:
    org = ok(await api.call("POST", "/v1/orgs", {"name": "History org", "plan": TEST_PLAN}))
    created = ok(await api.call("POST", f"/v1/orgs/{org['id']}/keys", {"name": "history"}))
    return org, created["api_key"], created["key"]


async def detect(gateway, secret: str) -> int:
    sent = await raw_request(gateway.port, "POST", DETECT, {"Authorization": f"Bearer {secret}"}, b"{}")
    return sent.status


def since(delta: timedelta) -> str:
    return quote((datetime.now(UTC) - delta).isoformat())


async def test_history_adds_up_to_usage_per_product_key_and_day(gateway, api, pool):
    org, key, secret = await org_with_key(api)
    for _ in range(3):
        assert await detect(gateway, secret) == 200
    await wait_for_usage(pool, uuid.UUID(org["id"]), {"stream": 3})
    usage = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage"))

    hours = ok(
        await api.call("GET", f"/v1/orgs/{org['id']}/usage/history?granularity=hour&start={since(timedelta(days=2))}")
    )
    assert hours["granularity"] == "hour" and hours["group_by"] == "product"
    # What the counters hold (a replica's `used_units` may not have read what the other flushed yet).
    assert (
        sum(int(b["billable_units"]) for b in hours["buckets"])
        == sum(map(int, usage["stored_units_by_product"].values()))
        == 3
    )
    (bucket,) = hours["buckets"]
    assert bucket["product"] == "stream" and "key_id" not in bucket
    assert (bucket["requests"], bucket["refunded_units"], bucket["denied_requests"]) == ("3", "0", "0")
    assert bucket["start"].endswith(":00:00Z")

    by_key = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage/history?group_by=key"))
    assert [(b["key_id"], b["billable_units"]) for b in by_key["buckets"]] == [(key["id"], "3")]
    days = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage/history?granularity=day"))
    assert [b["billable_units"] for b in days["buckets"]] == ["3"]

    mine = ok(await api.call("GET", f"/v1/keys/{key['id']}/usage"))
    assert (mine["key_id"], mine["billable_units"], mine["requests"]) == (key["id"], "3", "3")
    assert mine["period_start"] == usage["period_start"]
    listed = ok(await api.call("GET", f"/v1/orgs/{org['id']}/keys"))["keys"]
    assert [(k["id"], k["billable_units_this_period"]) for k in listed] == [(key["id"], "3")]


async def test_a_call_the_backend_failed_is_refunded_in_the_bucket_of_its_key(gateway, api, pool):
    org, key, secret = await org_with_key(api)
    for respond in ("", "", "503"):
        headers = {"Authorization": f"Bearer {secret}", **({"x-test-respond": respond} if respond else {})}
        sent = await raw_request(gateway.port, "POST", DETECT, headers, b"{}")
        assert sent.status == (int(respond) if respond else 200)
    # Counted by authz, taken back when Envoy's access log reports the 503.
    await wait_for_usage(pool, uuid.UUID(org["id"]), {"stream": 2})

    async def refund_in_history() -> bool:
        by_key = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage/history?group_by=key"))["buckets"]
        return [(b["key_id"], b["billable_units"], b["refunded_units"], b["requests"]) for b in by_key] == [
            (key["id"], "2", "1", "3")
        ]

    # The refund carries the key and hour of its call through Envoy: it lands in that key's bucket, not in the
    # bucket of units no key made.
    await eventually(refund_in_history, within=10.0, what="the refund in the key's bucket")


async def test_the_audit_shows_who_revoked_a_key_and_the_denials_that_followed(gateway, api, admin_secret):
    org, key, secret = await org_with_key(api)
    assert await detect(gateway, secret) == 200
    ok(await api.call("POST", f"/v1/keys/{key['id']}:revoke", {}))

    async def refused_now() -> bool:
        return await detect(gateway, secret) == 401

    await eventually(refused_now, within=2.0, what="the revoked key refused")

    revokes = ok(await api.call("GET", f"/v1/orgs/{org['id']}/audit?action=keys.revoke"))
    (entry,) = revokes["entries"]
    assert (entry["action"], entry["code"], entry["key_id"]) == ("keys.revoke", "ok", key["id"])
    assert (entry["actor_issuer"], entry["actor_subject"]) == ("tests", "tester")
    assert entry["request_id"] and entry["at"].endswith("Z")
    assert revokes["next_page_token"] == ""

    async def denial_in_audit_and_history() -> bool:
        audit = ok(await api.call("GET", f"/v1/orgs/{org['id']}/audit?key_id={key['id']}"))
        counted = [d for d in audit["denials_per_minute"] if d["code"] == "revoked_api_key"]
        history = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage/history?group_by=key"))
        denied = sum(int(b["denied_requests"]) for b in history["buckets"])
        return bool(counted) and denied >= 1

    await eventually(denial_in_audit_and_history, within=10.0, what="the denial counted in the audit and history")
    history = ok(await api.call("GET", f"/v1/orgs/{org['id']}/usage/history"))
    assert all(b["denied"]["access"] == b["denied_requests"] for b in history["buckets"])

    # Every entry, a page of one at a time, newest first, each once.
    seen, token = [], ""
    while True:
        page = ok(await api.call("GET", f"/v1/orgs/{org['id']}/audit?page_size=1&page_token={token}"))
        seen += page["entries"]
        token = page["next_page_token"]
        if not token:
            break
    everything = ok(await api.call("GET", f"/v1/orgs/{org['id']}/audit?page_size=1000"))["entries"]
    assert seen == everything and len(everything) >= 3  # keys.create, keys.revoke, the refused check
    assert [e["at"] for e in everything] == sorted((e["at"] for e in everything), reverse=True)


async def test_an_organisation_token_reads_only_its_own_history_audit_and_keys(api):
    mine, _, _ = await org_with_key(api)
    theirs, their_key, _ = await org_with_key(api)
    as_mine = {"org_id": mine["id"]}
    ok(await api.call("GET", f"/v1/orgs/{mine['id']}/usage/history", **as_mine))
    ok(await api.call("GET", f"/v1/orgs/{mine['id']}/audit", **as_mine))
    for target in (
        f"/v1/orgs/{theirs['id']}/usage/history",
        f"/v1/orgs/{theirs['id']}/audit",
        f"/v1/keys/{their_key['id']}/usage",
    ):
        refused(await api.call("GET", target, **as_mine), 403, "wrong_organisation")


async def test_bad_history_and_audit_arguments_are_400_and_unknown_ids_404(api):
    org, _, _ = await org_with_key(api)
    path = f"/v1/orgs/{org['id']}"
    for query in (
        "granularity=week",
        "group_by=plan",
        "start=yesterday",
        "start=2026-12-01T00:00:00",
        "start=2026-12-02T00:00:00Z&end=2026-12-01T00:00:00Z",
    ):
        refused(await api.call("GET", f"{path}/usage/history?{query}"), 400, "invalid_argument")
    for query in ("page_token=bogus", "page_size=5000", "key_id=nope", "since=never"):
        refused(await api.call("GET", f"{path}/audit?{query}"), 400, "invalid_argument")
    refused(await api.call("GET", f"/v1/orgs/{uuid.uuid4()}/usage/history"), 404, "not_found")
    refused(await api.call("GET", f"/v1/keys/{uuid.uuid4()}/usage"), 404, "not_found")

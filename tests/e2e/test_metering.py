"""Metering, quotas, rate limits, alerts, audit and metrics through real Envoy and two authz replicas."""

import asyncio
import json
import uuid

import aiohttp
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from driftlock_kernel import orgs, plans
from tests.support.authz_requests import authz_channel, bearer, check_request
from tests.support.cli import run_cli
from tests.support.http import raw_request
from tests.support.net import eventually
from tests.support.usage import stored_usage, wait_for_usage

INGEST = "/api/v1/stream/ingest"


@pytest.fixture
def send(gateway):
    async def request(secret: str | None, path: str = "/api/v1/stream/detect", headers=None):
        all_headers = dict(headers or {})
        if secret:
            all_headers["Authorization"] = f"Bearer {secret}"
        return await raw_request(gateway.port, "POST", path, all_headers, b"{}")

    return request


@pytest.fixture
def plan_factory(pool):
    async def make(**options) -> str:
        name = f"plan-{uuid.uuid4().hex[:10]}"
        async with pool.acquire() as conn:
            await plans.upsert_plan(conn, name, **options)
        return name

    return make


@pytest.fixture(scope="module")
async def authz_stubs(gateway):
    channels = [authz_channel(gateway.authz_target(i)) for i in range(2)]
    yield [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
    for channel in channels:
        await channel.close(grace=None)


async def test_stored_usage_equals_the_number_of_served_billable_calls(send, make_org, make_key, pool, database_url):
    org = await make_org()
    _key, secret = await make_key(org.id)
    paths = ["/api/v1/stream/detect"] * 60 + ["/api/v1/monitor/detect"] * 40 + ["/api/v1/stream/ingest"] * 30
    responses = await asyncio.gather(*(send(secret, path) for path in paths))
    assert all(r.status == 200 for r in responses)
    await wait_for_usage(pool, org.id, {"stream": 60, "monitor": 40})
    result = run_cli("usage", str(org.id), "--json", database_url=database_url).json()
    assert result["used"] == {"stream": 60, "monitor": 40, "total": 100}
    assert result["org_id"] == str(org.id)
    assert result["period_start"].endswith("Z") and result["period_end"].endswith("Z")


async def test_block_plan_serves_exactly_its_quota_on_one_replica(authz_stubs, plan_factory, make_org, make_key, pool):
    org = await make_org(plan=await plan_factory(included_units=10, overage="block"))
    _key, secret = await make_key(org.id)
    responses = await asyncio.gather(
        *(authz_stubs[0].Check(check_request(bearer(secret)), timeout=10) for _ in range(40))
    )
    allowed = [r for r in responses if r.HasField("ok_response")]
    denied = [json.loads(r.denied_response.body)["error"]["code"] for r in responses if r.HasField("denied_response")]
    assert len(allowed) == 10
    assert set(denied) == {"quota_exceeded"}
    await wait_for_usage(pool, org.id, {"stream": 10})


async def test_block_plan_through_two_replicas_serves_exactly_its_quota_in_a_burst(
    send, plan_factory, make_org, make_key, pool
):
    org = await make_org(plan=await plan_factory(included_units=10, overage="block"))
    _key, secret = await make_key(org.id)
    responses = await asyncio.gather(*(send(secret) for _ in range(40)))
    served = sum(r.status == 200 for r in responses)
    print(f"\nblock plan of 10 units, burst of 40 through two replicas: {served} served")
    # Near the cap every call is counted by one atomic statement before it is allowed: replicas together
    # never pass the cap.
    assert served == 10
    refused = [r for r in responses if r.status != 200]
    assert all(r.status == 429 and r.json()["error"]["code"] == "quota_exceeded" for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    await wait_for_usage(pool, org.id, {"stream": 10})


async def test_block_plan_through_two_replicas_serves_exactly_its_quota_in_a_trickle(
    send, plan_factory, make_org, make_key, pool
):
    org = await make_org(plan=await plan_factory(included_units=10, overage="block"))
    _key, secret = await make_key(org.id)
    statuses = []
    for _ in range(6):  # pairs a little apart, so that each replica serves some from a view of its own
        statuses += [r.status for r in await asyncio.gather(send(secret), send(secret))]
        await asyncio.sleep(0.3)
    statuses += [(await send(secret)).status for _ in range(10)]
    served = statuses.count(200)
    print(f"\nblock plan of 10 units, a trickle of {len(statuses)} through two replicas: {served} served")
    assert served == 10
    assert set(statuses) == {200, 429}
    await wait_for_usage(pool, org.id, {"stream": 10})


async def test_soft_plan_keeps_serving_past_its_included_units(send, plan_factory, make_org, make_key, pool):
    org = await make_org(plan=await plan_factory(included_units=5, overage="soft"))
    _key, secret = await make_key(org.id)
    responses = [await send(secret) for _ in range(12)]
    assert [r.status for r in responses] == [200] * 12
    await wait_for_usage(pool, org.id, {"stream": 12})


async def test_hard_cap_blocks_a_soft_plan(authz_stubs, plan_factory, make_org, make_key):
    org = await make_org(plan=await plan_factory(included_units=10, overage="soft", hard_cap_percent=150))
    _key, secret = await make_key(org.id)
    responses = [await authz_stubs[0].Check(check_request(bearer(secret)), timeout=10) for _ in range(20)]
    assert sum(r.HasField("ok_response") for r in responses) == 15


async def test_rate_limit_answers_429_with_headers(send, plan_factory, make_org, make_key):
    org = await make_org(plan=await plan_factory(included_units=1000, overage="soft", rate_limit_rps=2))
    _key, secret = await make_key(org.id)
    first = await send(secret, "/api/v1/stream/ingest")
    assert first.status == 200
    assert first.headers["x-ratelimit-limit"] == "2"
    assert int(first.headers["x-ratelimit-remaining"]) in (0, 1)
    assert int(first.headers["x-ratelimit-reset"]) >= 1
    responses = await asyncio.gather(*(send(secret, "/api/v1/stream/ingest") for _ in range(10)))
    limited = [r for r in responses if r.status == 429]
    assert limited, "ten requests at once against 2 per second per replica"
    for response in limited:
        assert response.json()["error"]["code"] == "rate_limited"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-ratelimit-limit"] == "2"
        assert response.headers["x-ratelimit-remaining"] == "0"


async def test_test_keys_are_never_metered(authz_stubs, make_org, make_key, pool):
    org = await make_org()
    _test_key, test_secret = await make_key(org.id, test=True)
    _live_key, live_secret = await make_key(org.id)
    for stub in authz_stubs:
        for _ in range(5):
            assert (await stub.Check(check_request(bearer(test_secret)), timeout=10)).HasField("ok_response")
        # A live call after them on the same replica: once it is stored, anything counted before it is too.
        assert (await stub.Check(check_request(bearer(live_secret)), timeout=10)).HasField("ok_response")
    await wait_for_usage(pool, org.id, {"stream": 2})


async def test_the_same_request_checked_twice_is_counted_once(authz_stubs, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    request = check_request(bearer(secret), request_id=f"envoy-{uuid.uuid4()}")
    first = await authz_stubs[0].Check(request, timeout=10)
    again = await authz_stubs[0].Check(request, timeout=10)  # as an Envoy retry would
    assert first.HasField("ok_response") and again.HasField("ok_response")
    assert (await authz_stubs[0].Check(check_request(bearer(secret)), timeout=10)).HasField("ok_response")
    await wait_for_usage(pool, org.id, {"stream": 2})


async def test_a_client_repeating_a_request_id_pays_for_every_call(send, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    responses = [await send(secret, headers={"X-Request-Id": "same-id-every-time"}) for _ in range(5)]
    assert [r.status for r in responses] == [200] * 5
    assert len({r.request_id for r in responses}) == 5
    await wait_for_usage(pool, org.id, {"stream": 5})


async def test_alerts_are_raised_once_per_threshold_posted_and_listed(
    gateway, send, plan_factory, make_org, make_key, pool, database_url
):
    org = await make_org(plan=await plan_factory(included_units=50, overage="soft"))
    _key, secret = await make_key(org.id)
    for _ in range(6):  # 60 units in bursts through both replicas, so both flush across the thresholds
        responses = await asyncio.gather(*(send(secret) for _ in range(10)))
        assert all(r.status == 200 for r in responses)
    await wait_for_usage(pool, org.id, {"stream": 60})

    async def three_alerts() -> bool:
        return await pool.fetchval("SELECT count(*) FROM driftlock.usage_alerts WHERE org_id = $1", org.id) == 3

    await eventually(three_alerts, within=10, what="three alerts stored")

    # The deprecated alert-webhook variables now name the operator's events endpoint (Standard Webhooks).
    def ours() -> list:
        return [
            r
            for r in gateway.alerts.received
            if json.loads(r.body)["type"] == "usage.threshold_reached"
            and json.loads(r.body)["data"]["org_id"] == str(org.id)
        ]

    async def three_posted() -> bool:
        return len(ours()) >= 3

    await eventually(three_posted, within=10, what="three usage.threshold_reached events POSTed to the operator")
    bodies = [json.loads(r.body)["data"] for r in ours()]
    assert sorted(b["threshold"] for b in bodies) == [70, 90, 100]
    from tests.conftest import ALERT_SECRET
    from tests.support.webhook_receiver import verify_standard_webhook

    assert all(verify_standard_webhook(ALERT_SECRET, dict(r.headers), r.body) for r in ours())
    assert all(b["included"] == 50 for b in bodies)

    listed = run_cli("alerts", "list", "--org", str(org.id), "--json", database_url=database_url).json()
    assert [a["threshold"] for a in listed["alerts"]] == [70, 90, 100]

    async def delivered() -> bool:
        return all(
            a["webhook_delivered_at"]
            for a in run_cli("alerts", "list", "--org", str(org.id), "--json", database_url=database_url).json()[
                "alerts"
            ]
        )

    await eventually(delivered, within=10, what="deliveries recorded", interval=0.3)


async def test_denials_and_allows_are_audited_without_the_key(send, make_org, make_key, pool):
    org = await make_org()
    key, secret = await make_key(org.id, scopes=("read",))
    denied = await send(secret, "/api/v1/stream/detect?token=secret-query")
    allowed = await send(secret, "/api/v1/models")
    assert (denied.status, allowed.status) == (403, 200)

    async def both_written() -> bool:
        count = await pool.fetchval(
            "SELECT count(*) FROM driftlock.audit_log WHERE request_id = ANY($1::text[])",
            [denied.request_id, allowed.request_id],
        )
        return count == 2

    await eventually(both_written, within=10, what="audit entries written")
    rows = {
        row["request_id"]: row
        for row in await pool.fetch(
            "SELECT * FROM driftlock.audit_log WHERE request_id = ANY($1::text[])",
            [denied.request_id, allowed.request_id],
        )
    }
    deny_row = rows[denied.request_id]
    assert (deny_row["decision"], deny_row["code"]) == ("deny", "insufficient_scope")
    assert deny_row["org_id"] == org.id and deny_row["key_id"] == key.id
    assert deny_row["path"] == "/api/v1/stream/detect"
    assert (rows[allowed.request_id]["decision"], rows[allowed.request_id]["code"]) == ("allow", "ok")
    dump = json.dumps([dict(r) for r in rows.values()], default=str)
    assert secret not in dump and "secret-query" not in dump


async def test_metrics_have_the_contract_names_and_no_client_values_in_labels(gateway, send, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    marker = f"client-value-{uuid.uuid4().hex[:8]}"
    await send(secret, f"/api/v1/{marker}", headers={"X-Request-Id": marker, "User-Agent": marker})
    await send(f"dlk_live_{marker}")
    await send(secret)
    families: dict[str, list[Sample]] = {}
    async with aiohttp.ClientSession() as session:
        for port in gateway.stack.ports.authz_metrics:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, []).extend(family.samples)
    expected = {
        "driftlock_authz_checks": {"decision", "code"},
        "driftlock_authz_check_duration_seconds": {"le"},
        "driftlock_authz_cache_events": {"result"},
        "driftlock_usage_units": {"org_id", "product"},
        "driftlock_usage_quota_ratio": {"org_id"},
        "driftlock_usage_alerts": {"threshold"},
        "driftlock_meter_pending_units": set(),
    }
    for name, labels in expected.items():
        assert name in families, f"{name} missing"
        assert any(set(s.labels) <= labels | {"le"} for s in families[name]), name
    for samples in families.values():
        for sample in samples:
            for value in sample.labels.values():
                assert marker not in value and "dlk_" not in value and "/" not in value, sample

    async def counted_for_org() -> bool:
        return await _usage_sample_for(gateway, str(org.id))

    await eventually(counted_for_org, within=10, what="driftlock_usage_units for the organisation")


async def _usage_sample_for(gateway, org_id: str) -> bool:
    async with aiohttp.ClientSession() as session:
        for port in gateway.stack.ports.authz_metrics:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                for family in text_string_to_metric_families(await response.text()):
                    if family.name == "driftlock_usage_units":
                        if any(s.labels.get("org_id") == org_id and s.value >= 1 for s in family.samples):
                            return True
    return False


async def test_cli_audit_prune_deletes_only_old_entries(pool, database_url):
    await pool.execute(
        "INSERT INTO driftlock.audit_log (at, decision, code) VALUES (now() - interval '40 days', 'deny', 'x'),"
        " (now(), 'deny', 'y')"
    )
    result = run_cli("audit", "prune", "--older-than", "30d", "--json", database_url=database_url).json()
    assert result["deleted"] >= 1
    assert await pool.fetchval("SELECT count(*) FROM driftlock.audit_log WHERE at < now() - interval '30 days'") == 0
    assert await pool.fetchval("SELECT count(*) FROM driftlock.audit_log WHERE code = 'y'") >= 1


async def test_a_key_in_a_path_segment_is_never_stored_nor_logged(gateway, send, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id, scopes=("read",))
    denied = await send(secret, f"/api/v1/stream/detect/{secret}")
    allowed = await send(secret, f"/api/v1/models/{secret}/runs")
    assert (denied.status, allowed.status) == (403, 200)

    async def both_written() -> bool:
        count = await pool.fetchval(
            "SELECT count(*) FROM driftlock.audit_log WHERE request_id = ANY($1::text[])",
            [denied.request_id, allowed.request_id],
        )
        return count == 2

    await eventually(both_written, within=10, what="audit entries written")
    paths = await pool.fetch(
        "SELECT path FROM driftlock.audit_log WHERE request_id = ANY($1::text[]) ORDER BY path",
        [denied.request_id, allowed.request_id],
    )
    assert [row["path"] for row in paths] == [
        "/api/v1/models/dlk_live_[redacted]/runs",
        "/api/v1/stream/detect/dlk_live_[redacted]",
    ]
    assert secret[9:] not in gateway.logs()


async def test_test_keys_have_their_own_allowance_never_billed_and_respect_suspension(
    send, plan_factory, make_org, make_key, pool, database_url
):
    """An organisation whose live quota is used up still tries the API with a test key, up to the test
    allowance (exactly, across both replicas), and none of it is live usage."""
    org = await make_org(plan=await plan_factory(included_units=0, overage="block", test_included_units=4))
    _key, test_secret = await make_key(org.id, test=True)
    _live, live_secret = await make_key(org.id)
    assert (await send(live_secret)).status == 429
    responses = await asyncio.gather(*(send(test_secret) for _ in range(5)))
    assert sorted(r.status for r in responses) == [200, 200, 200, 200, 429]
    refused = next(r for r in responses if r.status == 429)
    assert refused.json()["error"]["code"] == "quota_exceeded" and int(refused.headers["retry-after"]) >= 1
    assert all(r.status == 200 for r in await asyncio.gather(*(send(test_secret, INGEST) for _ in range(3))))
    test_units = await pool.fetchval(
        "SELECT coalesce(sum(units), 0) FROM driftlock.test_usage_counters WHERE org_id = $1", org.id
    )
    assert test_units == 4
    assert await stored_usage(pool, org.id) == {}  # never live usage, so never billed nor exported
    assert run_cli("usage", str(org.id), "--json", database_url=database_url).json()["used"]["total"] == 0
    async with pool.acquire() as conn:
        await orgs.set_suspended(conn, org.id, True)

    async def suspended() -> bool:
        return (await send(test_secret, INGEST)).status == 403

    await eventually(suspended, within=5, what="the test key refused once the organisation is suspended")

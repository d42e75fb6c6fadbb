"""The edge for browsers and big bodies (issue 23, items 4, 12, 13, 14), through the real Envoy: every reply to an
allowed origin carries CORS headers, API bodies are capped with a JSON 413, routing headers a backend framework
may trust never reach it, and only entries that can refund something are streamed to authz's access log."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from driftlock_kernel.keys import Environment, generate_key
from tests.conftest import CORS_ORIGIN
from tests.support.http import raw_request
from tests.support.net import eventually
from tests.support.scrape import scrape_text

DETECT = "/api/v1/stream/detect"
KEY = generate_key(Environment.LIVE).secret  # well-formed, valid checksum, stored nowhere


@pytest.fixture
def send(gateway):
    async def request(path: str = DETECT, headers=(), method: str = "POST", body: bytes = b"{}", **options):
        return await raw_request(gateway.port, method, path, headers, body, **options)

    return request


def bad_checksum(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        (DETECT, {}, 401, "missing_api_key"),  # a route's direct response
        (DETECT, {"Authorization": "Bearer junk"}, 401, "invalid_api_key"),
        (DETECT, {"Authorization": f"Bearer {bad_checksum(KEY)}"}, 401, "invalid_api_key"),  # the checksum filter
        ("/api/v1/stream/detectx", {"Authorization": f"Bearer {KEY}"}, 404, "not_found"),  # a look-alike
        ("/nowhere", {}, 404, "not_found"),  # no route at all
        (DETECT, {"Authorization": f"Bearer {KEY}"}, 401, "invalid_api_key"),  # authz's own
    ],
)
async def test_envoys_own_refusals_carry_cors_headers_for_an_allowed_origin(send, path, headers, status, code):
    response = await send(path, {"Origin": CORS_ORIGIN, **headers})
    assert response.status == status and response.json()["error"]["code"] == code
    assert response.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"]
    other = await send(path, {"Origin": "https://evil.example", **headers})
    assert other.status == status and "access-control-allow-origin" not in other.headers


async def test_an_api_body_over_the_cap_is_a_json_413_with_cors_and_one_at_the_cap_goes_through(
    gateway, send, make_org, make_key
):
    org = await make_org()
    _key, secret = await make_key(org.id)
    ten_mib = 10 * 1024 * 1024
    auth = {"Authorization": f"Bearer {secret}", "Origin": CORS_ORIGIN}
    received = len(gateway.backend.received)
    for path in ("/api/v1/stream/ingest", DETECT):
        response = await send(path, auth, body=b"x" * (ten_mib + 1))
        assert response.status == 413, response.body
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "payload_too_large"
        assert response.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert len(gateway.backend.received) == received
    response = await send("/api/v1/stream/ingest", auth, body=b"x" * ten_mib)
    assert response.status == 200
    assert len(gateway.backend.received[-1].body) == ten_mib


ROUTING_HEADERS = {
    "X-Original-URL": "/api/v1/stream/detect",
    "X-Rewrite-URL": "/api/v1/stream/detect",
    "X-Forwarded-Host": "evil.example",
    "X-Original-Host": "evil.example",
    "X-Forwarded-Prefix": "/admin",
    "X-Host": "evil.example",
    "Forwarded": "host=evil.example;proto=https",
    "X-HTTP-Method-Override": "DELETE",
    "X-Method-Override": "DELETE",
}


async def test_routing_headers_a_backend_framework_may_trust_never_reach_it(gateway, send, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    response = await send("/api/v1/models", {"Authorization": f"Bearer {secret}", **ROUTING_HEADERS}, method="GET")
    assert response.status == 200
    received = gateway.backend.by_request_id(response.request_id)
    assert not received.names() & {name.lower() for name in ROUTING_HEADERS}


async def access_log_entries(gateway) -> dict[str, float]:
    found: dict[str, float] = {}
    for port in gateway.stack.ports.authz_metrics:
        for family in text_string_to_metric_families(await scrape_text(f"http://127.0.0.1:{port}/metrics")):
            for sample in family.samples:
                if sample.name == "driftlock_access_log_entries_total":
                    result = sample.labels["result"]
                    found[result] = found.get(result, 0.0) + sample.value
    return found


async def test_only_entries_that_can_refund_reach_the_access_log(gateway, send, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    before = await access_log_entries(gateway)
    auth = {"Authorization": f"Bearer {secret}"}
    # Unbilled and failed: a read the backend fails, and a refusal.
    for _ in range(5):
        assert (await send("/api/v1/models", {**auth, "x-test-respond": "503"}, method="GET")).status == 503
    # Then a billed call the backend fails: its refund marks the point by which the others would have arrived.
    assert (await send(DETECT, {**auth, "x-test-respond": "503"})).status == 503

    async def refunded() -> bool:
        now = await access_log_entries(gateway)
        return now.get("refunded", 0.0) > before.get("refunded", 0.0)

    await eventually(refunded, within=10, what="the billed failure's refund")
    after = await access_log_entries(gateway)
    assert after.get("not_billed", 0.0) == before.get("not_billed", 0.0), (before, after)

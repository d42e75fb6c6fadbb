"""What Envoy refuses itself, through the real edge: garbage credentials without a call into authz, unsafe paths,
methods that must not be billed, CORS preflights, and the contract's JSON shape for every reply it makes."""

import asyncio

import pytest

from driftlock_kernel.keys import Environment, generate_key
from tests.conftest import CORS_ORIGIN
from tests.support.http import raw_request

DETECT = "/api/v1/stream/detect"


@pytest.fixture
def send(gateway):
    async def request(path: str = DETECT, headers=(), method: str = "POST", body: bytes = b"{}", **options):
        return await raw_request(gateway.port, method, path, headers, body, **options)

    return request


def assert_edge_error(response, status: int, code: str) -> None:
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.request_id and response.request_id


def bad_checksum(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


KEY = generate_key(Environment.LIVE).secret  # well-formed, valid checksum, stored nowhere


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer"}, "missing_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing_api_key"),
        ({"X-API-Key": " "}, "missing_api_key"),
        ({"Authorization": "Bearer junk"}, "invalid_api_key"),
        ({"Authorization": "Bearer sk_live_123"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEY}x"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEY[:-1]}"}, "invalid_api_key"),
        ({"X-API-Key": "dlk_live_short"}, "invalid_api_key"),
        ({"Authorization": f"Bearer {bad_checksum(KEY)}"}, "invalid_api_key"),
        ({"X-API-Key": bad_checksum(KEY)}, "invalid_api_key"),
        ({"Authorization": f"bearer   {bad_checksum(generate_key(Environment.TEST).secret)}"}, "invalid_api_key"),
    ],
)
async def test_garbage_credentials_are_answered_by_envoy_without_asking_authz(gateway, send, headers, code):
    before, received = await gateway.authz_checks(), len(gateway.backend.received)
    for path in (DETECT, "/api/v1/models"):
        response = await send(path, headers)
        assert_edge_error(response, 401, code)
        assert response.headers["www-authenticate"] == f'Bearer realm="driftlock", error="{code}"'
    assert await gateway.authz_checks() == before
    assert len(gateway.backend.received) == received


async def test_a_well_formed_key_with_a_valid_checksum_is_decided_by_authz(gateway, send):
    before = await gateway.authz_checks()
    response = await send(headers={"Authorization": f"Bearer {generate_key(Environment.LIVE).secret}"})
    assert response.status == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert await gateway.authz_checks() == before + 1


async def test_every_valid_key_passes_the_edge_however_it_is_sent(gateway, send, make_org, make_key):
    """The edge's checks (the patterns of the route table, the checksum of the Lua filter) agree with authz's."""
    org = await make_org()
    secrets = [(await make_key(org.id, test=n % 2 == 1))[1] for n in range(24)]
    spellings = [
        lambda s: {"Authorization": f"Bearer {s}"},
        lambda s: {"Authorization": f"bearer   {s}"},
        lambda s: {"X-API-Key": s},
        lambda s: {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": s},
    ]
    responses = await asyncio.gather(
        *(send(headers=spellings[n % len(spellings)](secret)) for n, secret in enumerate(secrets))
    )
    assert [r.status for r in responses] == [200] * len(secrets)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/stream;x/detect",
        "/api/v1/stream%3Bx/detect",
        "/api/v1/stream%3bx/detect",
        "/api/v1/stream/%2564etect",
        "/api/v1/stream%20/detect",
        "/api/v1/stream/detect/%20",
        "/api/v1/models;v=2",
        "/api/v1/models/%09x",
        "/api/v1/stream/ingest/%0Ax",
    ],
)
async def test_unsafe_paths_are_refused_before_any_route(gateway, send, make_org, make_key, path):
    org = await make_org()
    _key, secret = await make_key(org.id)
    before, received = await gateway.authz_checks(), len(gateway.backend.received)
    response = await send(path, {"Authorization": f"Bearer {secret}"})
    assert_edge_error(response, 404, "not_found")
    assert await gateway.authz_checks() == before
    assert len(gateway.backend.received) == received


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "PUT", "PATCH", "DELETE", "TRACE"])
@pytest.mark.parametrize("path", [DETECT, "/api/v1/monitor/detect/batch"])
async def test_a_billable_route_takes_get_and_post_only(gateway, send, make_org, make_key, method, path):
    org = await make_org()
    _key, secret = await make_key(org.id)
    before, received = await gateway.authz_checks(), len(gateway.backend.received)
    response = await send(path, {"Authorization": f"Bearer {secret}"}, method=method, body=b"")
    assert response.status == 405
    assert response.headers["allow"] == "GET, POST"
    if method != "HEAD":
        assert_edge_error(response, 405, "method_not_allowed")
    assert await gateway.authz_checks() == before  # never decided, so never metered
    assert len(gateway.backend.received) == received


async def test_get_and_post_on_a_billable_route_are_billed(gateway, send, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    for method in ("GET", "POST"):
        response = await send(headers={"Authorization": f"Bearer {secret}"}, method=method)
        assert response.status == 200
        assert gateway.backend.by_request_id(response.request_id).header("x-driftlock-billable") == "true"


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS"])
async def test_head_and_options_on_a_route_that_is_not_billable_are_forwarded_unbilled(
    gateway, send, make_org, make_key, method
):
    org = await make_org()
    _key, secret = await make_key(org.id)
    response = await send("/api/v1/models", {"Authorization": f"Bearer {secret}"}, method=method, body=b"")
    assert response.status == 200
    assert gateway.backend.by_request_id(response.request_id).header("x-driftlock-billable") == "false"


PREFLIGHT = {
    "Origin": CORS_ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.mark.parametrize("path", [DETECT, "/api/v1/models"])
async def test_a_cors_preflight_is_answered_at_the_edge_without_a_key(gateway, send, path):
    before, received = await gateway.authz_checks(), len(gateway.backend.received)
    response = await send(path, PREFLIGHT, method="OPTIONS", body=b"")
    assert response.status == 200
    assert response.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in response.headers
    assert await gateway.authz_checks() == before
    assert len(gateway.backend.received) == received


async def test_a_preflight_from_another_origin_gets_no_cors_headers(gateway, send):
    before, received = await gateway.authz_checks(), len(gateway.backend.received)
    response = await send(headers={**PREFLIGHT, "Origin": "https://evil.example"}, method="OPTIONS", body=b"")
    assert response.status == 200  # answered by Envoy, without the headers a browser would need to go on
    assert "access-control-allow-origin" not in response.headers
    assert await gateway.authz_checks() == before
    assert len(gateway.backend.received) == received


async def test_answers_to_an_allowed_origin_carry_cors_headers_so_a_browser_can_read_them(
    gateway, send, make_org, make_key
):
    # authz's denials and the backend's answers (Envoy's own refusals too: test_edge_for_browsers_and_bodies.py).
    denied = await send(headers={"Origin": CORS_ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert denied.status == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert denied.headers["access-control-allow-origin"] == CORS_ORIGIN
    org = await make_org()
    _key, secret = await make_key(org.id)
    allowed = await send(headers={"Origin": CORS_ORIGIN, "Authorization": f"Bearer {secret}"})
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "x-request-id" in allowed.headers["access-control-expose-headers"]


async def test_a_header_with_an_underscore_is_a_json_400(send):
    assert_edge_error_status = await send(headers={"x_driftlock_org_id": "spoof"})
    assert assert_edge_error_status.status == 400
    assert assert_edge_error_status.json()["error"]["code"] == "bad_request"


async def test_headers_too_large_are_a_json_431(send):
    response = await send(headers={"X-Padding": "x" * 70_000})
    assert response.status == 431
    assert response.json()["error"]["code"] == "headers_too_large"


async def test_a_webhook_body_over_1_mib_is_a_json_413_from_the_edge(gateway, send):
    one_mib = 1024 * 1024
    response = await send("/stripe/webhook", {"Stripe-Signature": "t=1,v1=x"}, body=b"x" * (one_mib + 1))
    assert_edge_error(response, 413, "payload_too_large")
    # Exactly 1 MiB goes through, and the service answers for itself (the signature).
    response = await send("/stripe/webhook", {"Stripe-Signature": "t=1,v1=x"}, body=b"x" * one_mib)
    assert response.status == 400 and response.json()["error"]["code"] == "invalid_signature"


async def test_every_listener_of_the_stack_is_on_loopback(gateway):
    import yaml

    config = yaml.safe_load(gateway.stack.envoy_config_path.read_text())
    addresses = [
        listener["address"]["socket_address"]["address"] for listener in config["static_resources"]["listeners"]
    ]
    assert addresses and set(addresses) == {"127.0.0.1"}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert oct(gateway.stack.envoy_config_path.stat().st_mode & 0o777) == "0o600"  # it holds the ext_authz secret

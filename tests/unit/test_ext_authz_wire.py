"""Building Envoy's CheckResponse from a decision: the one place that knows the wire format."""

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

from authz_service.check.authorizer import AccessRequest, CheckOutcome
from authz_service.check.context_signer import ContextSigner
from authz_service.check.controls import QuotaState
from authz_service.check.decision import ALLOW, HTTP_STATUS, MESSAGES, Decision, DenyCode, Grant, Route, deny
from authz_service.check.ext_authz import AllowedResponses, access_request
from authz_service.check.ext_authz import denied_response as denied_bytes
from authz_service.check.quota_headers import limit_headers
from authz_service.check.rate_limit import RateVerdict
from driftlock_kernel.billing import BillingStatus
from driftlock_kernel.context_keys import HS256, ContextKeys
from driftlock_kernel.keys import Environment, Scope
from driftlock_kernel.tokens import verify
from tests.support.authz_requests import STREAM_DETECT, check_request

SECRET = b"s" * 32
HS256_KEYS = ContextKeys(HS256, hs256_secret=SECRET)
GRANT = Grant(
    "key-1", "org-1", Environment.LIVE, frozenset({Scope.DETECT}), None, False, False, "pro", BillingStatus.ACTIVE
)
ROUTE = Route(Scope.DETECT, True, "stream", 1)


class Responses:
    """AllowedResponses, with what it answers parsed as Envoy parses it (the bytes concatenated, one message)."""

    def __init__(self):
        self.builder = AllowedResponses(ContextSigner(HS256_KEYS))

    def build(self, outcome, access):
        return CheckResponse.FromString(self.builder.build(outcome, access))


def denied_response(*args, **kwargs):
    return CheckResponse.FromString(denied_bytes(*args, **kwargs))


def request(headers) -> AccessRequest:
    return AccessRequest("rid-1", "POST", "/api/v1/stream/detect", headers, STREAM_DETECT)


def test_access_request_reads_headers_path_and_route_context():
    access = access_request(check_request({"Authorization": "Bearer x"}, request_id="abc", path="/api/v1/x?y=1"))
    assert access.request_id == "abc"
    assert access.path == "/api/v1/x?y=1"
    assert access.headers["authorization"] == "Bearer x"
    assert dict(access.context) == STREAM_DETECT


def test_allowed_response_sets_context_headers_and_strips_credentials_and_spoofs():
    headers = {
        "authorization": "Bearer dlk_live_x",
        "x-api-key": "dlk_live_x",
        "x-driftlock-org-id": "spoofed",
        "x-driftlock-admin": "true",
        "x-request-id": "rid-1",
    }
    response = Responses().build(CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro"), request(headers))
    ok = response.ok_response
    assert response.status.code == 0
    set_headers = {o.header.key: o.header.value for o in ok.headers}
    assert set_headers["x-driftlock-org-id"] == "org-1"
    assert set_headers["x-driftlock-key-id"] == "key-1"
    assert set_headers["x-driftlock-plan"] == "pro"
    assert set_headers["x-driftlock-environment"] == "live"
    assert set_headers["x-driftlock-billable"] == "true"
    assert verify(set_headers["x-driftlock-context"], SECRET)["sub"] == "org-1"
    assert all(o.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for o in ok.headers)
    assert set(ok.headers_to_remove) == {"authorization", "x-api-key", "x-driftlock-admin"}


def test_allowed_response_for_an_unbilled_call_says_so():
    response = Responses().build(CheckOutcome(ALLOW, GRANT, ROUTE, billed=False, plan="pro"), request({}))
    values = {o.header.key: o.header.value for o in response.ok_response.headers}
    assert values["x-driftlock-billable"] == "false"
    assert verify(values["x-driftlock-context"], SECRET)["billable"] is False


@pytest.mark.parametrize("code", list(DenyCode))
def test_denied_response_has_contract_status_body_and_headers(code):
    decision = (
        deny(code)
        if code is DenyCode.AUTH_UNAVAILABLE
        else Decision(code, retry_after=7 if HTTP_STATUS[code] == 429 else None)
    )
    response = denied_response(decision, "rid-9")
    denied = response.denied_response
    assert response.status.code != 0
    assert denied.status.code == HTTP_STATUS[code]
    assert json.loads(denied.body) == {"error": {"code": code.value, "message": MESSAGES[code], "request_id": "rid-9"}}
    headers = {o.header.key: o.header.value for o in denied.headers}
    assert headers["content-type"] == "application/json"
    assert ("www-authenticate" in headers) == (HTTP_STATUS[code] == 401)
    if HTTP_STATUS[code] in (429, 503):
        assert int(headers["retry-after"]) >= 1


def test_the_same_grant_reuses_one_response_until_something_differs():
    builder = AllowedResponses(ContextSigner(HS256_KEYS))
    outcome = CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro")
    first = builder.build(outcome, request({"x-request-id": "a"}))
    assert builder.build(outcome, request({"x-request-id": "b"})) is first
    unbilled = builder.build(CheckOutcome(ALLOW, GRANT, ROUTE, billed=False, plan="pro"), request({}))
    assert unbilled != first
    spoofed = CheckResponse.FromString(builder.build(outcome, request({"x-driftlock-admin": "1"})))
    assert list(spoofed.ok_response.headers_to_remove) == ["authorization", "x-api-key", "x-driftlock-admin"]
    assert "x-driftlock-admin" not in CheckResponse.FromString(first).ok_response.headers_to_remove
    assert builder.build(outcome, request({})) is first  # the shared one is untouched


def test_additions_to_a_shared_response_parse_as_one_message():
    """What Envoy reads from a base response followed by its additions: every header once, the base's first."""
    builder = Responses()
    rate = RateVerdict(allowed=True, limit=2.5, remaining=1, reset_seconds=1, retry_after=None)
    outcome = CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro", rate=rate)
    response = builder.build(outcome, request({"x-driftlock-a": "1", "x-driftlock-b": "2"}))
    assert response.status.code == 0
    assert [o.header.key for o in response.ok_response.headers][:2] == ["x-driftlock-org-id", "x-driftlock-key-id"]
    assert len(response.ok_response.headers) == 6
    assert list(response.ok_response.headers_to_remove) == [
        "authorization",
        "x-api-key",
        "x-driftlock-a",
        "x-driftlock-b",
    ]
    assert [(o.header.key, o.header.value) for o in response.ok_response.response_headers_to_add] == [
        ("x-ratelimit-limit", "2.5"),
        ("x-ratelimit-remaining", "1"),
        ("x-ratelimit-reset", "1"),
        ("ratelimit-policy", '"rate";q=2;w=1'),
        ("ratelimit", '"rate";r=1;t=1'),
    ]
    denied = denied_response(Decision(DenyCode.RATE_LIMITED, retry_after=3), "rid-2", rate.headers())
    keys = [o.header.key for o in denied.denied_response.headers]
    assert keys == ["content-type", "cache-control", "retry-after", *rate.headers()]
    assert (
        denied.denied_response.status.code == 429
        and json.loads(denied.denied_response.body)["error"]["request_id"] == "rid-2"
    )


def test_rate_limit_headers_go_to_the_client_on_allowed_calls():
    builder = Responses()
    rate = RateVerdict(allowed=True, limit=10, remaining=7, reset_seconds=1, retry_after=None)
    response = builder.build(CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro", rate=rate), request({}))
    added = {o.header.key: o.header.value for o in response.ok_response.response_headers_to_add}
    assert added == {
        "x-ratelimit-limit": "10",
        "x-ratelimit-remaining": "7",
        "x-ratelimit-reset": "1",
        "ratelimit-policy": '"rate";q=10;w=1',
        "ratelimit": '"rate";r=7;t=1',
    }
    plain = builder.build(CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro"), request({}))
    assert len(plain.ok_response.response_headers_to_add) == 0


def test_quota_headers_state_the_period_quota_and_the_overage_of_a_soft_plan():
    builder = Responses()
    rate = RateVerdict(allowed=True, limit=0.5, remaining=0, reset_seconds=2, retry_after=None)
    quota = QuotaState(included=1000, remaining=0, reset_seconds=3600, window_seconds=2_592_000, overage_units=25)
    outcome = CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro", rate=rate, quota=quota)
    added = {
        o.header.key: o.header.value for o in builder.build(outcome, request({})).ok_response.response_headers_to_add
    }
    # Structured-field lists: one item per policy, parameters q and w (policy), r and t (state).
    assert added["ratelimit-policy"] == '"rate";q=1;w=2, "quota";q=1000;w=2592000'
    assert added["ratelimit"] == '"rate";r=0;t=2, "quota";r=0;t=3600'
    assert added["x-driftlock-overage-units"] == "25"
    within = QuotaState(included=1000, remaining=400, reset_seconds=60, window_seconds=2_592_000, overage_units=0)
    outcome = CheckOutcome(ALLOW, GRANT, ROUTE, billed=True, plan="pro", quota=within)
    added = {
        o.header.key: o.header.value for o in builder.build(outcome, request({})).ok_response.response_headers_to_add
    }
    assert added == {"ratelimit-policy": '"quota";q=1000;w=2592000', "ratelimit": '"quota";r=400;t=60'}
    denied = denied_response(Decision(DenyCode.SPEND_CAP_REACHED, retry_after=60), "rid", limit_headers(None, quota))
    headers = {o.header.key: o.header.value for o in denied.denied_response.headers}
    assert denied.denied_response.status.code == 429 and headers["ratelimit"] == '"quota";r=0;t=3600'

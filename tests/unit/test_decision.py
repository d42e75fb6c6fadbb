import pytest

from authz_service.decision import (
    ALLOW,
    HTTP_STATUS,
    MESSAGES,
    DenyCode,
    Grant,
    Route,
    RouteError,
    decide,
    is_billed,
    route_from_context,
)

NOW = 1_800_000_000.0
DETECT = Route(scope="detect", billable=True, product="stream", units=1)
READ = Route(scope="read", billable=False, product=None, units=1)


def grant(**changes) -> Grant:
    values = dict(
        key_id="k1",
        org_id="o1",
        environment="live",
        scopes=frozenset({"detect", "ingest", "read"}),
        expires_at=None,
        revoked=False,
        org_suspended=False,
        plan="free",
        billing_status="none",
    )
    values.update(changes)
    return Grant(**values)


def test_every_code_has_the_contract_status_and_a_message():
    assert dict(HTTP_STATUS) == {
        DenyCode.MISSING_API_KEY: 401,
        DenyCode.INVALID_API_KEY: 401,
        DenyCode.REVOKED_API_KEY: 401,
        DenyCode.EXPIRED_API_KEY: 401,
        DenyCode.PAYMENT_REQUIRED: 402,
        DenyCode.INSUFFICIENT_SCOPE: 403,
        DenyCode.ORG_SUSPENDED: 403,
        DenyCode.QUOTA_EXCEEDED: 429,
        DenyCode.RATE_LIMITED: 429,
        DenyCode.AUTH_UNAVAILABLE: 503,
    }
    assert set(MESSAGES) == set(DenyCode)


def test_a_valid_key_with_the_scope_is_allowed():
    assert decide(DETECT, grant(), NOW) == ALLOW


def test_revoked_key_is_denied():
    assert decide(DETECT, grant(revoked=True), NOW).code is DenyCode.REVOKED_API_KEY


def test_expired_key_is_denied_from_the_expiry_instant():
    assert decide(DETECT, grant(expires_at=NOW), NOW).code is DenyCode.EXPIRED_API_KEY
    assert decide(DETECT, grant(expires_at=NOW + 1), NOW) == ALLOW


def test_revocation_wins_over_expiry():
    assert decide(DETECT, grant(revoked=True, expires_at=NOW - 10), NOW).code is DenyCode.REVOKED_API_KEY


def test_suspended_organisation_is_denied():
    assert decide(READ, grant(org_suspended=True), NOW).code is DenyCode.ORG_SUSPENDED


def test_missing_scope_is_denied():
    read_only = grant(scopes=frozenset({"read"}))
    assert decide(DETECT, read_only, NOW).code is DenyCode.INSUFFICIENT_SCOPE
    assert decide(READ, read_only, NOW) == ALLOW


def test_unknown_route_scope_is_denied():
    assert decide(Route("admin", False, None, 1), grant(), NOW).code is DenyCode.INSUFFICIENT_SCOPE


def test_only_live_keys_on_billable_routes_are_billed():
    assert is_billed(DETECT, grant())
    assert not is_billed(DETECT, grant(environment="test"))
    assert not is_billed(READ, grant())


def test_route_from_context_reads_the_extensions():
    route = route_from_context({"scope": "detect", "billable": "true", "product": "monitor", "units": "3"})
    assert route == Route(scope="detect", billable=True, product="monitor", units=3)
    assert route_from_context({"scope": "read"}) == Route(scope="read", billable=False, product=None, units=1)


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"billable": "true", "product": "stream"},
        {"scope": "detect", "billable": "yes", "product": "stream"},
        {"scope": "detect", "billable": "true"},
        {"scope": "detect", "billable": "true", "product": "stream", "units": "0"},
        {"scope": "detect", "billable": "true", "product": "stream", "units": "-1"},
        {"scope": "detect", "billable": "true", "product": "stream", "units": "many"},
    ],
)
def test_route_from_context_refuses_malformed_extensions(context):
    with pytest.raises(RouteError):
        route_from_context(context)

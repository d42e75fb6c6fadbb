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


# --- billing: dunning, effective plan, quotas ------------------------------------------------------------------

from authz_service.decision import PlanLimits  # noqa: E402
from driftlock_kernel.billing_rules import BillingPolicy, effective_plan, payment_overdue  # noqa: E402

DAY = 86400.0
INGEST = Route(scope="ingest", billable=False, product="stream", units=1)
POLICY = BillingPolicy(grace_seconds=7 * DAY)


def test_past_due_within_grace_keeps_full_service():
    overdue = grant(billing_status="past_due", past_due_since=NOW - 7 * DAY + 1)
    assert decide(DETECT, overdue, NOW, policy=POLICY) == ALLOW


def test_past_due_past_grace_blocks_billable_routes_only():
    overdue = grant(billing_status="past_due", past_due_since=NOW - 7 * DAY)
    assert decide(DETECT, overdue, NOW, policy=POLICY).code is DenyCode.PAYMENT_REQUIRED
    assert decide(INGEST, overdue, NOW, policy=POLICY) == ALLOW
    assert decide(READ, overdue, NOW, policy=POLICY) == ALLOW


def test_unpaid_is_overdue_too():
    assert payment_overdue("unpaid", NOW - 8 * DAY, NOW, POLICY)


def test_zero_grace_blocks_at_once():
    overdue = grant(billing_status="past_due", past_due_since=NOW)
    assert decide(DETECT, overdue, NOW, policy=BillingPolicy(grace_seconds=0)).code is DenyCode.PAYMENT_REQUIRED


def test_serve_policy_never_blocks_for_payment():
    overdue = grant(billing_status="past_due", past_due_since=NOW - 30 * DAY)
    assert decide(DETECT, overdue, NOW, policy=BillingPolicy(block_billable_when_overdue=False)) == ALLOW


def test_overdue_without_a_start_time_is_still_in_grace():
    assert not payment_overdue("past_due", None, NOW, POLICY)


def test_paying_again_lifts_the_block():
    paid = grant(billing_status="active", past_due_since=None)
    assert decide(DETECT, paid, NOW, policy=POLICY) == ALLOW


def test_test_keys_are_never_blocked_for_payment():
    overdue = grant(environment="test", billing_status="past_due", past_due_since=NOW - 30 * DAY)
    assert decide(DETECT, overdue, NOW, policy=POLICY) == ALLOW


@pytest.mark.parametrize("status", ["canceled", "incomplete", "incomplete_expired", "paused"])
def test_no_paid_subscription_falls_back_to_free(status):
    assert effective_plan("pro", status) == "free"


@pytest.mark.parametrize("status", ["none", "active", "trialing", "past_due", "unpaid"])
def test_subscription_in_force_keeps_its_plan(status):
    assert effective_plan("pro", status) == "pro"


def test_block_plan_serves_exactly_its_included_units():
    plan = PlanLimits("small", included_units=10, overage="block")
    assert decide(DETECT, grant(), NOW, plan=plan, used_units=9) == ALLOW
    denied = decide(DETECT, grant(), NOW, plan=plan, used_units=10, period_end=NOW + 3600)
    assert denied.code is DenyCode.QUOTA_EXCEEDED
    assert denied.retry_after == 3601


def test_soft_plan_keeps_serving_past_its_included_units():
    plan = PlanLimits("pro", included_units=10, overage="soft")
    assert decide(DETECT, grant(), NOW, plan=plan, used_units=1_000_000) == ALLOW


def test_hard_cap_blocks_a_soft_plan_past_its_percentage():
    plan = PlanLimits("pro", included_units=100, overage="soft", hard_cap_percent=150)
    assert decide(DETECT, grant(), NOW, plan=plan, used_units=149) == ALLOW
    assert decide(DETECT, grant(), NOW, plan=plan, used_units=150).code is DenyCode.QUOTA_EXCEEDED


def test_hard_cap_below_100_percent_tightens_a_block_plan():
    assert PlanLimits("p", included_units=100, overage="block", hard_cap_percent=80).unit_cap == 80
    assert PlanLimits("p", included_units=100, overage="block", hard_cap_percent=200).unit_cap == 100
    assert PlanLimits("p", included_units=100, overage="soft").unit_cap is None


def test_a_multi_unit_call_must_fit_entirely():
    plan = PlanLimits("small", included_units=10, overage="block")
    three = Route(scope="detect", billable=True, product="stream", units=3)
    assert decide(three, grant(), NOW, plan=plan, used_units=7) == ALLOW
    assert decide(three, grant(), NOW, plan=plan, used_units=8).code is DenyCode.QUOTA_EXCEEDED


def test_quota_applies_to_billed_calls_only():
    plan = PlanLimits("small", included_units=10, overage="block")
    assert decide(INGEST, grant(), NOW, plan=plan, used_units=10) == ALLOW
    assert decide(DETECT, grant(environment="test"), NOW, plan=plan, used_units=10) == ALLOW

"""The pure stages of the decision pipeline (the functions Authorizer.check runs), one by one."""

from typing import Any

import pytest

from authz_service.check.decision import (
    ALLOW,
    HTTP_STATUS,
    MESSAGES,
    Decision,
    DenyCode,
    Grant,
    PlanLimits,
    Route,
    RouteError,
    check_access,
    check_billing,
    check_rate,
    is_billed,
    route_from_context,
)
from authz_service.check.rate_limit import RateVerdict
from driftlock_kernel.billing import BillingPolicy, BillingStatus, Overage, effective_plan, payment_overdue
from driftlock_kernel.keys import Environment, Scope

NOW = 1_800_000_000.0
DAY = 86400.0
DETECT = Route(scope=Scope.DETECT, billable=True, product="stream", units=1)
READ = Route(scope=Scope.READ, billable=False, product=None, units=1)
INGEST = Route(scope=Scope.INGEST, billable=False, product="stream", units=1)
POLICY = BillingPolicy(grace_seconds=7 * DAY)
UNLIMITED = PlanLimits("pro", included_units=1000, overage=Overage.SOFT)


def grant(**changes: Any) -> Grant:
    values: dict[str, Any] = dict(
        key_id="k1",
        org_id="o1",
        environment=Environment.LIVE,
        scopes=frozenset(Scope),
        expires_at=None,
        revoked=False,
        org_suspended=False,
        plan="free",
        billing_status=BillingStatus.NONE,
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
        DenyCode.SPEND_CAP_REACHED: 429,
        DenyCode.KEY_QUOTA_EXCEEDED: 429,
        DenyCode.IP_NOT_ALLOWED: 403,
        DenyCode.PRODUCT_NOT_ALLOWED: 403,
    }
    assert set(MESSAGES) == set(DenyCode)


def billing(route: Route, g: Grant, *, plan: PlanLimits = UNLIMITED, used: int = 0, policy=POLICY) -> Decision:
    return check_billing(route, g, NOW, plan, used_units=used, period_end=NOW + 3600, policy=policy)


def test_a_valid_key_with_the_scope_is_allowed():
    assert check_access(DETECT, grant(), NOW) == ALLOW
    assert billing(DETECT, grant()) == ALLOW


def test_revoked_key_is_denied():
    assert check_access(DETECT, grant(revoked=True), NOW).code is DenyCode.REVOKED_API_KEY


def test_expired_key_is_denied_from_the_expiry_instant():
    assert check_access(DETECT, grant(expires_at=NOW), NOW).code is DenyCode.EXPIRED_API_KEY
    assert check_access(DETECT, grant(expires_at=NOW + 1), NOW) == ALLOW


def test_revocation_wins_over_expiry():
    assert check_access(DETECT, grant(revoked=True, expires_at=NOW - 10), NOW).code is DenyCode.REVOKED_API_KEY


def test_suspended_organisation_is_denied():
    assert check_access(READ, grant(org_suspended=True), NOW).code is DenyCode.ORG_SUSPENDED


def test_missing_scope_is_denied():
    read_only = grant(scopes=frozenset({Scope.READ}))
    assert check_access(DETECT, read_only, NOW).code is DenyCode.INSUFFICIENT_SCOPE
    assert check_access(READ, read_only, NOW) == ALLOW


def test_a_route_naming_an_unknown_scope_is_a_route_table_error():
    with pytest.raises(RouteError):
        route_from_context({"scope": "admin"})


def test_only_live_keys_on_billable_routes_are_billed():
    assert is_billed(DETECT, grant())
    assert not is_billed(DETECT, grant(environment=Environment.TEST))
    assert not is_billed(READ, grant())


def test_route_from_context_reads_the_extensions():
    route = route_from_context({"scope": "detect", "billable": "true", "product": "monitor", "units": "3"})
    assert route == Route(scope=Scope.DETECT, billable=True, product="monitor", units=3)
    assert route_from_context({"scope": "read"}) == Route(scope=Scope.READ, billable=False, product=None, units=1)


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


# --- rate ------------------------------------------------------------------------------------------------------


def test_rate_stage_passes_without_a_limit_and_refuses_an_empty_bucket_with_retry_after():
    assert check_rate(None) == ALLOW
    assert check_rate(RateVerdict(True, limit=5, remaining=4, reset_seconds=1, retry_after=None)) == ALLOW
    refused = check_rate(RateVerdict(False, limit=5, remaining=0, reset_seconds=1, retry_after=2))
    assert (refused.code, refused.retry_after) == (DenyCode.RATE_LIMITED, 2)


# --- billing: dunning, effective plan, quotas ------------------------------------------------------------------


def test_past_due_within_grace_keeps_full_service():
    overdue = grant(billing_status="past_due", past_due_since=NOW - 7 * DAY + 1)
    assert billing(DETECT, overdue) == ALLOW


def test_past_due_past_grace_blocks_billable_routes_only():
    overdue = grant(billing_status="past_due", past_due_since=NOW - 7 * DAY)
    assert billing(DETECT, overdue).code is DenyCode.PAYMENT_REQUIRED
    assert billing(INGEST, overdue) == ALLOW
    assert billing(READ, overdue) == ALLOW


def test_unpaid_is_overdue_too():
    assert payment_overdue(BillingStatus.UNPAID, NOW - 8 * DAY, NOW, POLICY)


def test_zero_grace_blocks_at_once():
    overdue = grant(billing_status="past_due", past_due_since=NOW)
    assert billing(DETECT, overdue, policy=BillingPolicy(grace_seconds=0)).code is DenyCode.PAYMENT_REQUIRED


def test_serve_policy_never_blocks_for_payment():
    overdue = grant(billing_status="past_due", past_due_since=NOW - 30 * DAY)
    assert billing(DETECT, overdue, policy=BillingPolicy(block_billable_when_overdue=False)) == ALLOW


def test_overdue_without_a_start_time_is_still_in_grace():
    assert not payment_overdue(BillingStatus.PAST_DUE, None, NOW, POLICY)


def test_paying_again_lifts_the_block():
    paid = grant(billing_status="active", past_due_since=None)
    assert billing(DETECT, paid) == ALLOW


def test_test_keys_are_never_blocked_for_payment():
    overdue = grant(environment=Environment.TEST, billing_status="past_due", past_due_since=NOW - 30 * DAY)
    assert billing(DETECT, overdue) == ALLOW


@pytest.mark.parametrize("status", ["canceled", "incomplete", "incomplete_expired", "paused"])
def test_no_paid_subscription_falls_back_to_free(status):
    assert effective_plan("pro", status) == "free"
    assert effective_plan("pro", status, BillingPolicy(fallback_plan="starter")) == "starter"


@pytest.mark.parametrize("status", ["none", "active", "trialing", "past_due", "unpaid"])
def test_subscription_in_force_keeps_its_plan(status):
    assert effective_plan("pro", status) == "pro"


def test_block_plan_serves_exactly_its_included_units():
    plan = PlanLimits("small", included_units=10, overage=Overage.BLOCK)
    assert billing(DETECT, grant(), plan=plan, used=9) == ALLOW
    denied = billing(DETECT, grant(), plan=plan, used=10)
    assert denied.code is DenyCode.QUOTA_EXCEEDED
    assert denied.retry_after == 3601


def test_soft_plan_keeps_serving_past_its_included_units():
    plan = PlanLimits("pro", included_units=10, overage=Overage.SOFT)
    assert billing(DETECT, grant(), plan=plan, used=1_000_000) == ALLOW


def test_hard_cap_blocks_a_soft_plan_past_its_percentage():
    plan = PlanLimits("pro", included_units=100, overage=Overage.SOFT, hard_cap_percent=150)
    assert billing(DETECT, grant(), plan=plan, used=149) == ALLOW
    assert billing(DETECT, grant(), plan=plan, used=150).code is DenyCode.QUOTA_EXCEEDED


def test_hard_cap_below_100_percent_tightens_a_block_plan():
    assert PlanLimits("p", included_units=100, overage=Overage.BLOCK, hard_cap_percent=80).unit_cap == 80
    assert PlanLimits("p", included_units=100, overage=Overage.BLOCK, hard_cap_percent=200).unit_cap == 100
    assert PlanLimits("p", included_units=100, overage=Overage.SOFT).unit_cap is None


def test_a_multi_unit_call_must_fit_entirely():
    plan = PlanLimits("small", included_units=10, overage=Overage.BLOCK)
    three = Route(scope=Scope.DETECT, billable=True, product="stream", units=3)
    assert billing(three, grant(), plan=plan, used=7) == ALLOW
    assert billing(three, grant(), plan=plan, used=8).code is DenyCode.QUOTA_EXCEEDED


def test_quota_applies_to_billed_calls_only():
    plan = PlanLimits("small", included_units=10, overage=Overage.BLOCK)
    assert billing(INGEST, grant(), plan=plan, used=10) == ALLOW
    assert billing(DETECT, grant(environment=Environment.TEST), plan=plan, used=10) == ALLOW

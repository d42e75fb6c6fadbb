"""Customer controls on the request path (issue 20), decided from the grant and the plan in memory: pure, no
I/O. `Authorizer` runs them between the stages of decision.py:

    source       check_source(grant, source)                -> ip_not_allowed      (the key's allowed_cidrs)
    products     check_products(route, grant, plan)         -> product_not_allowed (the plan's, the key's)
    rate         key_rate_limit(grant, plan)                -> the rate the key's bucket fills at
    key quota    key_units_left(max_units, used, units)     -> key_quota_exceeded  (max_units_per_period)
    billing      decision.billing_cap(plan, spend cap)      -> spend_cap_reached   (max_overage_units)

and quota_state() is what the RateLimit headers tell the client about the period's quota.
"""

from dataclasses import dataclass

from authz_service.check.decision import ALLOW, Decision, DenyCode, Grant, PlanLimits, Route, deny
from driftlock_kernel.keys import Scope


def check_source(grant: Grant, source: str) -> Decision:
    """The key's allow-list of source networks, against the address Envoy trusts as the client's."""
    networks = grant.allowed_networks
    if networks is None or networks.allows(source):
        return ALLOW
    return deny(DenyCode.IP_NOT_ALLOWED)


def check_products(route: Route, grant: Grant, plan: PlanLimits) -> Decision:
    """A detect call on a product the plan or the key does not include."""
    if route.scope is not Scope.DETECT or route.product is None:
        return ALLOW
    if (plan.products is not None and route.product not in plan.products) or (
        grant.products is not None and route.product not in grant.products
    ):
        return deny(DenyCode.PRODUCT_NOT_ALLOWED)
    return ALLOW


def key_rate_limit(grant: Grant, plan: PlanLimits) -> float | None:
    """The rate a live key's bucket fills at: its own when set (never above the plan's unless an operator set
    it so, should the plan have changed since), else the plan's; None: no limit."""
    own = grant.rate_limit_rps
    if own is None:
        return plan.rate_limit_rps
    if grant.rate_limit_above_plan or plan.rate_limit_rps is None:
        return own
    return min(own, plan.rate_limit_rps)


def key_units_left(max_units: int, used_units: int, units: int) -> int:
    """Stage `key quota`: units the key's own cap (max_units_per_period) leaves after this call; below 0 it is
    refused (key_quota_exceeded), within the exact margin it is reserved in the database first."""
    return max_units - used_units - units


# Not frozen: one may be built for every check.
@dataclass(slots=True)
class QuotaState:
    """The organisation's period quota as a client is told it (RateLimit headers, quota_headers.py)."""

    included: int  # q: the plan's included units
    remaining: int  # r: what is left of them (0 in overage)
    reset_seconds: int  # t: until the period ends
    window_seconds: int  # w: the period's length
    overage_units: int  # used past the included units (a soft plan keeps serving)


def quota_state(included: int, used: int, period_start: float, period_end: float, now: float) -> QuotaState:
    return QuotaState(
        included=included,
        remaining=max(0, included - used),
        reset_seconds=max(0, int(period_end - now)),
        window_seconds=max(1, int(period_end - period_start)),
        overage_units=max(0, used - included),
    )

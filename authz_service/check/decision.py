"""May this request pass? The pure stages of the one decision pipeline: no gRPC, database, metrics or protobuf.

`Authorizer.check` (authorizer.py) runs them in this order, with the look-ups between them, for every request;
the unit tests call the same functions:

    route        route_from_context(context_extensions) -> Route           (or RouteError: fail closed)
    credential   credentials.read_credential(headers)  -> ParsedKey        (or a DenyCode)
    grant        GrantStore.get(hash)                  -> Grant            (I/O; None: invalid_api_key)
    access       check_access(route, grant, now)       -> Decision
    rate         check_rate(RateLimiter.take(...))     -> Decision
    billing      check_billing(route, grant, now, ...) -> Decision         (dunning, quota)
    record       Meter.record(...)                                         (count what was allowed; within
                 or Meter.reserve(...) near a cap                           reservation_cap's margin of a cap,
                                                                            counted in the database first)

Every outcome is one member of `DenyCode` (or an allow), mapped to its HTTP status in one table; the same
member is the metric label and the `error.code` a client reads.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from authz_service.check.networks import AllowedNetworks
from authz_service.check.rate_limit import RateVerdict
from driftlock_kernel.billing import (
    DEFAULT_POLICY,
    BillingPolicy,
    BillingStatus,
    Overage,
    PlanLimits,
    payment_blocks_billable,
)
from driftlock_kernel.keys import Environment, Scope


class DenyCode(StrEnum):
    MISSING_API_KEY = "missing_api_key"
    INVALID_API_KEY = "invalid_api_key"
    REVOKED_API_KEY = "revoked_api_key"
    EXPIRED_API_KEY = "expired_api_key"
    PAYMENT_REQUIRED = "payment_required"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    ORG_SUSPENDED = "org_suspended"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"
    AUTH_UNAVAILABLE = "auth_unavailable"
    # Customer controls (controls.py)
    SPEND_CAP_REACHED = "spend_cap_reached"
    KEY_QUOTA_EXCEEDED = "key_quota_exceeded"
    IP_NOT_ALLOWED = "ip_not_allowed"
    PRODUCT_NOT_ALLOWED = "product_not_allowed"


HTTP_STATUS: Mapping[DenyCode, int] = {
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

MESSAGES: Mapping[DenyCode, str] = {
    DenyCode.MISSING_API_KEY: "An API key is required: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'.",
    DenyCode.INVALID_API_KEY: "The API key is not valid.",
    DenyCode.REVOKED_API_KEY: "The API key has been revoked.",
    DenyCode.EXPIRED_API_KEY: "The API key has expired.",
    DenyCode.PAYMENT_REQUIRED: "Payment is overdue; detection is paused until the invoice is paid.",
    DenyCode.INSUFFICIENT_SCOPE: "The API key does not have the scope this route requires.",
    DenyCode.ORG_SUSPENDED: "The organisation is suspended.",
    DenyCode.QUOTA_EXCEEDED: "The plan's usage quota for this billing period is exhausted.",
    DenyCode.RATE_LIMITED: "Too many requests; slow down.",
    DenyCode.AUTH_UNAVAILABLE: "Authentication is temporarily unavailable; retry shortly.",
    DenyCode.SPEND_CAP_REACHED: "The organisation's spend cap for this billing period is reached.",
    DenyCode.KEY_QUOTA_EXCEEDED: "This API key's usage limit for this billing period is exhausted.",
    DenyCode.IP_NOT_ALLOWED: "This API key may not be used from this address.",
    DenyCode.PRODUCT_NOT_ALLOWED: "This API key or plan does not include this product.",
}

# Seconds a client should wait before retrying when authentication itself is unavailable.
AUTH_UNAVAILABLE_RETRY_AFTER = 1

# The methods a billable route bills; the route table answers any other (HEAD, OPTIONS, ...) there itself.
BILLABLE_METHODS = frozenset({"GET", "POST"})


@dataclass(frozen=True, slots=True)
class Route:
    """What the route table (Envoy's per-route context_extensions) says about the requested route."""

    scope: Scope
    billable: bool
    product: str | None
    units: int


class RouteError(ValueError):
    """The route's context_extensions are missing or malformed: a configuration error, so authz fails closed."""


def route_from_context(context: Mapping[str, str]) -> Route:
    """Stage `route`: what the route table says the requested route is."""
    scope_text = context.get("scope", "")
    if not scope_text:
        raise RouteError("route has no 'scope' context extension")
    try:
        scope = Scope(scope_text)
    except ValueError:
        raise RouteError(f"route's 'scope' {scope_text!r} is not a scope keys can hold") from None
    billable_text = context.get("billable", "false")
    if billable_text not in ("true", "false"):
        raise RouteError(f"route's 'billable' must be true or false, not {billable_text!r}")
    billable = billable_text == "true"
    product = context.get("product") or None
    if billable and product is None:
        raise RouteError("a billable route needs a 'product' context extension")
    units_text = context.get("units", "1")
    if not units_text.isdigit() or not 1 <= int(units_text) <= 1_000_000:
        raise RouteError(f"route's 'units' must be a whole number from 1, not {units_text!r}")
    return Route(scope=scope, billable=billable, product=product, units=int(units_text))


@dataclass(frozen=True, slots=True)
class Grant:
    """What the store knows about one API key: the key, its organisation and the organisation's billing state."""

    key_id: str
    org_id: str
    environment: Environment
    scopes: frozenset[Scope]
    expires_at: float | None  # Unix time
    revoked: bool
    org_suspended: bool
    plan: str  # the plan the organisation is on; see billing.effective_plan for the one that applies
    billing_status: BillingStatus
    past_due_since: float | None = None  # Unix time
    period_start: float | None = None  # the Stripe subscription's current period, Unix time
    period_end: float | None = None
    stripe_customer: str | None = None  # the organisation's Stripe customer, recorded with each unit counted
    # Customer controls (controls.py), each None when not set: the organisation's spend cap (units past the
    # plan's included ones), and the key's limits.
    max_overage_units: int | None = None
    max_units: int | None = None  # the key's max_units_per_period
    rate_limit_rps: float | None = None  # the key's own rate limit
    rate_limit_above_plan: bool = False  # set by an operator: applies even above the plan's
    allowed_networks: "AllowedNetworks | None" = None
    products: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    code: DenyCode | None = None  # None: allowed
    retry_after: int | None = None

    @property
    def allowed(self) -> bool:
        return self.code is None


ALLOW = Decision()
_DENY = {code: Decision(code) for code in DenyCode}
DENY_UNAVAILABLE = Decision(DenyCode.AUTH_UNAVAILABLE, retry_after=AUTH_UNAVAILABLE_RETRY_AFTER)


def deny(code: DenyCode) -> Decision:
    return DENY_UNAVAILABLE if code is DenyCode.AUTH_UNAVAILABLE else _DENY[code]


def is_billed(route: Route, grant: Grant) -> bool:
    """Whether this call counts against the organisation: billable routes, live keys only."""
    return route.billable and grant.environment == Environment.LIVE


def is_test_metered(route: Route, grant: Grant) -> bool:
    """Whether this call counts against the organisation's test allowance: billable routes, test keys. It is
    never billed: test usage is kept apart from live usage."""
    return route.billable and grant.environment == Environment.TEST


def check_test_allowance(route: Route, plan: PlanLimits, now: float, *, used_units: int, period_end: float) -> Decision:
    """Stage `billing` for a test key: its organisation's test allowance this period (a block quota; dunning
    does not apply, since nothing is billed)."""
    if used_units + route.units > plan.test_included_units:
        return quota_exceeded(now, period_end)
    return ALLOW


def check_access(route: Route, grant: Grant, now: float) -> Decision:
    """Stage `access`: may this key call this route at all? (Key and organisation state, the route's scope.)"""
    if grant.revoked:
        return _DENY[DenyCode.REVOKED_API_KEY]
    if grant.expires_at is not None and now >= grant.expires_at:
        return _DENY[DenyCode.EXPIRED_API_KEY]
    if grant.org_suspended:
        return _DENY[DenyCode.ORG_SUSPENDED]
    if route.scope not in grant.scopes:
        return _DENY[DenyCode.INSUFFICIENT_SCOPE]
    return ALLOW


def check_rate(verdict: RateVerdict | None) -> Decision:
    """Stage `rate`: the key's rate limit (None: its plan has none)."""
    if verdict is None or verdict.allowed:
        return ALLOW
    return Decision(DenyCode.RATE_LIMITED, retry_after=verdict.retry_after)


def check_billing(
    route: Route,
    grant: Grant,
    now: float,
    plan: PlanLimits,
    *,
    used_units: int,
    period_end: float,
    policy: BillingPolicy = DEFAULT_POLICY,
) -> Decision:
    """Stage `billing`: may this call be billed? Only billed calls (live key, billable route) are refused here.

    `plan` is the organisation's effective plan, `used_units` its pooled usage this billing period before this
    call, and `period_end` (Unix time) when the period, and so an exhausted quota, ends.
    """
    if not is_billed(route, grant):
        return ALLOW
    if payment_blocks_billable(grant.billing_status, grant.past_due_since, now, policy):
        return _DENY[DenyCode.PAYMENT_REQUIRED]
    cap, code = billing_cap(plan, grant.max_overage_units)
    if cap is not None and used_units + route.units > cap:
        return quota_exceeded(now, period_end, code)
    return ALLOW


def billing_cap(plan: PlanLimits, max_overage_units: int | None) -> tuple[float | None, DenyCode]:
    """Units the organisation may use this period (None: no end), and the code a call past them gets: the
    plan's cap (quota_exceeded), or the organisation's spend cap on a soft plan when that comes first."""
    if max_overage_units is None or plan.overage is not Overage.SOFT:
        return plan.unit_cap, DenyCode.QUOTA_EXCEEDED
    # A soft plan: its only other cap is the hard one (unit_cap, without building it on every check).
    spend_cap = plan.included_units + max_overage_units
    if plan.hard_cap_percent is None:
        return float(spend_cap), DenyCode.SPEND_CAP_REACHED
    hard_cap = plan.included_units * plan.hard_cap_percent / 100
    if spend_cap < hard_cap:
        return float(spend_cap), DenyCode.SPEND_CAP_REACHED
    return hard_cap, DenyCode.QUOTA_EXCEEDED


def quota_exceeded(now: float, period_end: float, code: DenyCode = DenyCode.QUOTA_EXCEEDED) -> Decision:
    # The quota (or spend cap, or key quota) comes back with the next billing period.
    return Decision(code, retry_after=max(1, int(period_end - now) + 1))


def reservation_cap(
    plan: PlanLimits, used_units: int, units: int, margin: int, max_overage_units: int | None = None
) -> int | None:
    """The cap to reserve against when this call comes within `margin` units of it, else None (the in-memory
    path: far from the cap, what other replicas counted lately cannot carry the total past it)."""
    cap, _code = billing_cap(plan, max_overage_units) if max_overage_units is not None else (plan.unit_cap, None)
    if cap is None or cap - (used_units + units) >= margin:
        return None
    return int(cap)

"""May this request pass? Pure functions over plain values: no gRPC, database, metrics or protobuf here.

Every outcome is one member of `DenyCode` (or an allow), mapped to its HTTP status in one table; the same
member is the metric label and the `error.code` a client reads.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from driftlock_kernel.billing_rules import DEFAULT_POLICY, BillingPolicy, payment_overdue


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
}

# Seconds a client should wait before retrying when authentication itself is unavailable.
AUTH_UNAVAILABLE_RETRY_AFTER = 1


@dataclass(frozen=True, slots=True)
class Route:
    """What the route table (Envoy's per-route context_extensions) says about the requested route."""

    scope: str
    billable: bool
    product: str | None
    units: int


class RouteError(ValueError):
    """The route's context_extensions are missing or malformed: a configuration error, so authz fails closed."""


def route_from_context(context: Mapping[str, str]) -> Route:
    scope = context.get("scope", "")
    if not scope:
        raise RouteError("route has no 'scope' context extension")
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
    environment: str  # "live" | "test"
    scopes: frozenset[str]
    expires_at: float | None  # Unix time
    revoked: bool
    org_suspended: bool
    plan: str  # the plan the organisation is on; see effective_plan for the one that applies
    billing_status: str
    past_due_since: float | None = None  # Unix time
    period_start: float | None = None  # the Stripe subscription's current period, Unix time
    period_end: float | None = None


@dataclass(frozen=True, slots=True)
class PlanLimits:
    name: str
    included_units: int
    overage: str  # "soft" | "block"
    hard_cap_percent: int | None = None
    rate_limit_rps: float | None = None

    @property
    def unit_cap(self) -> float | None:
        """Units this plan serves per period; None when it serves without end (a soft plan without a hard cap)."""
        caps = []
        if self.overage == "block":
            caps.append(float(self.included_units))
        if self.hard_cap_percent is not None:
            caps.append(self.included_units * self.hard_cap_percent / 100)
        return min(caps) if caps else None


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
    return route.billable and grant.environment == "live"


def check_access(route: Route, grant: Grant, now: float) -> Decision:
    """May this key call this route at all? (Key and organisation state, and the route's scope.)"""
    if grant.revoked:
        return _DENY[DenyCode.REVOKED_API_KEY]
    if grant.expires_at is not None and now >= grant.expires_at:
        return _DENY[DenyCode.EXPIRED_API_KEY]
    if grant.org_suspended:
        return _DENY[DenyCode.ORG_SUSPENDED]
    if route.scope not in grant.scopes:
        return _DENY[DenyCode.INSUFFICIENT_SCOPE]
    return ALLOW


def check_billing(
    route: Route,
    grant: Grant,
    now: float,
    *,
    policy: BillingPolicy = DEFAULT_POLICY,
    plan: PlanLimits | None = None,
    used_units: int = 0,
    period_end: float | None = None,
) -> Decision:
    """May this call be billed? Only billed calls (live key, billable route) are ever refused here.

    `used_units` is the organisation's pooled usage this billing period before this call; `plan` the limits of
    its effective plan (None: no quota is enforced).
    """
    if not is_billed(route, grant):
        return ALLOW
    if policy.block_billable_when_overdue and payment_overdue(grant.billing_status, grant.past_due_since, now, policy):
        return _DENY[DenyCode.PAYMENT_REQUIRED]
    if plan is not None:
        cap = plan.unit_cap
        if cap is not None and used_units + route.units > cap:
            # The quota comes back with the next billing period.
            wait = max(1, int(period_end - now) + 1) if period_end is not None else 3600
            return Decision(DenyCode.QUOTA_EXCEEDED, retry_after=wait)
    return ALLOW


def decide(
    route: Route,
    grant: Grant,
    now: float,
    *,
    policy: BillingPolicy = DEFAULT_POLICY,
    plan: PlanLimits | None = None,
    used_units: int = 0,
    period_end: float | None = None,
) -> Decision:
    """The whole decision for a verified key, rate limits aside (they need state: see rate_limit.py).
    Key-independent failures (no key, bad key, no store) are decided before a grant exists."""
    access = check_access(route, grant, now)
    if not access.allowed:
        return access
    return check_billing(route, grant, now, policy=policy, plan=plan, used_units=used_units, period_end=period_end)

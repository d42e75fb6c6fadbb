"""The decision pipeline: one check, start to finish, in domain terms. No protobuf here.

    route -> credential -> grant -> access -> rate -> billing -> record  (then audit)

Each stage is a plain function of decision.py (or a store look-up between them); the first stage that refuses
ends the check. Production and the unit tests run this same pipeline. Far from a cap, there is no await between
reading the organisation's usage and counting this call, so one replica cuts exactly; within the exact margin
of a cap, the call is counted by one atomic statement in the database before it is allowed, so any number of
replicas together cut exactly.
"""

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from authz_service import metrics
from authz_service.check.audit import AuditEntry, AuditLog, audit_path
from authz_service.check.controls import (
    QuotaState,
    check_products,
    key_rate_limit,
    quota_state,
)
from authz_service.check.credentials import read_credential
from authz_service.check.decision import (
    ALLOW,
    BILLABLE_METHODS,
    DENY_UNAVAILABLE,
    Decision,
    DenyCode,
    Grant,
    PlanLimits,
    Route,
    RouteError,
    billing_cap,
    check_access,
    check_billing,
    check_rate,
    check_test_allowance,
    deny,
    is_billed,
    is_test_metered,
    quota_exceeded,
    reservation_cap,
    route_from_context,
)
from authz_service.check.grants import GrantStore, StoreUnavailable
from authz_service.check.key_last_used import LastUsedRecorder
from authz_service.check.plan_book import PlanBook
from authz_service.check.rate_limit import RateLimiter, RateVerdict, SharedLimits
from authz_service.usage.metering import Meter, Reserved
from authz_service.usage.refunds import NO_TERMS, REFUNDS_PENDING_RETRY_AFTER, BilledUsage, Refund, Terms
from authz_service.usage.rollups import hour_of
from authz_service.usage.usage_ledger import UsageKey
from driftlock_kernel.billing import DEFAULT_POLICY, BillingPolicy, effective_plan
from driftlock_kernel.caches import LruCache
from driftlock_kernel.keys import Environment, ParsedKey
from driftlock_kernel.logs import bind_org
from driftlock_kernel.periods import Period, PeriodFinder
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)


# Not frozen: one is built for every check, and a frozen dataclass's __init__ costs about a microsecond more.
@dataclass(slots=True)
class AccessRequest:
    """The parts of Envoy's CheckRequest that a decision needs."""

    request_id: str
    method: str
    path: str
    headers: Mapping[str, str]
    context: Mapping[str, str]
    # time.monotonic() by which Envoy stops waiting for the answer (its ext_authz timeout), when known.
    deadline: float | None = None
    # Reads the client's address from what the wire received, so that it is read only when a check needs it (the
    # look-up of a key this replica does not know, an audit entry): reading it costs more than a cached valid
    # key should pay. None: unknown.
    read_source: Callable[[], str] | None = None

    @property
    def source(self) -> str:
        """The client's address as Envoy saw it (the peer, or the address x-forwarded-for names when Envoy trusts
        a proxy in front); '' when unknown."""
        if self.read_source is None:
            return ""
        return self.read_source()


MAX_REMEMBERED_ROUTES = 1_000
MAX_REMEMBERED_CREDENTIALS = 10_000

# A refusal that cannot change for a while (a rate limit until its bucket has a token again, a quota) is
# answered from memory for up to this long: a refused key sent as fast as a client can costs a dictionary look-up,
# not a check. Bounded by the 1 s in which a plan change or a refund must reach every replica.
REFUSAL_MEMORY_SECONDS = 1.0
MAX_REMEMBERED_REFUSALS = 10_000

# A billable call is not counted when less than this is left before Envoy's deadline: Envoy would answer the
# client 503 while the unit stayed counted. (The rest of a check takes microseconds.)
DEADLINE_MARGIN_SECONDS = 0.05


# Not frozen: one is built for every check, and a frozen dataclass's __init__ costs about a microsecond more.
@dataclass(slots=True)
class CheckOutcome:
    """What the pipeline decided, with what the wire needs to answer (headers, token) and the audit to record."""

    decision: Decision
    grant: Grant | None = None
    route: Route | None = None
    billed: bool = False
    plan: str | None = None  # the effective plan, as the backend is told
    rate: RateVerdict | None = None
    # What this call was counted as (handed to Envoy, whose access log brings it back for a refund).
    usage: BilledUsage | None = None
    # The organisation's period quota as the RateLimit headers tell it; None when this replica does not know
    # it without asking the database.
    quota: QuotaState | None = None


# Why a key's unit is taken back: the organisation's cap refused the call after the key's reservation counted it.
KEY_UNIT_NOT_SERVED = "not_served"

# Called once per organisation and period (per replica) when its spend cap first stops a call:
# (org_id, period_start, used units, cap).
SpendCapReached = Callable[[str, datetime, int, int], None]


class Authorizer:
    def __init__(
        self,
        store: GrantStore,
        plans: PlanBook,
        meter: Meter,
        *,
        test_meter: Meter,
        limiter: RateLimiter | None = None,
        shared_limits: SharedLimits | None = None,
        audit: AuditLog | None = None,
        policy: BillingPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        last_used: LastUsedRecorder | None = None,
        exact_margin_units: int = 1000,
        reserve_timeout: float = 0.5,
        key_meter: Meter | None = None,
        on_spend_cap_reached: SpendCapReached | None = None,
    ):
        self._last_used = last_used
        # Usage of keys with a max_units_per_period, per key and period (KEY_TABLES); a pipeline built without
        # one (tests, the bench) counts in memory only.
        self._key_meter = key_meter
        self._on_spend_cap_reached = on_spend_cap_reached
        self._spend_caps_reached: LruCache[tuple[str, datetime], bool] = LruCache(10_000)
        self._store = store
        self._plans = plans
        self._meter = meter
        self._test_meter = test_meter
        self._limiter = limiter or RateLimiter()
        self._shared_limits = shared_limits
        self._audit = audit
        self._policy = policy
        self._clock = clock
        self._exact_margin = exact_margin_units
        self._reserve_timeout = reserve_timeout
        self._periods = PeriodFinder()
        self._late = RepeatedLog(log)
        # What parsing gave for a route's context extensions and for a credential, reused: the route table has
        # few routes, and a client sends the same key again and again (parsing one, with its checksum and hash,
        # costs a sixth of a check). Both are bounded: the routes map is emptied when full (the route table
        # never fills it), the credentials forget the least recently used, so that more active keys than it
        # holds, or a flood of invented ones, never push out the keys in use all at once; what
        # the credentials map holds (the presented headers) is what every request holds in memory anyway.
        self._routes: dict[tuple[str | None, ...], Route | RouteError] = {}
        self._credentials: LruCache[tuple[str | None, str | None], ParsedKey | DenyCode] = LruCache(
            MAX_REMEMBERED_CREDENTIALS
        )
        # (key hash, route) -> a refusal and until when it holds (this clock).
        self._refusals: LruCache[tuple[bytes, Route], tuple[CheckOutcome, float]] = LruCache(MAX_REMEMBERED_REFUSALS)

    async def check(self, request: AccessRequest) -> CheckOutcome:
        outcome = await self._decide(request)
        if self._audit is not None and (not outcome.decision.allowed or self._audit.wants_allow()):
            self._audit.add(_audit_entry(request, outcome))
        if not outcome.decision.allowed and outcome.grant is not None:
            self._count_denial(outcome)
        return outcome

    def _count_denial(self, outcome: CheckOutcome) -> None:
        """A live key's refused check, in its organisation's usage history (test keys' are not in it)."""
        grant, code = outcome.grant, outcome.decision.code
        if grant is None or code is None or grant.environment is Environment.TEST:
            return
        now = self._clock()
        period = self._periods.period(grant.period_start, grant.period_end, now)
        product = (outcome.route.product or "") if outcome.route is not None else ""
        self._meter.denied((grant.org_id, period.start), now, product, grant.key_id, code.value)

    async def _decide(self, request: AccessRequest) -> CheckOutcome:
        # route
        try:
            route = self._route(request.context)
        except RouteError as error:
            # A route table mistake must not open the backend: fail closed, loudly.
            metrics.ROUTE_ERRORS.inc()
            log.error("refusing %s %s: %s", request.method, audit_path(request.path), error)
            return CheckOutcome(DENY_UNAVAILABLE)
        if route.billable and request.method not in BILLABLE_METHODS:
            # The route table answers other methods on billable routes itself (405); one that reaches here is a
            # route table mistake, and must not become a free call (HEAD runs a GET handler in many backends).
            metrics.ROUTE_ERRORS.inc()
            log.error(
                "refusing %s %s: a billable route takes only %s",
                request.method,
                audit_path(request.path),
                ", ".join(sorted(BILLABLE_METHODS)),
            )
            return CheckOutcome(DENY_UNAVAILABLE, route=route)
        # credential
        credential = self._credential(request.headers)
        if isinstance(credential, DenyCode):
            return CheckOutcome(deny(credential), route=route)
        remembered = self._refusals.get((credential.hash, route))
        if remembered is not None and self._clock() < remembered[1]:
            metrics.REFUSALS_FROM_MEMORY.inc()
            return remembered[0]
        outcome = await self._decide_for_key(request, route, credential)
        hold = _refusal_holds_for(outcome)
        if hold > 0.0:
            self._refusals.put((credential.hash, route), (outcome, self._clock() + hold))
        return outcome

    async def _decide_for_key(self, request: AccessRequest, route: Route, credential: ParsedKey) -> CheckOutcome:
        # grant
        try:
            grant = await self._store.get(credential.hash, request)
        except StoreUnavailable:
            return CheckOutcome(DENY_UNAVAILABLE, route=route)
        if grant is None:
            return CheckOutcome(deny(DenyCode.INVALID_API_KEY), route=route)
        bind_org(grant.org_id)
        # access
        now = self._clock()
        if self._last_used is not None:
            self._last_used.touch(grant.key_id, now)
        plan_name = effective_plan(grant.plan, grant.billing_status, self._policy)
        access = check_access(route, grant, now)
        if not access.allowed:
            return CheckOutcome(access, grant, route, plan=plan_name)
        # source: the key's allowed networks (controls.check_source, inlined: it runs on every check of such a key)
        networks = grant.allowed_networks
        if networks is not None and not networks.allows(request.source):
            return CheckOutcome(deny(DenyCode.IP_NOT_ALLOWED), grant, route, plan=plan_name)
        plan = self._plans.get(plan_name) or await self._plans.require(plan_name)
        if plan is None:
            log.error("organisation %s is on plan %r, which does not exist", grant.org_id, plan_name)
            return CheckOutcome(DENY_UNAVAILABLE, grant, route, plan=plan_name)
        # products: the plan's and the key's
        if plan.products is not None or grant.products is not None:
            entitled = check_products(route, grant, plan)
            if not entitled.allowed:
                return CheckOutcome(entitled, grant, route, plan=plan_name)
        # rate: a live key's own (or its plan's), or the organisation's for all its test keys together (through
        # Redis when the replicas share their limits); a test key with a rate of its own also has its own bucket
        rate_limit: float | None
        if grant.environment is Environment.TEST:
            if grant.rate_limit_rps is not None:
                own = await self._take(grant.key_id, grant.rate_limit_rps)
                if not own.allowed:
                    return CheckOutcome(check_rate(own), grant, route, plan=plan_name, rate=own)
            rate_key, rate_limit = f"test:{grant.org_id}", plan.test_rate_limit_rps
        else:
            rate_key = grant.key_id
            rate_limit = plan.rate_limit_rps if grant.rate_limit_rps is None else key_rate_limit(grant, plan)
        rate: RateVerdict | None = None
        if rate_limit:
            rate = await self._take(rate_key, rate_limit)
        limited = check_rate(rate)
        if not limited.allowed:
            return CheckOutcome(limited, grant, route, plan=plan_name, rate=rate)
        if is_test_metered(route, grant):
            # billing and record, for a test key: its organisation's test allowance, counted apart, never billed
            return await self._count_test(request, route, grant, plan, now, rate)
        if not is_billed(route, grant):
            return CheckOutcome(
                ALLOW, grant, route, plan=plan_name, rate=rate, quota=self._known_quota(grant, plan, now)
            )
        # billing and record
        return await self._bill(request, route, grant, plan, now, rate)

    async def _take(self, rate_key: str, rate_limit: float) -> RateVerdict:
        if self._shared_limits is not None:
            return await self._shared_limits.take(rate_key, rate_limit)
        return self._limiter.take(rate_key, rate_limit)

    def _known_quota(self, grant: Grant, plan: PlanLimits, now: float) -> QuotaState | None:
        """The period quota for the headers of a call that is not metered, from what this replica knows (no
        statement: None when it has not read the organisation's usage yet)."""
        test = grant.environment is Environment.TEST
        meter = self._test_meter if test else self._meter
        period = self._periods.period(grant.period_start, grant.period_end, now)
        used = meter.ledger.used((grant.org_id, period.start))
        if used is None:
            return None
        included = plan.test_included_units if test else plan.included_units
        return quota_state(included, used, period.start.timestamp(), period.end.timestamp(), now)

    def _route(self, context: Mapping[str, str]) -> Route:
        get = context.get
        seen = (get("scope"), get("billable"), get("product"), get("units"))
        route = self._routes.get(seen)
        if route is None:
            try:
                route = route_from_context(context)
            except RouteError as error:
                route = error
            if len(self._routes) >= MAX_REMEMBERED_ROUTES:
                self._routes.clear()
            self._routes[seen] = route
        if isinstance(route, RouteError):
            raise route
        return route

    def _credential(self, headers: Mapping[str, str]) -> ParsedKey | DenyCode:
        presented = (headers.get("authorization"), headers.get("x-api-key"))
        credential = self._credentials.get(presented)
        if credential is None:
            credential = read_credential(headers)
            self._credentials.put(presented, credential)
        return credential

    async def _count_test(
        self, request: AccessRequest, route: Route, grant: Grant, plan: PlanLimits, now: float, rate: RateVerdict | None
    ) -> CheckOutcome:
        meter = self._test_meter
        if meter.counted_already(request.request_id):
            return CheckOutcome(ALLOW, grant, route, plan=plan.name, rate=rate)
        period = self._periods.period(grant.period_start, grant.period_end, now)
        await self._read_key_usage(grant, period)
        usage_key = (grant.org_id, period.start)
        used = await meter.used(usage_key)
        decision = check_test_allowance(route, plan, now, used_units=used, period_end=period.end.timestamp())
        if not decision.allowed:
            quota = quota_state(plan.test_included_units, used, period.start.timestamp(), period.end.timestamp(), now)
            return CheckOutcome(decision, grant, route, plan=plan.name, rate=rate, quota=quota)
        return await self._count(
            request,
            route,
            grant,
            meter=meter,
            limits=plan.test_limits,
            period=period,
            used=used,
            now=now,
            rate=rate,
            plan_name=plan.name,
            usage=None,
        )

    async def _bill(
        self, request: AccessRequest, route: Route, grant: Grant, plan: PlanLimits, now: float, rate: RateVerdict | None
    ) -> CheckOutcome:
        period = self._periods.period(grant.period_start, grant.period_end, now)
        # The terms this unit is used under, recorded with it: it is reported to this meter and customer; the key
        # and hour are its usage-history bucket (where a refund of it lands).
        terms = Terms(plan.name, plan.stripe_meter or "", grant.stripe_customer or "")
        usage = BilledUsage(
            grant.org_id, period.start, route.product or "", route.units, terms, key_id=grant.key_id, hour=hour_of(now)
        )
        if self._meter.counted_already(request.request_id):
            # The same request checked again (an Envoy retry): it was decided and counted the first time.
            metrics.METER_DUPLICATE_REQUESTS.inc()
            return CheckOutcome(ALLOW, grant, route, billed=True, plan=plan.name, rate=rate, usage=usage)
        # The key's own usage first: reading it may wait for the database, which must not come between reading
        # the organisation's usage and counting the call.
        if grant.max_units is not None:
            await self._read_key_usage(grant, period)
        usage_key = (grant.org_id, period.start)
        used = await self._meter.used(usage_key)
        # No await from here on in the in-memory path: the usage read above and the count below are one step.
        if request.deadline is not None and time.monotonic() > request.deadline - DEADLINE_MARGIN_SECONDS:
            self._late.warning("deadline", "answering auth_unavailable: Envoy's deadline passed while usage was read")
            return CheckOutcome(DENY_UNAVAILABLE, grant, route, plan=plan.name, rate=rate)
        decision = check_billing(
            route, grant, now, plan, used_units=used, period_end=period.end.timestamp(), policy=self._policy
        )
        if not decision.allowed:
            quota = quota_state(plan.included_units, used, period.start.timestamp(), period.end.timestamp(), now)
            if decision.code is DenyCode.SPEND_CAP_REACHED:
                self._spend_cap_reached(grant, plan, period, used)
            refused = self._at_cap(decision, usage_key)
            return CheckOutcome(refused, grant, route, plan=plan.name, rate=rate, quota=quota)
        return await self._count(
            request,
            route,
            grant,
            meter=self._meter,
            limits=plan,
            period=period,
            used=used,
            now=now,
            rate=rate,
            plan_name=plan.name,
            usage=usage,
        )

    def _at_cap(self, decision: Decision, key: UsageKey) -> Decision:
        """A refusal at the cap that refunds of calls still under way may lift: asked again in seconds, not at
        the period's end (the unit is free again as soon as Envoy's access log brings the refund)."""
        if decision.code is DenyCode.QUOTA_EXCEEDED and self._meter.refunds_may_lift(key):
            return dataclasses.replace(decision, retry_after=REFUNDS_PENDING_RETRY_AFTER)
        return decision

    async def _read_key_usage(self, grant: Grant, period: Period) -> None:
        """For a key with a cap of its own (max_units_per_period): its usage this period, read from the database
        the first time this replica sees the key in the period. The cap is checked from memory in _count."""
        key_meter = self._key_meter
        if grant.max_units is not None and key_meter is not None:
            usage_key = (grant.key_id, period.start)
            if key_meter.ledger.used(usage_key) is None:
                await key_meter.used(usage_key)

    def _spend_cap_reached(self, grant: Grant, plan: PlanLimits, period: Period, used: int) -> None:
        """The first call this replica refuses for the organisation's spend cap in a period."""
        seen = (grant.org_id, period.start)
        if self._spend_caps_reached.get(seen):
            return
        self._spend_caps_reached.put(seen, True)
        cap = plan.included_units + (grant.max_overage_units or 0)
        log.info("organisation %s reached its spend cap (%d units)", grant.org_id, cap)
        if self._on_spend_cap_reached is not None:
            self._on_spend_cap_reached(grant.org_id, period.start, used, cap)

    async def _count(
        self,
        request: AccessRequest,
        route: Route,
        grant: Grant,
        *,
        meter: Meter,
        limits: PlanLimits,
        period: Period,
        used: int,
        now: float,
        rate: RateVerdict | None,
        plan_name: str,
        usage: BilledUsage | None,
    ) -> CheckOutcome:
        """Count an allowed call on `meter`: in memory far from the cap of `limits` (with `used` units of the
        period already counted) and of the key's own cap, else reserved in the database first. `usage` is what a
        billed call was counted as (for a refund); None for a test key's."""
        usage_key = (grant.org_id, period.start)
        product = route.product or ""
        billed = meter.live
        units = route.units
        terms = usage.terms if usage is not None else NO_TERMS
        # Test keys are never billed: the organisation's spend cap is not theirs.
        spend_cap = grant.max_overage_units if billed else None
        cap = reservation_cap(limits, used, units, self._exact_margin, spend_cap)
        max_units = grant.max_units
        key_meter = self._key_meter if max_units is not None else None
        key_usage_key = (grant.key_id, period.start)
        key_cap = None
        if key_meter is not None and max_units is not None:
            # Stage `key quota`, without an await since the org's usage was read (what this replica counted
            # meanwhile counts), and within the exact margin of the key's cap, reserved in the database below.
            key_used, stale = key_meter.ledger.used_and_staleness(key_usage_key)
            if stale:
                key_meter.refresh_soon(key_usage_key)
            left = max_units - key_used - units  # controls.key_units_left
            if left < 0:
                refused = quota_exceeded(now, period.end.timestamp(), DenyCode.KEY_QUOTA_EXCEEDED)
                return CheckOutcome(refused, grant, route, plan=plan_name, rate=rate)
            key_cap = None if left >= self._exact_margin else max_units
        quota = quota_state(limits.included_units, used + units, period.start.timestamp(), period.end.timestamp(), now)
        if cap is None and key_cap is None:
            meter.record(
                request.request_id, usage_key, product, units, limits, period.end, terms, key_id=grant.key_id, at=now
            )
            if key_meter is not None:
                key_meter.ledger.add(key_usage_key, product, units)  # Meter.count
            return CheckOutcome(ALLOW, grant, route, billed=billed, plan=plan_name, rate=rate, usage=usage, quota=quota)
        # Near a cap: what the other replicas counted since this one last read may be all that is left, so the
        # database decides, atomically, before the call is allowed. The key's cap first: its unit is taken back
        # should the organisation's cap then refuse the call.
        if key_meter is not None:
            if key_cap is None:
                key_meter.count(key_usage_key, product, units)
            else:
                timeout = self._timeout(request)
                if timeout <= 0:
                    return CheckOutcome(DENY_UNAVAILABLE, grant, route, plan=plan_name, rate=rate)
                key_reserved = await key_meter.reserve(
                    request.request_id, key_usage_key, product, units, limits, period.end, key_cap, timeout
                )
                if key_reserved is Reserved.REFUSED:
                    refused = quota_exceeded(now, period.end.timestamp(), DenyCode.KEY_QUOTA_EXCEEDED)
                    return CheckOutcome(refused, grant, route, plan=plan_name, rate=rate)
        if cap is None:
            meter.record(
                request.request_id, usage_key, product, units, limits, period.end, terms, key_id=grant.key_id, at=now
            )
            return CheckOutcome(ALLOW, grant, route, billed=billed, plan=plan_name, rate=rate, usage=usage, quota=quota)
        timeout = self._timeout(request)
        if timeout <= 0:
            self._give_back_key_unit(request, grant, period, product, units)
            return CheckOutcome(DENY_UNAVAILABLE, grant, route, plan=plan_name, rate=rate)
        reserved = await meter.reserve(
            request.request_id,
            usage_key,
            product,
            units,
            limits,
            period.end,
            cap,
            timeout,
            terms,
            key_id=grant.key_id,
            at=now,
        )
        if reserved is Reserved.REFUSED:
            self._give_back_key_unit(request, grant, period, product, units)
            _cap, code = billing_cap(limits, spend_cap)
            if code is DenyCode.SPEND_CAP_REACHED:
                self._spend_cap_reached(grant, limits, period, used)
            quota.remaining, quota.overage_units = 0, max(0, used - limits.included_units)
            refused = quota_exceeded(now, period.end.timestamp(), code)
            if meter.live:
                refused = self._at_cap(refused, usage_key)
            return CheckOutcome(refused, grant, route, plan=plan_name, rate=rate, quota=quota)
        return CheckOutcome(ALLOW, grant, route, billed=billed, plan=plan_name, rate=rate, usage=usage, quota=quota)

    def _timeout(self, request: AccessRequest) -> float:
        """How long a reservation may wait: the configured bound, within what is left of Envoy's deadline."""
        timeout = self._reserve_timeout
        if request.deadline is not None:
            timeout = min(timeout, request.deadline - DEADLINE_MARGIN_SECONDS - time.monotonic())
        return timeout

    def _give_back_key_unit(
        self, request: AccessRequest, grant: Grant, period: Period, product: str, units: int
    ) -> None:
        """The call counted against the key's cap is refused after all: the key's unit is taken back."""
        if grant.max_units is None or self._key_meter is None:
            return
        self._key_meter.refund(
            Refund(request.request_id, grant.key_id, period.start, product, units, KEY_UNIT_NOT_SERVED)
        )


def _refusal_holds_for(outcome: CheckOutcome) -> float:
    """Seconds the refusal of a known key cannot change (as far as this replica can tell); 0 for anything else."""
    code = outcome.decision.code
    if outcome.grant is None or code is None:
        return 0.0
    if code is DenyCode.RATE_LIMITED:
        refill = outcome.rate.refill_seconds if outcome.rate is not None else None
        return min(refill, REFUSAL_MEMORY_SECONDS) if refill is not None else 0.0
    if code is DenyCode.QUOTA_EXCEEDED and outcome.decision.retry_after is not None:
        if outcome.decision.retry_after <= REFUNDS_PENDING_RETRY_AFTER:
            return 0.0  # a refund of a call still under way may free a unit any moment: decided afresh each time
        return min(float(outcome.decision.retry_after), REFUSAL_MEMORY_SECONDS)
    return 0.0


def _audit_entry(request: AccessRequest, outcome: CheckOutcome) -> AuditEntry:
    code = outcome.decision.code
    grant = outcome.grant
    return AuditEntry(
        at=datetime.now(UTC),
        request_id=request.request_id,
        org_id=grant.org_id if grant else None,
        key_id=grant.key_id if grant else None,
        method=request.method[:16],
        path=audit_path(request.path),
        decision="allow" if code is None else "deny",
        code="ok" if code is None else code.value,
        source=request.source,
    )

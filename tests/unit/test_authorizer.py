"""The decision pipeline as production runs it (Authorizer.check), in process, with the database replaced by
in-memory sources (real classes, no mocks)."""

import dataclasses
import time

import pytest

from authz_service.check.assembly import CheckParts, assemble_authorizer
from authz_service.check.authorizer import AccessRequest, Authorizer
from authz_service.check.decision import DenyCode, Grant, PlanLimits
from authz_service.check.grants import GrantStore
from authz_service.check.plan_book import PlanBook
from authz_service.check.rate_limit import RateLimiter
from authz_service.usage.meter_store import MeterStore, Reservation
from authz_service.usage.metering import Meter
from authz_service.usage.refunds import REFUNDS_PENDING_RETRY_AFTER
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel.billing import BillingStatus, Overage
from driftlock_kernel.keys import Environment, Scope, generate_key
from tests.support.authz_requests import STREAM_DETECT

KEY = generate_key(Environment.LIVE)
GRANT = Grant(
    "key-1",
    "org-1",
    Environment.LIVE,
    frozenset({Scope.DETECT, Scope.READ}),
    None,
    False,
    False,
    "small",
    BillingStatus.ACTIVE,
)
INGEST = {"scope": "ingest", "billable": "false", "product": "stream"}


class StoredUsage(MeterStore):
    """Usage as a dict instead of a database (a reservation is as atomic as the statement it stands for)."""

    def __init__(self, totals=None):
        super().__init__(pool=None, replica="test")  # type: ignore[arg-type]
        self.totals = totals or {}
        self.reservations = 0

    async def load(self, key):
        return self.totals.get(key[0], 0)

    async def reserve(self, flush_id, key, product, units, unacknowledged, cap, terms=None, **bucket):
        self.reservations += 1
        total = self.totals.get(key[0], 0)
        if total + units + unacknowledged > cap:
            return Reservation(False, total)
        self.totals[key[0]] = total + units
        return Reservation(True, total + units)


def authorizer(plan: PlanLimits, grant: Grant = GRANT, *, database_down: bool = False) -> tuple[Authorizer, Meter]:
    async def fetch(key_hash):
        if database_down:
            raise TimeoutError("the database does not answer")
        return grant if key_hash == KEY.hash else None

    async def load_plans():
        return {plan.name: plan}

    store = GrantStore(fetch, ttl=30, negative_ttl=5, stale_for=300, max_entries=10, fetch_timeout=1)
    meter = Meter(UsageLedger(), StoredUsage())
    test_meter = Meter(UsageLedger(), StoredUsage(), live=False)
    return assemble_authorizer(CheckParts(store, PlanBook(load_plans), meter, test_meter)), meter


def request(
    request_id: str, deadline: float | None = None, *, key: str = KEY.secret, route: dict = STREAM_DETECT
) -> AccessRequest:
    return AccessRequest(
        request_id, "POST", "/api/v1/stream/detect", {"authorization": f"Bearer {key}"}, route, deadline
    )


SOFT = PlanLimits("small", included_units=100, overage=Overage.SOFT)


def stored(meter: Meter) -> StoredUsage:
    assert isinstance(meter._store, StoredUsage)
    return meter._store


def counted(meter: Meter) -> int:
    """Units counted so far: in memory (far from a cap) or reserved in the store (near one)."""
    return meter.ledger.pending_units + sum(stored(meter).totals.values())


async def code_of(auth: Authorizer, access: AccessRequest) -> DenyCode | None:
    return (await auth.check(access)).decision.code


async def test_each_stage_refuses_what_it_owns():
    auth, meter = authorizer(SOFT)
    assert await code_of(auth, request("r", route={"billable": "true"})) is DenyCode.AUTH_UNAVAILABLE  # route
    assert await code_of(auth, request("r", key="")) is DenyCode.MISSING_API_KEY  # credential
    broken = KEY.secret[:-1] + ("x" if KEY.secret[-1] != "x" else "y")  # the last checksum character changed
    assert await code_of(auth, request("r", key=broken)) is DenyCode.INVALID_API_KEY  # checksum
    other = generate_key(Environment.LIVE).secret
    assert await code_of(auth, request("r", key=other)) is DenyCode.INVALID_API_KEY  # grant: unknown key
    assert meter.ledger.pending_units == 0


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"revoked": True}, DenyCode.REVOKED_API_KEY),
        ({"expires_at": 1.0}, DenyCode.EXPIRED_API_KEY),
        ({"org_suspended": True}, DenyCode.ORG_SUSPENDED),
        ({"scopes": frozenset({Scope.READ})}, DenyCode.INSUFFICIENT_SCOPE),
        ({"billing_status": BillingStatus.PAST_DUE, "past_due_since": 1.0}, DenyCode.PAYMENT_REQUIRED),
    ],
)
async def test_the_access_and_billing_stages_refuse_and_count_nothing(change, code):
    auth, meter = authorizer(SOFT, dataclasses.replace(GRANT, **change))
    outcome = await auth.check(request("r"))
    assert outcome.decision.code is code and not outcome.billed
    assert meter.ledger.pending_units == 0


async def test_an_overdue_organisation_keeps_ingesting_and_a_test_key_is_never_counted():
    overdue = dataclasses.replace(
        GRANT, scopes=frozenset(Scope), billing_status=BillingStatus.PAST_DUE, past_due_since=1.0
    )
    auth, meter = authorizer(SOFT, overdue)
    assert await code_of(auth, request("ingest", route=INGEST)) is None
    test_key = dataclasses.replace(GRANT, environment=Environment.TEST)
    auth, meter = authorizer(SOFT, test_key)
    outcome = await auth.check(request("detect"))
    assert outcome.decision.allowed and not outcome.billed and meter.ledger.pending_units == 0


async def test_a_database_that_does_not_answer_for_an_unknown_key_is_auth_unavailable():
    auth, _meter = authorizer(SOFT, database_down=True)
    assert await code_of(auth, request("r")) is DenyCode.AUTH_UNAVAILABLE


async def test_a_block_plan_is_cut_exactly_and_only_served_calls_are_counted():
    auth, meter = authorizer(PlanLimits("small", included_units=3, overage=Overage.BLOCK))
    outcomes = [await auth.check(request(f"r{i}")) for i in range(5)]
    assert [o.decision.code for o in outcomes] == [None, None, None, DenyCode.QUOTA_EXCEEDED, DenyCode.QUOTA_EXCEEDED]
    assert counted(meter) == 3


async def test_a_call_whose_deadline_has_passed_is_refused_and_not_counted():
    auth, meter = authorizer(PlanLimits("small", included_units=100, overage=Overage.SOFT))
    late = await auth.check(request("late", deadline=time.monotonic()))
    assert late.decision.code is DenyCode.AUTH_UNAVAILABLE
    assert meter.ledger.pending_units == 0
    in_time = await auth.check(request("in-time", deadline=time.monotonic() + 1.0))
    assert in_time.decision.allowed and in_time.billed
    assert meter.ledger.pending_units == 1


async def test_a_retried_check_is_allowed_again_but_counted_once():
    auth, meter = authorizer(PlanLimits("small", included_units=1, overage=Overage.BLOCK))
    first = await auth.check(request("same"))
    again = await auth.check(request("same"))
    assert first.decision.allowed and again.decision.allowed
    assert counted(meter) == 1


async def test_the_rate_limit_of_the_plan_applies_per_key():
    auth, _meter = authorizer(PlanLimits("small", included_units=100, overage=Overage.SOFT, rate_limit_rps=2))
    codes = [(await auth.check(request(f"r{i}"))).decision.code for i in range(3)]
    assert codes == [None, None, DenyCode.RATE_LIMITED]


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "DELETE", "TRACE"])
async def test_a_billable_route_asked_with_another_method_is_refused_and_never_counted(method):
    """The route table answers these itself (405); one that reaches authz is a route-table mistake."""
    auth, meter = authorizer(SOFT)
    head = dataclasses.replace(request("r-1"), method=method)
    assert await code_of(auth, head) is DenyCode.AUTH_UNAVAILABLE
    assert meter.ledger.pending_units == 0
    assert await code_of(auth, dataclasses.replace(head, method="GET", request_id="r-2")) is None
    assert meter.ledger.pending_units == 1


async def test_the_client_address_is_read_from_the_check_request_only_when_asked():
    from authz_service.check.ext_authz import access_request
    from tests.support.authz_requests import check_request

    check = check_request({}, source="203.0.113.7")
    access = access_request(check)
    check.attributes.source.address.socket_address.address = "198.51.100.9"  # changed after the conversion
    assert access.source == "198.51.100.9"
    assert request("r").source == ""


async def test_far_from_the_cap_counts_in_memory_and_near_it_reserves_in_the_store():
    plan = PlanLimits("small", included_units=2000, overage=Overage.BLOCK)
    far, far_meter = authorizer(plan)
    assert (await far.check(request("far"))).billed
    assert far_meter.ledger.pending_units == 1 and stored(far_meter).reservations == 0
    near, near_meter = authorizer(plan)
    stored(near_meter).totals["org-1"] = 1500  # within the default margin (1000) of the cap
    assert (await near.check(request("near"))).billed
    assert near_meter.ledger.pending_units == 0 and stored(near_meter).reservations == 1
    assert stored(near_meter).totals["org-1"] == 1501


TEST_KEY = generate_key(Environment.TEST)
OTHER_TEST_KEY = generate_key(Environment.TEST)


def authorizer_for_test_keys(plan: PlanLimits, **changes) -> tuple[Authorizer, Meter, Meter]:
    grants = {
        TEST_KEY.hash: dataclasses.replace(
            GRANT, key_id="test-1", environment=Environment.TEST, scopes=frozenset(Scope), **changes
        ),
        OTHER_TEST_KEY.hash: dataclasses.replace(
            GRANT, key_id="test-2", environment=Environment.TEST, scopes=frozenset(Scope), **changes
        ),
    }

    async def fetch(key_hash):
        return grants.get(key_hash)

    async def load_plans():
        return {plan.name: plan}

    store = GrantStore(fetch, ttl=30, negative_ttl=5, stale_for=300, max_entries=10, fetch_timeout=1)
    meter, test_meter = Meter(UsageLedger(), StoredUsage()), Meter(UsageLedger(), StoredUsage(), live=False)
    return assemble_authorizer(CheckParts(store, PlanBook(load_plans), meter, test_meter)), meter, test_meter


async def test_test_keys_get_their_own_allowance_even_past_the_live_quota_and_in_dunning():
    exhausted = PlanLimits(
        "small", included_units=0, overage=Overage.BLOCK, test_included_units=3, test_rate_limit_rps=100
    )
    auth, meter, test_meter = authorizer_for_test_keys(
        exhausted, billing_status=BillingStatus.PAST_DUE, past_due_since=1.0
    )
    outcomes = [await auth.check(request(f"t{i}", key=TEST_KEY.secret)) for i in range(5)]
    assert [o.decision.code for o in outcomes] == [None, None, None, DenyCode.QUOTA_EXCEEDED, DenyCode.QUOTA_EXCEEDED]
    assert not any(o.billed for o in outcomes)
    assert (outcomes[3].decision.retry_after or 0) >= 1
    assert counted(test_meter) == 3 and counted(meter) == 0  # never in the live usage
    # Ingestion is not metered for test keys either.
    assert (await auth.check(request("ingest", key=TEST_KEY.secret, route=INGEST))).decision.code is None


async def test_the_test_rate_limit_is_per_organisation_across_its_test_keys():
    auth, _meter, _test_meter = authorizer_for_test_keys(PlanLimits("small", 100, Overage.SOFT, test_rate_limit_rps=2))
    codes = [
        (await auth.check(request(f"r{i}", key=key.secret, route=INGEST))).decision.code
        for i, key in enumerate([TEST_KEY, OTHER_TEST_KEY, TEST_KEY])
    ]
    assert codes == [None, None, DenyCode.RATE_LIMITED]


async def test_test_keys_of_a_suspended_organisation_are_refused():
    auth, _meter, test_meter = authorizer_for_test_keys(SOFT, org_suspended=True)
    assert await code_of(auth, request("s", key=TEST_KEY.secret)) is DenyCode.ORG_SUSPENDED
    assert counted(test_meter) == 0


def test_the_domain_request_holds_only_typed_values_of_our_own():
    import typing

    hints = typing.get_type_hints(AccessRequest)
    assert typing.Any not in hints.values(), hints
    assert "attributes" not in hints  # Envoy's protobuf stays at the wire edge (ext_authz.access_request)


async def test_a_refusal_at_a_cap_that_refunds_may_lift_is_retried_in_seconds_not_at_the_periods_end():
    block = PlanLimits("small", included_units=3, overage=Overage.BLOCK)
    now = time.time()
    auth, meter = authorizer(block, dataclasses.replace(GRANT, period_start=now - 86400, period_end=now + 29 * 86400))
    meter._refund_window = 60.0  # what edge_timeouts derives from Envoy's timeouts
    for n in range(3):
        assert (await auth.check(request(f"r{n}"))).decision.allowed
    # The three calls may still fail at the backend and be refunded: come back in seconds.
    refused = (await auth.check(request("r3"))).decision
    assert (refused.code, refused.retry_after) == (DenyCode.QUOTA_EXCEEDED, REFUNDS_PENDING_RETRY_AFTER)
    # Long after the last count no refund can come any more: the period's end, as before.
    meter._last_counted = {key: when - 61.0 for key, when in meter._last_counted.items()}
    refused = (await auth.check(request("r4"))).decision
    assert refused.code is DenyCode.QUOTA_EXCEEDED and refused.retry_after is not None
    assert refused.retry_after > 28 * 86400


class CountingLimiter(RateLimiter):
    def __init__(self, clock):
        super().__init__(clock=clock)
        self.takes = 0

    def take(self, key, rate):
        self.takes += 1
        return super().take(key, rate)


async def test_a_rate_limited_key_is_refused_from_memory_until_its_bucket_has_a_token():
    now = [1_000.0]
    clock = lambda: now[0]  # noqa: E731
    plan = PlanLimits("small", included_units=100, overage=Overage.SOFT, rate_limit_rps=2)
    auth, _meter = authorizer(plan)
    limiter = CountingLimiter(clock)
    auth._limiter, auth._clock = limiter, clock
    codes = [await code_of(auth, request(f"r{n}")) for n in range(3)]
    assert codes == [None, None, DenyCode.RATE_LIMITED] and limiter.takes == 3
    # 5,000 more before the bucket refills (half a second at 2 a second): answered without the pipeline.
    for n in range(5_000):
        assert await code_of(auth, request(f"flood-{n}")) is DenyCode.RATE_LIMITED
    assert limiter.takes == 3
    now[0] += 0.5
    assert await code_of(auth, request("after")) is None  # never held past the refill
    assert limiter.takes == 4


async def test_a_quota_refusal_is_remembered_for_at_most_a_second():
    now = [1_000.0]
    auth, meter = authorizer(PlanLimits("small", included_units=1, overage=Overage.BLOCK))
    auth._clock = lambda: now[0]
    assert await code_of(auth, request("first")) is None
    store = auth._store
    looked_up = []
    original = store.get

    async def counting_get(key_hash, requester=None):
        looked_up.append(key_hash)
        return await original(key_hash, requester)

    store.get = counting_get  # type: ignore[method-assign]
    assert await code_of(auth, request("second")) is DenyCode.QUOTA_EXCEEDED
    for n in range(100):
        assert await code_of(auth, request(f"again-{n}")) is DenyCode.QUOTA_EXCEEDED
    assert len(looked_up) == 1  # the rest from memory
    now[0] += 1.0
    assert await code_of(auth, request("a second later")) is DenyCode.QUOTA_EXCEEDED
    assert len(looked_up) == 2  # checked again: a plan change or a refund would have been seen
    assert counted(meter) == 1

"""The whole check in process, with the database replaced by in-memory sources (real classes, no mocks)."""

import time

from authz_service.authorizer import AccessRequest, Authorizer
from authz_service.decision import DenyCode, Grant, PlanLimits
from authz_service.grants import GrantStore
from authz_service.meter_store import MeterStore
from authz_service.metering import Meter
from authz_service.plan_book import PlanBook
from authz_service.usage_ledger import UsageLedger
from driftlock_kernel.keys import Environment, generate_key
from tests.support.authz_requests import STREAM_DETECT

KEY = generate_key(Environment.LIVE)
GRANT = Grant("key-1", "org-1", "live", frozenset({"detect", "read"}), None, False, False, "small", "active")


class StoredUsage(MeterStore):
    """Usage as a dict instead of a database."""

    def __init__(self, totals=None):
        super().__init__(pool=None, replica="test")
        self.totals = totals or {}

    async def load(self, key):
        return self.totals.get(key[0], 0)


def authorizer(plan: PlanLimits) -> tuple[Authorizer, Meter]:
    async def fetch(key_hash):
        return GRANT if key_hash == KEY.hash else None

    async def load_plans():
        return {plan.name: plan}

    store = GrantStore(fetch, ttl=30, negative_ttl=5, stale_for=300, max_entries=10, fetch_timeout=1)
    meter = Meter(UsageLedger(), StoredUsage())
    return Authorizer(store, PlanBook(load_plans), meter=meter), meter


def request(request_id: str, deadline: float | None = None) -> AccessRequest:
    return AccessRequest(
        request_id, "POST", "/api/v1/stream/detect", {"authorization": f"Bearer {KEY.secret}"}, STREAM_DETECT, deadline
    )


async def test_a_block_plan_is_cut_exactly_and_only_served_calls_are_counted():
    auth, meter = authorizer(PlanLimits("small", included_units=3, overage="block"))
    outcomes = [await auth.check(request(f"r{i}")) for i in range(5)]
    assert [o.decision.code for o in outcomes] == [None, None, None, DenyCode.QUOTA_EXCEEDED, DenyCode.QUOTA_EXCEEDED]
    assert meter.ledger.pending_units == 3


async def test_a_call_whose_deadline_has_passed_is_refused_and_not_counted():
    auth, meter = authorizer(PlanLimits("small", included_units=100, overage="soft"))
    late = await auth.check(request("late", deadline=time.monotonic()))
    assert late.decision.code is DenyCode.AUTH_UNAVAILABLE
    assert meter.ledger.pending_units == 0
    in_time = await auth.check(request("in-time", deadline=time.monotonic() + 1.0))
    assert in_time.decision.allowed and in_time.billed
    assert meter.ledger.pending_units == 1


async def test_a_retried_check_is_allowed_again_but_counted_once():
    auth, meter = authorizer(PlanLimits("small", included_units=1, overage="block"))
    first = await auth.check(request("same"))
    again = await auth.check(request("same"))
    assert first.decision.allowed and again.decision.allowed
    assert meter.ledger.pending_units == 1


async def test_the_rate_limit_of_the_plan_applies_per_key():
    auth, _meter = authorizer(PlanLimits("small", included_units=100, overage="soft", rate_limit_rps=2))
    codes = [(await auth.check(request(f"r{i}"))).decision.code for i in range(3)]
    assert codes == [None, None, DenyCode.RATE_LIMITED]

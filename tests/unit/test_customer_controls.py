"""Customer controls in the decision pipeline (issue 20), in process with in-memory usage stores: the spend cap,
a key's unit cap, rate limit, allowed networks and products, the plan's products, and the quota the headers
state. Each is decided from the grant and plan in memory."""

import dataclasses
import ipaddress

import pytest

from authz_service.check.assembly import CheckParts, assemble_authorizer
from authz_service.check.authorizer import AccessRequest, Authorizer
from authz_service.check.controls import key_rate_limit
from authz_service.check.decision import DenyCode, Grant, PlanLimits
from authz_service.check.ext_authz import access_request
from authz_service.check.grants import GrantStore
from authz_service.check.networks import AllowedNetworks
from authz_service.check.plan_book import PlanBook
from authz_service.usage.metering import Meter
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel.billing import BillingStatus, Overage
from driftlock_kernel.keys import Environment, Scope, generate_key
from driftlock_kernel.settings import Settings
from tests.support.authz_requests import MONITOR_DETECT, READ, STREAM_DETECT, STREAM_INGEST, check_request
from tests.unit.test_authorizer import StoredUsage

KEY = generate_key(Environment.LIVE)
GRANT = Grant("key-1", "org-1", Environment.LIVE, frozenset(Scope), None, False, False, "small", BillingStatus.ACTIVE)
SOFT = PlanLimits("small", included_units=10, overage=Overage.SOFT, rate_limit_rps=100.0)


def networks(*texts: str) -> AllowedNetworks:
    return AllowedNetworks(ipaddress.ip_network(text) for text in texts)


class CountedUsage(StoredUsage):
    """StoredUsage that counts the usage reads a database would answer."""

    def __init__(self):
        super().__init__()
        self.loads = 0

    async def load(self, key):
        self.loads += 1
        return await super().load(key)


def pipeline(plan: PlanLimits, grant: Grant, *, margin: int = 1000) -> tuple[Authorizer, Meter, Meter]:
    async def fetch(key_hash):
        return grant if key_hash == KEY.hash else None

    async def load_plans():
        return {plan.name: plan}

    store = GrantStore(fetch, ttl=30, negative_ttl=5, stale_for=300, max_entries=10, fetch_timeout=1)
    meter = Meter(UsageLedger(), CountedUsage())
    key_meter = Meter(UsageLedger(), StoredUsage(), live=False)
    test_meter = Meter(UsageLedger(), StoredUsage(), live=False)
    auth = assemble_authorizer(
        CheckParts(store, PlanBook(load_plans), meter, test_meter, key_meter=key_meter),
        Settings(quota_exact_margin_units=margin),
    )
    return auth, meter, key_meter


def request(request_id: str, route: dict = STREAM_DETECT, source: str = "127.0.0.1") -> AccessRequest:
    # As the wire edge converts Envoy's request: the source address read from it only when a check needs it.
    return access_request(
        check_request({"authorization": f"Bearer {KEY.secret}"}, route, request_id=request_id, source=source)
    )


def counted(meter: Meter) -> int:
    store = meter._store
    assert isinstance(store, StoredUsage)  # the fake `pipeline` gave every meter
    return meter.ledger.pending_units + sum(store.totals.values())


def fake_store(meter: Meter) -> CountedUsage:
    """The organisation's meter's store: the fake `pipeline` gave it, which counts its reads."""
    assert isinstance(meter._store, CountedUsage)
    return meter._store


@pytest.mark.parametrize("margin", [1000, 0], ids=["near-the-cap-reserved", "in-memory"])
async def test_a_spend_cap_stops_billable_calls_past_included_plus_the_cap_but_not_ingest_or_reads(margin):
    reached = []
    auth, meter, _ = pipeline(SOFT, dataclasses.replace(GRANT, max_overage_units=5), margin=margin)
    auth._on_spend_cap_reached = lambda *args: reached.append(args)
    codes = [(await auth.check(request(f"r{i}"))).decision.code for i in range(18)]
    assert codes == [None] * 15 + [DenyCode.SPEND_CAP_REACHED] * 3
    assert counted(meter) == 15
    denied = await auth.check(request("again"))
    assert denied.decision.retry_after and denied.decision.retry_after > 0
    assert (await auth.check(request("ingest", STREAM_INGEST))).decision.allowed
    assert (await auth.check(request("read", READ))).decision.allowed
    assert len(reached) == 1 and reached[0][0] == "org-1" and reached[0][3] == 15  # the event hook, once


async def test_without_a_spend_cap_a_soft_plan_serves_on_and_a_hard_cap_comes_first_when_lower():
    auth, _meter, _ = pipeline(SOFT, GRANT)
    assert all([(await auth.check(request(f"r{i}"))).decision.allowed for i in range(30)])
    hard = dataclasses.replace(SOFT, hard_cap_percent=120)  # 12 units, below included + 5
    auth, _meter, _ = pipeline(hard, dataclasses.replace(GRANT, max_overage_units=5))
    codes = [(await auth.check(request(f"r{i}"))).decision.code for i in range(14)]
    assert codes == [None] * 12 + [DenyCode.QUOTA_EXCEEDED] * 2


@pytest.mark.parametrize("margin", [1000, 0], ids=["near-the-cap-reserved", "in-memory"])
async def test_a_keys_unit_cap_refuses_past_it_and_counts_the_key_apart(margin):
    auth, meter, key_meter = pipeline(SOFT, dataclasses.replace(GRANT, max_units=4), margin=margin)
    codes = [(await auth.check(request(f"r{i}"))).decision.code for i in range(6)]
    assert codes == [None] * 4 + [DenyCode.KEY_QUOTA_EXCEEDED] * 2
    assert counted(meter) == 4 and counted(key_meter) == 4
    assert (await auth.check(request("ingest", STREAM_INGEST))).decision.allowed  # not metered


async def test_a_key_unit_taken_by_its_reservation_is_given_back_when_the_org_cap_refuses():
    block = PlanLimits("small", included_units=3, overage=Overage.BLOCK)
    auth, meter, key_meter = pipeline(block, dataclasses.replace(GRANT, max_units=10))
    codes = [(await auth.check(request(f"r{i}"))).decision.code for i in range(5)]
    assert codes == [None] * 3 + [DenyCode.QUOTA_EXCEEDED] * 2
    assert counted(meter) == 3
    # Reserved for r3 and r4, then taken back: the key's usage is what was served.
    assert key_meter.ledger.used(("key-1", next(iter(key_meter.ledger._known))[1])) == 3


async def test_a_key_used_from_outside_its_allowed_networks_is_refused_ipv4_and_ipv6():
    grant = dataclasses.replace(GRANT, allowed_networks=networks("203.0.113.0/24", "2001:db8:abcd::/48"))
    auth, meter, _ = pipeline(SOFT, grant)
    for source in ("203.0.113.7", "2001:db8:abcd:12::1", "::ffff:203.0.113.9"):
        assert (await auth.check(request(source, source=source))).decision.allowed, source
    for source in ("198.51.100.1", "2001:db8:abce::1", "127.0.0.1", "", "not-an-address"):
        outcome = await auth.check(request(f"x{source}", source=source))
        assert outcome.decision.code is DenyCode.IP_NOT_ALLOWED, source
    assert counted(meter) == 3


async def test_products_of_the_key_and_of_the_plan_limit_detect_calls_only():
    auth, _, _ = pipeline(SOFT, dataclasses.replace(GRANT, products=frozenset({"stream"})))
    assert (await auth.check(request("s", STREAM_DETECT))).decision.allowed
    assert (await auth.check(request("m", MONITOR_DETECT))).decision.code is DenyCode.PRODUCT_NOT_ALLOWED
    monitor_ingest = {"scope": "ingest", "billable": "false", "product": "monitor"}
    assert (await auth.check(request("i", monitor_ingest))).decision.allowed
    stream_only = dataclasses.replace(SOFT, products=("stream",))
    auth, _, _ = pipeline(stream_only, GRANT)
    assert (await auth.check(request("m2", MONITOR_DETECT))).decision.code is DenyCode.PRODUCT_NOT_ALLOWED
    assert (await auth.check(request("s2", STREAM_DETECT))).decision.allowed


async def test_a_keys_own_rate_limit_replaces_the_plans_within_it_unless_an_operator_set_it():
    assert key_rate_limit(GRANT, SOFT) == 100.0
    assert key_rate_limit(dataclasses.replace(GRANT, rate_limit_rps=2.0), SOFT) == 2.0
    # Set below an earlier plan's rate, it never exceeds the current plan's...
    assert key_rate_limit(dataclasses.replace(GRANT, rate_limit_rps=500.0), SOFT) == 100.0
    # ...unless an operator set it above the plan's.
    assert key_rate_limit(dataclasses.replace(GRANT, rate_limit_rps=500.0, rate_limit_above_plan=True), SOFT) == 500
    auth, _, _ = pipeline(SOFT, dataclasses.replace(GRANT, rate_limit_rps=2.0))
    codes = [(await auth.check(request(f"r{i}", READ))).decision.code for i in range(4)]
    assert codes[:2] == [None, None] and DenyCode.RATE_LIMITED in codes[2:]


async def test_the_quota_the_headers_state_follows_the_period_usage_from_memory():
    auth, meter, _ = pipeline(SOFT, GRANT)
    read = await auth.check(request("read-first", READ))
    assert read.quota is None  # never read this organisation's usage: nothing to state without a statement
    assert fake_store(meter).loads == 0
    for i in range(12):
        outcome = await auth.check(request(f"r{i}"))
    assert outcome.quota is not None
    assert (outcome.quota.included, outcome.quota.remaining, outcome.quota.overage_units) == (10, 0, 2)
    assert outcome.quota.reset_seconds > 0 and outcome.quota.window_seconds >= 28 * 86400
    read = await auth.check(request("read", READ))
    assert read.quota is not None and read.quota.overage_units == 2
    # The headers cost no statement: reads load nothing, however many.
    statements = fake_store(meter).loads + fake_store(meter).reservations
    for i in range(20):
        assert (await auth.check(request(f"read-{i}", READ))).quota is not None
    assert fake_store(meter).loads + fake_store(meter).reservations == statements

"""Properties of the decision pipeline (hypothesis), as production runs it (Authorizer.check over the stages of
decision.py), on arbitrary routes, grants, plans, usage and times:

- it never raises;
- it never allows a request without a valid key that the store knows, unrevoked, unexpired at the time of the
  check, of an organisation that is not suspended, with the route's scope; and never bills a test key;
- any one-character change of a valid key (substitution, insertion, deletion) is refused.
"""

import asyncio
import dataclasses
import string

from hypothesis import event, given, settings
from hypothesis import strategies as st

from authz_service.check.assembly import CheckParts, assemble_authorizer
from authz_service.check.authorizer import AccessRequest, Authorizer
from authz_service.check.decision import Grant, PlanLimits, RouteError, check_access, route_from_context
from authz_service.check.grants import GrantStore
from authz_service.check.plan_book import PlanBook
from authz_service.usage.metering import Meter
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel.billing import BILLING_STATUSES, BillingStatus, Overage
from driftlock_kernel.keys import Environment, Scope, generate_key, parse_key
from driftlock_kernel.settings import Settings
from tests.unit.test_authorizer import StoredUsage

LIVE = generate_key(Environment.LIVE)
TEST = generate_key(Environment.TEST)
NOW = 1_800_000_000.0

texts = st.text(alphabet=string.printable, max_size=12)
well_formed_routes = st.fixed_dictionaries(
    {
        "scope": st.sampled_from(["detect", "ingest", "read"]),
        "billable": st.sampled_from(["true", "false"]),
        "product": st.sampled_from(["stream", "monitor"]),
        "units": st.sampled_from(["1", "3"]),
    }
)
malformed_routes = st.one_of(
    st.dictionaries(st.sampled_from(["scope", "billable", "product", "units"]), texts, max_size=4),
    st.fixed_dictionaries(
        {
            "scope": st.sampled_from(["detect", "ingest", "read", "admin", ""]),
            "billable": st.sampled_from(["true", "false", "yes"]),
            "product": st.sampled_from(["stream", "monitor", ""]),
            "units": st.sampled_from(["1", "3", "0", "x", "1000001"]),
        }
    ),
)
# Mostly routes the route table could hold (so that allows are common enough to test), else anything.
route_contexts = st.integers(0, 3).flatmap(lambda i: malformed_routes if i == 0 else well_formed_routes)
plans = st.builds(
    PlanLimits,
    name=st.just("plan"),
    included_units=st.integers(0, 50),
    overage=st.sampled_from(list(Overage)),
    hard_cap_percent=st.one_of(st.none(), st.integers(1, 300)),
    rate_limit_rps=st.one_of(st.none(), st.floats(0.5, 100)),
    test_included_units=st.integers(0, 50),
    test_rate_limit_rps=st.floats(0.5, 100),
)


@st.composite
def grants(draw, environment: Environment) -> Grant:
    return Grant(
        key_id="key",
        org_id="org",
        environment=environment,
        scopes=frozenset(draw(st.sets(st.sampled_from(list(Scope)), min_size=draw(st.integers(0, 3))))),
        expires_at=draw(st.one_of(st.none(), st.floats(NOW - 100, NOW + 100))),
        revoked=draw(st.sampled_from([False, False, True])),
        org_suspended=draw(st.sampled_from([False, False, True])),
        plan="plan",
        billing_status=draw(st.sampled_from(sorted(BILLING_STATUSES))),
        past_due_since=draw(st.one_of(st.none(), st.floats(NOW - 30 * 86400, NOW))),
        period_start=draw(st.one_of(st.none(), st.floats(NOW - 40 * 86400, NOW))),
        period_end=draw(st.one_of(st.none(), st.floats(NOW - 86400, NOW + 40 * 86400))),
    )


def pipeline(grant: Grant, plan: PlanLimits, used: int, *, database_down: bool = False) -> Authorizer:
    async def fetch(key_hash):
        if database_down:
            raise TimeoutError("the database does not answer")
        return (
            dataclasses.replace(grant, environment=Environment.LIVE)
            if key_hash == LIVE.hash
            else (dataclasses.replace(grant, environment=Environment.TEST) if key_hash == TEST.hash else None)
        )

    async def load_plans():
        return {plan.name: plan, "free": plan}

    store = GrantStore(fetch, ttl=30, negative_ttl=5, stale_for=300, max_entries=10, fetch_timeout=1)
    usage = StoredUsage({"org": used})
    meter = Meter(UsageLedger(), usage)
    test_meter = Meter(UsageLedger(), StoredUsage({"org": used}), live=False)
    return assemble_authorizer(
        CheckParts(store, PlanBook(load_plans), meter, test_meter),
        Settings(quota_exact_margin_units=10),
        clock=lambda: NOW,
    )


def run(coroutine):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


# Mostly one valid key in one header (so that allows are common enough to test), else anything.
one_valid_key = st.sampled_from(
    [{"authorization": f"Bearer {k.secret}"} for k in (LIVE, TEST)] + [{"x-api-key": k.secret} for k in (LIVE, TEST)]
)
any_credentials = st.fixed_dictionaries(
    {},
    optional={
        "authorization": st.one_of(
            st.sampled_from([f"Bearer {LIVE.secret}", f"Bearer {TEST.secret}", "Bearer ", "Basic x", ""]),
            texts.map(lambda t: f"Bearer {t}"),
            texts,
        ),
        "x-api-key": st.one_of(st.sampled_from([LIVE.secret, TEST.secret, f" {LIVE.secret} "]), texts),
    },
)
credentials = st.integers(0, 3).flatmap(lambda i: one_valid_key if i else any_credentials)


@settings(max_examples=600, deadline=None)
@given(
    context=route_contexts,
    headers=credentials,
    environment=st.sampled_from(list(Environment)),
    data=st.data(),
    plan=plans,
    used=st.integers(0, 60),
    database_down=st.sampled_from([False, False, False, True]),
)
def test_the_pipeline_never_raises_and_never_allows_without_a_valid_key_of_an_active_organisation(
    context, headers, environment, data, plan, used, database_down
):
    grant = data.draw(grants(environment))
    auth = pipeline(grant, plan, used, database_down=database_down)
    request = AccessRequest("req-1", "POST", "/api/v1/x", headers, context)
    outcome = run(auth.check(request))  # never raises
    event("allowed" if outcome.decision.allowed else f"denied: {outcome.decision.code}")
    if not outcome.decision.allowed:
        assert not outcome.billed
        return
    scheme, _, bearer = headers.get("authorization", "").strip().partition(" ")
    presented = {bearer.strip() if scheme.lower() == "bearer" else "", headers.get("x-api-key", "").strip()} - {""}
    assert len(presented) == 1, "allowed with no key, or with two different ones"
    parsed = parse_key(presented.pop())
    assert parsed is not None and parsed.hash in (LIVE.hash, TEST.hash)
    assert not database_down  # an unverified key is never allowed
    assert not grant.revoked and not grant.org_suspended
    assert grant.expires_at is None or NOW < grant.expires_at
    route = route_from_context(context)  # an allowed request had a well-formed route
    assert route.scope in grant.scopes
    assert check_access(route, dataclasses.replace(grant, environment=parsed.environment), NOW).allowed
    assert not (outcome.billed and parsed.environment is Environment.TEST)


@settings(max_examples=300, deadline=None)
@given(context=route_contexts)
def test_route_parsing_either_gives_a_route_or_a_route_error(context):
    try:
        route = route_from_context(context)
    except RouteError:
        return
    assert 1 <= route.units <= 1_000_000
    assert not route.billable or route.product


ALPHABET = string.ascii_letters + string.digits + "_-. "


@settings(max_examples=500, deadline=None)
@given(
    key=st.sampled_from([LIVE, TEST]),
    position=st.integers(0, 10_000),
    change=st.sampled_from(["substitute", "insert", "delete"]),
    char=st.sampled_from(ALPHABET),
)
def test_any_one_character_change_of_a_valid_key_is_refused(key, position, change, char):
    secret = key.secret
    i = position % len(secret)
    if change == "substitute":
        if secret[i] == char:
            return
        changed = secret[:i] + char + secret[i + 1 :]
    elif change == "insert":
        changed = secret[:i] + char + secret[i:]
    else:
        changed = secret[:i] + secret[i + 1 :]
    if changed.strip() == secret:
        return  # whitespace around a header's value is not part of it (RFC 9110's OWS): the key is unchanged
    assert parse_key(changed) is None
    grant = Grant("key", "org", key.environment, frozenset(Scope), None, False, False, "plan", BillingStatus.ACTIVE)
    auth = pipeline(grant, PlanLimits("plan", 100, Overage.SOFT), 0)
    context = {"scope": "read", "billable": "false"}
    outcome = run(auth.check(AccessRequest("r", "GET", "/", {"authorization": f"Bearer {changed}"}, context)))
    assert not outcome.decision.allowed

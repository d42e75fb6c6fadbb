"""A key's rate limit holds across two authz replicas when they share it through Redis: a key limited to R
requests per second gets about R through Envoy, not 2R.

Envoy balances the checks round robin over both replicas; each replica alone would let a bucket's worth (R)
through at once and then R per second, so per-replica limits give about 2 * (R + R*t) in t seconds, shared ones
R + R*t. The load is many times R, so the limit, not the client, sets the count.
"""

import asyncio
import collections
import time

import aiohttp
import pytest

from driftlock_cli.stack import start_stack
from driftlock_kernel import plans
from driftlock_kernel.billing import Overage
from tests.support.net import free_stack_ports
from tests.support.redis_server import require_redis
from tests.support.scrape import sample_sum

RATE = 20.0  # requests per second for the key
SECONDS = 4.0
CONCURRENCY = 16
# |served - expected| / expected must stay below this; per-replica limits give about +100 %.
TOLERANCE = 0.25


@pytest.fixture(scope="module")
async def redis_stack(database_url, jwt_secret, tmp_path_factory):
    redis_url = require_redis()
    state = tmp_path_factory.mktemp("redis-stack")
    stack = await start_stack(
        database_url=database_url,
        jwt_secret=jwt_secret,
        state_dir=state,
        ports=free_stack_ports(replicas=2),
        log_dir=state / "logs",
        # Generous, so that a loaded machine does not turn a slow Redis answer into a (counted) fallback.
        extra_env={"DRIFTLOCK_REDIS_URL": redis_url, "DRIFTLOCK_REDIS_TIMEOUT_SECONDS": "0.5"},
    )
    yield stack
    await stack.stop()


async def drive(url: str, secret: str, seconds: float) -> tuple[collections.Counter[int], float]:
    statuses: collections.Counter[int] = collections.Counter()
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as session:

        async def worker() -> None:
            while time.monotonic() < deadline:
                async with session.get(url, headers={"Authorization": f"Bearer {secret}"}) as response:
                    await response.read()
                    statuses[response.status] += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses, time.monotonic() - started


async def test_two_replicas_sharing_redis_hold_a_keys_rate_limit(redis_stack, pool, make_org, make_key):
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, "tests-rate-20", included_units=10**9, overage=Overage.SOFT, rate_limit_rps=RATE)
    org = await make_org(plan="tests-rate-20")
    _key, secret = await make_key(org.id)
    metrics = [redis_stack.authz_metrics_url(replica) for replica in range(2)]
    fallbacks_before = sum([await sample_sum(url, "driftlock_rate_limit_fallbacks_total") for url in metrics])
    checks_before = [await sample_sum(url, "driftlock_authz_checks_total") for url in metrics]

    statuses, elapsed = await drive(f"{redis_stack.envoy_url}/api/v1/things", secret, SECONDS)

    served = statuses[200]
    expected = RATE + RATE * elapsed  # a full bucket, then the rate
    error = (served - expected) / expected
    print(f"served {served} in {elapsed:.2f}s at {RATE:g}/s: expected {expected:.0f}, error {error:+.1%}; {statuses}")
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] > served, "the load must be well above the limit for the count to mean anything"
    checks = [
        await sample_sum(url, "driftlock_authz_checks_total") - before
        for url, before in zip(metrics, checks_before, strict=True)
    ]
    assert min(checks) > sum(checks) / 4, f"both replicas must have answered checks: {checks}"
    fallbacks = sum([await sample_sum(url, "driftlock_rate_limit_fallbacks_total") for url in metrics])
    assert fallbacks == fallbacks_before, "every decision must have come from Redis"
    assert abs(error) < TOLERANCE, (
        f"served {served}, expected about {expected:.0f} (per-replica limits: ~{2 * expected:.0f})"
    )


async def test_a_replica_with_redis_exports_the_families_listed_for_it(redis_stack):
    from tests.support.observability import metric_list
    from tests.support.scrape import family_names, scrape_text

    families = family_names(await scrape_text(redis_stack.authz_metrics_url(0)))
    assert set(metric_list()["exported"]["authz_with_redis"]) <= families

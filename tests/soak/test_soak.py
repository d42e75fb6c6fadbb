"""`make soak`: a bounded steady run through real Envoy, two authz replicas, the webhook service and PostgreSQL,
with the changes of an ordinary day made along the way, and what it cost at the end.

For SOAK_SECONDS (default 180) a fixed number of clients send paced requests (billable detect calls of a live
key, ingest calls, and detect calls of a second key). Along the way: at 20 % the second key is revoked, at 35 %
the organisation's plan is changed, at 50 % a signed Stripe event is delivered through Envoy and applied, at
65 % one authz replica is restarted (SIGTERM, exit 0, start again). Then:

- no answer but 200, except the revoked key's 401 (from its revocation on) and, while the replica restarts, the
  restart's documented 503 `auth_unavailable` (a check that was on its way to the stopping replica);
- the stored usage equals the billable calls served, exactly;
- the RSS of each process is sampled every few seconds; the slope over the second half (after warm-up) is
  printed per process, in MiB per hour.
"""

import asyncio
import collections
import os
import signal
import time
import uuid

import aiohttp
import pytest

from driftlock_cli import stripe_player
from driftlock_cli.stack import start_stack
from driftlock_kernel import api_keys, plans
from driftlock_kernel.billing import Overage
from tests.support.net import free_stack_ports
from tests.support.stripe import SECRET
from tests.support.usage import stored_usage, wait_for_usage

SECONDS = float(os.environ.get("SOAK_SECONDS", "180"))
CLIENTS = 8
PACE = 0.02  # seconds between a client's requests: ~400 requests/s in all on an idle machine
DETECT, INGEST = "/api/v1/stream/detect", "/api/v1/stream/ingest"


def rss_kib(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def slope_mib_per_hour(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, over the second half of the samples."""
    half = samples[len(samples) // 2 :]
    if len(half) < 3:
        return float("nan")
    n = len(half)
    mean_t = sum(t for t, _ in half) / n
    mean_r = sum(r for _, r in half) / n
    covariance = sum((t - mean_t) * (r - mean_r) for t, r in half)
    variance = sum((t - mean_t) ** 2 for t, _ in half)
    return covariance / variance * 3600 / 1024 if variance else 0.0


@pytest.fixture
async def soak_stack(database_url, jwt_secret, tmp_path):
    stack = await start_stack(
        database_url=database_url,
        jwt_secret=jwt_secret,
        state_dir=tmp_path,
        ports=free_stack_ports(replicas=2),
        log_dir=tmp_path / "logs",
        webhook_secret=SECRET,
        extra_env={"DRIFTLOCK_AUDIT_ALLOW_SAMPLE_RATE": "0", "DRIFTLOCK_LOG_LEVEL": "WARNING"},
    )
    yield stack
    codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), codes


async def test_soak(soak_stack, pool, make_org):
    stack = soak_stack
    plan = f"soak-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, plan, included_units=10**9, overage=Overage.SOFT)
    org = await make_org(plan=plan)
    async with pool.acquire() as conn:
        _live, live = await api_keys.create_key(conn, org.id)
        doomed_key, doomed = await api_keys.create_key(conn, org.id)

    started = time.monotonic()
    deadline = started + SECONDS
    served: collections.Counter[tuple[str, str]] = collections.Counter()
    unexpected: collections.Counter[str] = collections.Counter()
    restart_window = [float("inf"), float("-inf")]
    revoked_at = [float("inf"), float("inf")]  # when the revocation was sent, and when it was committed
    restart_503 = 0
    rss: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal restart_503
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            secret, path = (doomed, DETECT) if turn % 10 == 0 else (live, INGEST if turn % 4 == 0 else DETECT)
            sent = time.monotonic()
            try:
                async with session.post(
                    stack.envoy_url + path, data=b"{}", headers={"Authorization": f"Bearer {secret}"}
                ) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError as error:
                status, _ = -1, error
            # A request sent just before the revocation may be decided after it: what counts is when it was answered.
            answered = time.monotonic()
            if status == 200:
                served[(secret, path)] += 1
                if secret == doomed and sent > revoked_at[1] + 1.0:
                    unexpected[f"revoked key served at {sent - started:.0f}s"] += 1  # must stop within 1 s
            elif status == 401 and secret == doomed and answered >= revoked_at[0]:
                pass  # revoked: expected from the revocation on
            elif status == 503 and restart_window[0] <= sent <= restart_window[1] + 1:
                restart_503 += 1
            else:
                unexpected[f"{status} {path} {'doomed' if secret == doomed else 'live'} at {sent - started:.0f}s"] += 1
            await asyncio.sleep(PACE)

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            for name, child in stack.children.items():
                value = rss_kib(child.process.pid)
                if value is not None and child.running:
                    rss[f"{name} (pid {child.process.pid})"].append((time.monotonic(), value))
            await asyncio.sleep(3)

    async def day_of_changes() -> None:
        await asyncio.sleep(SECONDS * 0.2)
        revoked_at[0] = time.monotonic()
        async with pool.acquire() as conn:
            await api_keys.revoke_key(conn, doomed_key.id)
        revoked_at[1] = time.monotonic()
        await asyncio.sleep(SECONDS * 0.15)
        async with pool.acquire() as conn:
            await plans.upsert_plan(conn, plan, included_units=2 * 10**9)
        await asyncio.sleep(SECONDS * 0.15)
        event = stripe_player.build_event("checkout.session.completed", org_id=org.id)
        body = stripe_player.encode(event)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                stack.envoy_url + "/stripe/webhook",
                data=body,
                headers={"Stripe-Signature": stripe_player.sign(body, SECRET), "Content-Type": "application/json"},
            ) as response:
                reply = await response.json()
        assert response.status == 200 and reply["outcome"] == "applied", reply
        await asyncio.sleep(SECONDS * 0.15)
        restart_window[0] = time.monotonic()
        replica = stack.children["authz-1"]
        replica.signal(signal.SIGTERM)
        assert await replica.process.wait() == 0
        await stack.restart("authz-1")
        restart_window[1] = time.monotonic()

    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(CLIENTS)), sample_rss(), day_of_changes())

    billable = served[(live, DETECT)] + served[(doomed, DETECT)]
    await wait_for_usage(pool, org.id, {"stream": billable}, within=30)
    total = sum(served.values())
    print(
        f"\nsoak: {SECONDS:.0f}s, {total} requests served ({total / SECONDS:.0f}/s), {billable} billable; "
        f"stored {await stored_usage(pool, org.id)}; 503 during the restart: {restart_503}; "
        f"unexpected: {dict(unexpected) or 'none'}"
    )
    for name, samples in sorted(rss.items()):
        if samples:
            print(
                f"soak: RSS {name}: {samples[0][1] / 1024:.1f} -> {samples[-1][1] / 1024:.1f} MiB, "
                f"slope over the second half {slope_mib_per_hour(samples):+.1f} MiB/hour"
            )
    assert not unexpected, unexpected
    assert served[(doomed, DETECT)] > 0 and served[(live, DETECT)] > 0

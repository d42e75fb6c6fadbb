"""The memory authz needs to hold many keys: its RSS with 100,000 keys cached (target ≤ 150 MB).

    python -m bench --only memory

100,000 live keys are created in bulk (100 to an organisation) and authz is started with a key cache larger
than that (DRIFTLOCK_KEY_CACHE_MAX_ENTRIES). Its RSS (VmRSS of the process) is read idle, after a first 1,000
keys (the code paths warm), after half of them, and after one billable Check of every key, once the meter has
flushed; the cache is checked to hold every key (driftlock_authz_key_cache_entries). Per cached key is the
growth from the warm reading over the keys added since, and over the second half alone (where the caches that
are bounded whatever the number of keys are full). BENCH_MEMORY_KEYS shrinks the run.
"""

import asyncio
import os

from bench.bulk import check_requests, create_keys, rss_mb, send_checks, source_address
from bench.harness import Fixture, gauge_samples, start_authz

KEYS = int(os.environ.get("BENCH_MEMORY_KEYS", "100000"))
WARM = min(1000, KEYS // 10)
TARGET_MB = 150
TARGET_P999_MS = 25


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_memory(fixture: Fixture) -> list[tuple[str, str, str, str]]:
    secrets = await create_keys(fixture, KEYS, keys_per_org=100)
    # Each key from an address of its own, as many customers would call: one address with many new keys at once
    # would meet the per-source budget for unknown keys while their look-ups are under way.
    requests = check_requests(secrets, [source_address(i) for i in range(KEYS)])
    authz, port, metrics_port = await start_authz(
        fixture, "authz-memory", DRIFTLOCK_KEY_CACHE_MAX_ENTRIES=str(KEYS + KEYS // 10 + 1000)
    )
    try:
        pid = authz.process.pid
        log = fixture.workdir / "authz-memory.log"
        await asyncio.sleep(1.0)  # let start-up finish (the plan book, the listener)
        idle = rss_mb(pid)
        half = KEYS // 2
        sent = [await send_checks(fixture, port, requests[:WARM])]
        rss_warm = rss_mb(pid)
        sent.append(await send_checks(fixture, port, requests[WARM:half]))
        rss_half = rss_mb(pid)
        sent.append(await send_checks(fixture, port, requests[half:]))
        for batch in sent:
            batch.only("ok", log=log)
        await asyncio.sleep(2.0)  # past a meter flush
        full = rss_mb(pid)
        peak = rss_mb(pid, "VmHWM")
        cached = {
            dict(labels)["cache"]: value
            for labels, value in (await gauge_samples(metrics_port, "driftlock_authz_key_cache_entries")).items()
        }
    finally:
        await authz.stop()
    if cached.get("verified", 0) < KEYS:
        raise RuntimeError(f"authz holds {cached.get('verified', 0):,.0f} of {KEYS:,} keys: no figure from this run")
    per_key = (full - rss_warm) * 1e6 / (KEYS - WARM)
    filling = sorted(latency for batch in sent[1:] for latency in batch.latencies)
    # The second half: the caches bounded whatever the number of keys (responses, client addresses) are full.
    marginal = (full - rss_half) * 1e6 / (KEYS - half)
    return [
        ("memory", "authz RSS idle", f"{idle:.0f} MB", f"{rss_warm:.0f} MB after {WARM:,} keys"),
        (
            "memory",
            f"authz RSS with {KEYS:,} keys cached",
            f"{full:.0f} MB",
            f"target ≤ {TARGET_MB} MB at 100,000 keys; peak {peak:.0f} MB; {rss_half:.0f} MB at {half:,}",
        ),
        (
            "memory",
            "check latency while the cache grew, p99 / p99.9 / slowest",
            f"{quantile(filling, 0.99) * 1000:.1f} / {quantile(filling, 0.999) * 1000:.1f} / "
            f"{max(filling) * 1000:.0f} ms",
            f"target p99.9 ≤ {TARGET_P999_MS} ms (a stall: a full garbage collection scanning every cached key)",
        ),
        (
            "memory",
            "per cached key",
            f"{per_key:,.0f} bytes",
            f"{marginal:,.0f} bytes each over the second half",
        ),
    ]

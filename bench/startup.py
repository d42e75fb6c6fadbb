"""A replica starting over a large key table: how long until it reports SERVING (the key index, every key's hash
prefix, is loaded before it does), and its memory with every key in the index and the key cache at its default
bound (target: SERVING within 15 s and RSS ≤ 400 MB at 1,000,000 keys).

    python -m bench --only startup          # BENCH_STARTUP_KEYS (default 1,000,000) keys, created in bulk

After SERVING, one billable Check per key for the first DRIFTLOCK_KEY_CACHE_MAX_ENTRIES keys (the default
bound, 100,000), so that the cache is full as in production, and RSS is read again.
"""

import asyncio
import os
import time

from bench.bulk import check_requests, create_keys, rss_mb, send_checks, source_address
from bench.harness import Fixture, start_authz
from driftlock_kernel.settings import Settings

KEYS = int(os.environ.get("BENCH_STARTUP_KEYS", "1000000"))
TARGET_SECONDS = 15
TARGET_MB = 400


async def bench_startup(fixture: Fixture) -> list[tuple[str, str, str, str]]:
    created = time.perf_counter()
    secrets = await create_keys(fixture, KEYS, keys_per_org=100)
    created = time.perf_counter() - created
    cached = min(KEYS, Settings().key_cache_max_entries)
    requests = check_requests(secrets[:cached], [source_address(i) for i in range(cached)])
    started = time.perf_counter()
    authz, port, _metrics_port = await start_authz(fixture, "authz-startup")
    serving = time.perf_counter() - started  # start_authz returns once health says SERVING
    try:
        pid = authz.process.pid
        idle = rss_mb(pid)
        sent = await send_checks(fixture, port, requests)
        sent.only("ok", log=fixture.workdir / "authz-startup.log")
        await asyncio.sleep(2.0)  # past a meter flush
        full = rss_mb(pid)
    finally:
        await authz.stop()
    return [
        (
            "startup",
            f"SERVING after start, {KEYS:,} keys in the table",
            f"{serving:.1f} s",
            f"target ≤ {TARGET_SECONDS} s (keys created in {created:.0f} s)",
        ),
        (
            "startup",
            f"authz RSS with {KEYS:,} keys indexed",
            f"{idle:.0f} MB idle",
            f"{full:.0f} MB with {cached:,} of them cached (target ≤ {TARGET_MB} MB)",
        ),
    ]

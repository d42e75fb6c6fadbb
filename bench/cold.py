"""The cold path: keys authz has never seen, valid and made up, sent straight to authz over gRPC.

    python -m bench --only cold

One authz process, fresh, over keys created in bulk (10 to an organisation):

- cold:     10,000 valid keys, each used for the first time (64 Checks in flight, each key from an address of
            its own, as 10,000 customers would): throughput, and the statements the database ran meanwhile
            (pg_stat_statements; key look-ups among them) against the number of keys.
- warm:     the same keys again, now cached, measured the same way: the yardstick for the floods.
- unknown:  1,000 keys with valid checksums that no database holds, each sent 10 times within the negative TTL
            (in blocks of 100 keys, so that a repeat finds the negative cache rather than a look-up still under
            way): key look-ups per repeated key (0 is the target) and throughput against `warm`.
- one source: 1,000 such keys from a single address, with the per-source look-up budget at its default: what
            the budget let through and what it answered instead.
- bounded:  100,000 distinct unknown keys: the RSS of authz once the negative cache is full and at the end, and
            the entries the negative cache holds (DRIFTLOCK_KEY_CACHE_UNKNOWN_MAX_ENTRIES).

The overall budget for looking up unknown keys (DRIFTLOCK_UNKNOWN_KEY_LOOKUPS_PER_SECOND, 200/s) is raised for
this part, so that each distinct unknown key is looked up once and the figures are those of the cache, not of
the budget; the per-source budget keeps its default, which `one source` shows at work. The client is Python
(grpc.aio, bytes in and out): Go's standard library speaks no HTTP/2 without TLS, and h2load sends one body.
Every figure is relative to `warm`, measured by the same client. BENCH_COLD_KEYS, BENCH_COLD_BOUNDED_KEYS
shrink the runs.
"""

import asyncio
import os

from bench.bulk import (
    KEY_LOOKUP,
    check_requests,
    create_keys,
    key_lookups,
    rss_mb,
    send_checks,
    source_address,
    statements_counted,
    unknown_keys,
)
from bench.harness import Fixture, gauge_samples, start_authz
from driftlock_kernel.settings import Settings

KEYS = int(os.environ.get("BENCH_COLD_KEYS", "10000"))
UNKNOWN_KEYS, REPEATS, BLOCK = 1000, 10, 100
BOUNDED_KEYS = int(os.environ.get("BENCH_COLD_BOUNDED_KEYS", "100000"))
FLUSHED = 2.5  # seconds: past the meter's flush interval, so that its statements fall within the count


async def bench_cold(fixture: Fixture) -> list[tuple[str, str, str, str]]:
    defaults = Settings()
    secrets = await create_keys(fixture, KEYS, keys_per_org=10)
    sources = [source_address(i) for i in range(KEYS)]
    rows: list[tuple[str, str, str, str]] = []
    async with statements_counted(fixture) as statements:
        authz, port, metrics_port = await start_authz(
            fixture, "authz-cold", DRIFTLOCK_UNKNOWN_KEY_LOOKUPS_PER_SECOND="1000000"
        )
        try:
            pid = authz.process.pid
            log = fixture.workdir / "authz-cold.log"

            # --- valid keys, first use ---
            requests = check_requests(secrets, sources)
            before = await statements.snapshot() if statements else None
            lookups = await key_lookups(metrics_port)
            cold = await send_checks(fixture, port, requests)
            cold.only("ok", log=log)
            await asyncio.sleep(FLUSHED)
            lookups = await key_lookups(metrics_port) - lookups
            rows.append(
                ("cold", f"{KEYS:,} valid keys, each used for the first time", f"{cold.rate:,.0f} checks/s", "")
            )
            if statements and before is not None:
                counted = await statements.since(before)
                rows.append(
                    (
                        "cold",
                        "statements the database ran (pg_stat_statements)",
                        f"{counted.total:,}",
                        f"{counted.total / KEYS:.3f} per key (target ≤ 1): {counted.summary()}",
                    )
                )
            rows.append(
                (
                    "cold",
                    "key look-ups authz sent (its cache misses)",
                    f"{lookups:,.0f}",
                    f"{lookups / KEYS:.3f} per key",
                )
            )

            # --- the same keys, cached ---
            warm = await send_checks(fixture, port, check_requests(secrets, sources))
            warm.only("ok", log=log)
            rows.append(
                (
                    "cold",
                    "the same keys again (cached)",
                    f"{warm.rate:,.0f} checks/s",
                    f"cold {cold.rate / warm.rate:.2f}x",
                )
            )

            # --- unknown keys, each repeated within the negative TTL ---
            made_up = unknown_keys(UNKNOWN_KEYS)
            order = [
                i
                for block in range(0, UNKNOWN_KEYS, BLOCK)
                for _ in range(REPEATS)
                for i in range(block, min(block + BLOCK, UNKNOWN_KEYS))
            ]
            flood = check_requests([made_up[i] for i in order], [source_address(KEYS + i) for i in order])
            before = await statements.snapshot() if statements else None
            lookups = await key_lookups(metrics_port)
            unknown = await send_checks(fixture, port, flood)
            unknown.only("invalid_api_key", log=log)
            lookups = await key_lookups(metrics_port) - lookups
            sent_statements = ""
            if statements and before is not None:
                counted = await statements.since(before)
                sent_statements = f"; {counted.matching(KEY_LOOKUP):,} look-up statements"
            repeats = UNKNOWN_KEYS * (REPEATS - 1)
            rows.append(
                (
                    "cold",
                    f"{UNKNOWN_KEYS:,} unknown keys, each sent {REPEATS} times",
                    f"{unknown.rate:,.0f} checks/s",
                    f"{unknown.rate / warm.rate:.2f}x warm valid keys (target ≥ 0.9)",
                )
            )
            rows.append(
                (
                    "cold",
                    "key look-ups per repeated unknown key",
                    f"{max(0.0, lookups - UNKNOWN_KEYS) / repeats:.3f}",
                    f"{lookups:,.0f} look-ups for {len(flood):,} checks of {UNKNOWN_KEYS:,} keys{sent_statements} "
                    "(target 0 per repeat)",
                )
            )

            # --- one address inventing keys, per-source budget at its default ---
            lone = unknown_keys(UNKNOWN_KEYS)
            lookups = await key_lookups(metrics_port)
            one_source = await send_checks(fixture, port, check_requests(lone, ["10.255.255.254"] * len(lone)))
            one_source.only("invalid_api_key", "auth_unavailable", log=log)
            lookups = await key_lookups(metrics_port) - lookups
            rationed = one_source.codes["auth_unavailable"]
            rows.append(
                (
                    "cold",
                    f"{UNKNOWN_KEYS:,} unknown keys from one address",
                    f"{one_source.rate:,.0f} checks/s",
                    f"{lookups:,.0f} looked up, {rationed:,} rationed (auth_unavailable, no query); budget "
                    f"{defaults.unknown_key_lookups_per_source_per_second:g}/s per source",
                )
            )

            # --- the negative cache stays bounded ---
            cap = defaults.key_cache_unknown_max_entries
            rss_before = rss_mb(pid)
            many = unknown_keys(BOUNDED_KEYS)
            many_sources = [source_address(KEYS + 2 * UNKNOWN_KEYS + i) for i in range(BOUNDED_KEYS)]
            filling = min(2 * cap, BOUNDED_KEYS // 2)  # the negative cache full, and as many again after
            first = await send_checks(fixture, port, check_requests(many[:filling], many_sources[:filling]))
            rss_full = rss_mb(pid)
            rest = await send_checks(fixture, port, check_requests(many[filling:], many_sources[filling:]))
            for sent in (first, rest):
                sent.only("invalid_api_key", log=log)
            rss_end = rss_mb(pid)
            entries = await _cache_entries(metrics_port)
            if entries.get("unknown", 0) > cap:
                raise RuntimeError(
                    f"the negative cache holds {entries['unknown']:,.0f} entries, over its cap of {cap:,}"
                )
            rows.append(
                (
                    "cold",
                    f"RSS after {filling:,} / {BOUNDED_KEYS:,} distinct unknown keys",
                    f"{rss_full:.0f} / {rss_end:.0f} MB",
                    f"{rss_end - rss_full:+.1f} MB over the last {BOUNDED_KEYS - filling:,}; {rss_before:.0f} before",
                )
            )
            rows.append(
                (
                    "cold",
                    "unknown keys held by the negative cache",
                    f"{entries.get('unknown', float('nan')):,.0f}",
                    f"cap {cap:,} (DRIFTLOCK_KEY_CACHE_UNKNOWN_MAX_ENTRIES)",
                )
            )
        finally:
            await authz.stop()
    return rows


async def _cache_entries(metrics_port: int) -> dict[str, float]:
    """The key cache's sizes as authz reports them, by cache (verified, unknown)."""
    samples = await gauge_samples(metrics_port, "driftlock_authz_key_cache_entries")
    return {dict(labels)["cache"]: value for labels, value in samples.items()}

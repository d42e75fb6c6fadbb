"""Usage history (issue 18): what writing it costs the request path, how many rows it grows by, and how fast a
dashboard's history query answers on a seeded PostgreSQL 15.

    python -m bench --only history [--seconds 8] [--rounds 3]

- Throughput through Envoy (wrk, billable calls, each with its own request id so every call is counted) of authz
  with the usage history on (`DRIFTLOCK_USAGE_ROLLUPS=true`, the default) and off, interleaved; target >= 0.98.
- Rows the history tables grew by per 100,000 requests (they grow with active keys x hours, not requests).
- A 30-day history query of one organisation with 1,000 active keys, on PostgreSQL 15 seeded with 1,000
  organisations x 90 days of hourly buckets: EXPLAIN ANALYZE's plan and the median time (target <= 100 ms).
  `BENCH_PG15_URL` names the server (default postgresql://postgres@127.0.0.1:5432/postgres); a database
  `driftlock_bench_history` is created there, seeded, and dropped afterwards.
"""

import asyncio
import os
import re
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.harness import Fixture, cpu_seconds, metric_total, run, start_authz, start_backend, start_edge
from driftlock_kernel import db, migrate, usage_history
from driftlock_kernel.usage_history import Granularity, GroupBy

HISTORY_TABLES = ("usage_hours", "usage_days", "usage_key_hours", "usage_key_days")
SEED_ORGS = 1000
SEED_DAYS = 90
BIG_ORG_KEYS = 1000
BENCH_DATABASE = "driftlock_bench_history"

Row = tuple[str, str, str, str]


async def _history_rows(url: str) -> int:
    async with db.connection(url) as conn:
        return sum([await conn.fetchval(f"SELECT count(*) FROM driftlock.{table}") for table in HISTORY_TABLES])


async def bench_history_throughput(fixture: Fixture, seconds: float, rounds: int) -> list[Row]:
    backend, backend_port = await start_backend(fixture)
    on, on_port, on_metrics = await start_authz(fixture, "authz-history-on", DRIFTLOCK_USAGE_ROLLUPS="true")
    off, off_port, _ = await start_authz(fixture, "authz-history-off", DRIFTLOCK_USAGE_ROLLUPS="false")
    children = [backend, on, off]
    results: dict[str, list[float]] = {"on": [], "off": []}
    # authz's CPU time per request: steadier than throughput on a shared machine.
    cpu_per_request: dict[str, list[float]] = {"on": [], "off": []}
    processes = {"on": on, "off": off}
    try:
        edges = {}
        for label, authz_port in (("on", on_port), ("off", off_port)):
            child, port, _admin = await start_edge(
                fixture, f"history-{label}", backend_port=backend_port, authz_ports=[authz_port], requests_per_source=0
            )
            children.append(child)
            edges[label] = port
        rows_before = await _history_rows(fixture.url)
        counted_before = await metric_total(on_metrics, "driftlock_authz_checks", decision="allow")
        for round_number in range(rounds):
            # Which side goes first alternates, so that neither always runs after the other's flush.
            for label in ("on", "off") if round_number % 2 == 0 else ("off", "on"):
                cpu_before = cpu_seconds(processes[label].process.pid)
                output = await run(
                    [
                        "wrk",
                        "-t",
                        "2",
                        "-c",
                        "32",
                        "-d",
                        f"{round(seconds)}s",
                        "-H",
                        f"Authorization: Bearer {fixture.secret}",
                        f"http://127.0.0.1:{edges[label]}/api/v1/stream/detect",
                    ]
                )
                rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
                non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
                if rps is None:
                    raise RuntimeError(f"could not read wrk's output:\n{output}")
                if non_2xx:
                    raise RuntimeError(f"wrk saw {non_2xx.group(1)} failed responses with the history {label}")
                results[label].append(float(rps.group(1)))
                total = re.search(r"(\d+) requests in", output)
                if total is not None and int(total.group(1)):
                    cpu = cpu_seconds(processes[label].process.pid) - cpu_before
                    cpu_per_request[label].append(cpu / int(total.group(1)))
        await asyncio.sleep(2.5)  # the flush loop runs every second: let the last one land
        served_on = await metric_total(on_metrics, "driftlock_authz_checks", decision="allow") - counted_before
        grown = await _history_rows(fixture.url) - rows_before
    finally:
        for child in reversed(children):
            await child.stop()
    on_rps, off_rps = statistics.median(results["on"]), statistics.median(results["off"])
    on_cpu, off_cpu = statistics.median(cpu_per_request["on"]), statistics.median(cpu_per_request["off"])
    return [
        ("history", "Envoy + authz, usage history on", f"{on_rps:,.0f} req/s", f"{on_rps / off_rps:.3f}x off"),
        ("history", "Envoy + authz, usage history off", f"{off_rps:,.0f} req/s", "1.000x"),
        ("history", "  authz CPU per request, history on", f"{on_cpu * 1e6:.0f} µs", f"{off_cpu / on_cpu:.3f}x off's"),
        ("history", "  authz CPU per request, history off", f"{off_cpu * 1e6:.0f} µs", "1.000x"),
        (
            "history",
            "history rows per 100,000 requests",
            f"{grown / served_on * 100_000:.2f}" if served_on else "-",
            f"{grown} rows for {served_on:,.0f} requests (1 org, 1 key)",
        ),
    ]


def _pg15_url() -> str:
    return os.environ.get("BENCH_PG15_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _seed(url: str, big_org: uuid.UUID, now: datetime) -> dict[str, int]:
    """1,000 organisations x 90 days of hour buckets (two products), each with one key; the big organisation with
    1,000 keys active every hour; the day buckets of all of them. Generated in the database."""
    start = (now - timedelta(days=SEED_DAYS)).replace(minute=0, second=0, microsecond=0)
    end = now.replace(minute=0, second=0, microsecond=0)
    async with db.connection(url) as conn:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute(
            """CREATE TEMP TABLE seed_orgs AS
               SELECT CASE WHEN n = 1 THEN $1::uuid ELSE gen_random_uuid() END AS org_id
               FROM generate_series(1, $2) AS n""",
            big_org,
            SEED_ORGS,
        )
        await conn.execute(
            """INSERT INTO driftlock.usage_hours (org_id, period_start, hour, product, units, requests)
               SELECT o.org_id, date_trunc('month', h, 'UTC'), h, p, 50, 50
               FROM seed_orgs o, generate_series($1::timestamptz, $2::timestamptz, interval '1 hour') AS h,
                    unnest(ARRAY['stream', 'monitor']) AS p""",
            start,
            end,
        )
        await conn.execute(
            """INSERT INTO driftlock.usage_days (org_id, day, product, units, requests)
               SELECT org_id, date_trunc('day', hour, 'UTC'), product, sum(units), sum(requests)
               FROM driftlock.usage_hours GROUP BY 1, 2, 3"""
        )
        # One key per organisation, 1,000 for the big one: every key active every hour.
        await conn.execute(
            """INSERT INTO driftlock.usage_key_hours (org_id, period_start, hour, key_id, product, units, requests)
               SELECT o.org_id, date_trunc('month', h, 'UTC'), h, k.key_id, 'stream', 1, 1
               FROM seed_orgs o
               CROSS JOIN LATERAL (SELECT gen_random_uuid() AS key_id
                                   FROM generate_series(1, CASE WHEN o.org_id = $3 THEN $4 ELSE 1 END)) AS k
               CROSS JOIN generate_series($1::timestamptz, $2::timestamptz, interval '1 hour') AS h""",
            start,
            end,
            big_org,
            BIG_ORG_KEYS,
        )
        await conn.execute(
            """INSERT INTO driftlock.usage_key_days (org_id, day, key_id, product, units, requests)
               SELECT org_id, date_trunc('day', hour, 'UTC'), key_id, product, sum(units), sum(requests)
               FROM driftlock.usage_key_hours GROUP BY 1, 2, 3, 4"""
        )
        await conn.execute("VACUUM ANALYZE driftlock.usage_hours")
        await conn.execute("VACUUM ANALYZE driftlock.usage_days")
        await conn.execute("VACUUM ANALYZE driftlock.usage_key_hours")
        await conn.execute("VACUUM ANALYZE driftlock.usage_key_days")
        return {t: await conn.fetchval(f"SELECT count(*) FROM driftlock.{t}") for t in HISTORY_TABLES}


async def bench_history_query(rounds: int = 7) -> list[Row]:
    server = _pg15_url()
    admin = await asyncpg.connect(server)
    try:
        version = await admin.fetchval("SHOW server_version")
        await admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE}")
        await admin.execute(f"CREATE DATABASE {BENCH_DATABASE}")
    finally:
        await admin.close()
    url = urlunsplit(urlsplit(server)._replace(path=f"/{BENCH_DATABASE}"))
    rows: list[Row] = []
    try:
        async with db.connection(url) as conn:
            await migrate.migrate(conn)
        big_org = uuid.uuid4()
        now = datetime.now(UTC)
        started = time.perf_counter()
        counts = await _seed(url, big_org, now)
        seeded_in = time.perf_counter() - started
        rows.append(
            (
                "history",
                f"seeded on PostgreSQL {version.split()[0]}",
                f"{sum(counts.values()):,} rows",
                ", ".join(f"{t} {n:,}" for t, n in counts.items()) + f" in {seeded_in:.0f}s",
            )
        )
        window = (now - timedelta(days=30), now)
        cases = (
            (Granularity.HOUR, GroupBy.PRODUCT),
            (Granularity.DAY, GroupBy.PRODUCT),
            (Granularity.DAY, GroupBy.KEY),
        )
        async with db.connection(url) as conn:
            for granularity, group_by in cases:
                start, end = usage_history.history_window(granularity, *window, now)
                sql = usage_history.history_sql(granularity, group_by)
                args = (big_org, start, end, usage_history.MAX_BUCKETS + 1)
                plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
                print(f"\n-- 30 days by {granularity.value}, per {group_by.value}, the organisation with 1,000 keys:")
                print("\n".join(row[0] for row in plan), flush=True)
                times, buckets = [], 0
                for _ in range(rounds):
                    began = time.perf_counter()
                    buckets = len(await usage_history.history(conn, big_org, granularity, group_by, start, end))
                    times.append(time.perf_counter() - began)
                median_ms = statistics.median(times) * 1000
                rows.append(
                    (
                        "history",
                        f"30-day query, {granularity.value} buckets per {group_by.value} (1,000 keys)",
                        f"{median_ms:.1f} ms",
                        f"{buckets:,} buckets; target <= 100 ms: {'met' if median_ms <= 100 else 'NOT met'}",
                    )
                )
    finally:
        admin = await asyncpg.connect(server)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {BENCH_DATABASE}")
        finally:
            await admin.close()
    return rows


async def bench_history(fixture: Fixture, seconds: float, rounds: int) -> list[Row]:
    rows = await bench_history_throughput(fixture, seconds, rounds)
    try:
        rows += await bench_history_query()
    except (OSError, asyncpg.PostgresError) as error:
        rows.append(("history", "30-day query on PostgreSQL 15", "-", f"skipped: {error}"))
    return rows

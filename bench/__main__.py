"""Side-by-side benchmarks of authz, run in one go so that both sides see the same (noisy, shared) machine.

    python -m bench [--seconds 8] [--rounds 3] [--only inproc,caps,grpc,edge,redis]

- inproc: microseconds per Check inside one process (warm cache), for a billable call, a read, and a
  malformed key. No network: this is the Python cost of a decision.
- caps:   the price of exact block caps: microseconds per billable Check in one process against the real
          database, far from the plan's cap (counted in memory) and within the exact margin of it (one atomic
          statement per call), with the database statements each sends per call.
- grpc:   h2load drives authz and a do-nothing ext_authz server directly over gRPC, alternately.
- edge:   wrk drives Envoy -> {authz | do-nothing ext_authz} -> a zero-cost backend (Envoy direct response),
          alternately; also reports database statements per 1,000 billable requests.

- flood:  one client flooding through real Envoy beside a paying one (bench/flood.py).
- redis:  what sharing rate limits through Redis (DRIFTLOCK_REDIS_URL) costs per check, in process: a
          rate-limited read with the local buckets against the same with the Lua script in Redis, one at a time
          (the round trip) and 64 at once (throughput); needs Redis at $DRIFTLOCK_REDIS_URL or 127.0.0.1:6379.
- latency: added latency through Envoy at a fixed 1,000 req/s, open loop (bench/latency.py; needs `go`).
- cold:   first use of 10,000 keys, floods of unknown keys, the negative cache's bound (bench/cold.py).
- memory: authz's RSS with 100,000 keys cached (bench/memory.py).
- startup: a replica over 1,000,000 keys: time to SERVING and RSS (bench/startup.py).
- history: the usage history on vs off through Envoy, its rows per 100,000 requests, and a 30-day history query
          on a seeded PostgreSQL 15 (bench/history.py).
- events: deliveries per second one authz sustains, and the lag from a change to its delivery (bench/events.py).
- controls: a billable Check with every customer control configured against one with none (bench/controls.py).
- mtls:   authz's CPU per check with a plain port against one requiring mutual TLS, on kept and on new
          connections (bench/mtls.py).

Each pair runs `--rounds` times, interleaved (A B A B ...); the table shows medians and the ratio.
Needs `wrk` and `h2load` for the last two (Debian: apt-get install wrk nghttp2-client).
"""

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from bench.cold import bench_cold
from bench.controls import bench_controls
from bench.distributed_flood import bench_distributed_flood
from bench.events import bench_events
from bench.flood import bench_flood
from bench.harness import (
    Fixture,
    check_request_bytes,
    cpu_seconds,
    grpc_frame,
    h2load_rps,
    metric_total,
    run,
    runs_summary,
    side_by_side,
    start_authz,
    start_backend,
    start_edge,
    table,
)
from bench.history import bench_history
from bench.latency import bench_latency, go_missing
from bench.memory import bench_memory
from bench.mtls import bench_mtls
from bench.startup import bench_startup
from bench.workers import bench_workers
from driftlock_kernel import api_keys, context_keys, db, orgs, plans
from driftlock_kernel.billing import Overage
from driftlock_kernel.settings import Settings

# --- in process ---------------------------------------------------------------------------------------------

# The key cache keeps the benchmark's key for the whole run; a shared, busy machine gets a second for a look-up.
IN_PROCESS_SETTINGS = Settings(
    key_cache_ttl_seconds=300, key_cache_stale_seconds=300, database_lookup_timeout_seconds=1.0
)
# What the in-process servicers are built with: `answer` is called directly, so no caller ever shows it.
IN_PROCESS = b"in-process"


async def bench_inproc(fixture: Fixture, seconds: float) -> list[tuple[str, str, str, str]]:
    from envoy.service.auth.v3 import external_auth_pb2

    from authz_service.check.assembly import assemble_authorizer, database_parts
    from authz_service.check.context_signer import ContextSigner
    from authz_service.check.ext_authz import AuthorizationServicer

    pool = await db.create_pool(fixture.url, application_name="bench", max_size=2)
    parts = database_parts(pool, IN_PROCESS_SETTINGS, replica="bench")
    meter = parts.meter
    authorizer = assemble_authorizer(parts, IN_PROCESS_SETTINGS)
    keys = context_keys.ContextKeys(context_keys.EDDSA, (fixture.signing_key,))
    servicer = AuthorizationServicer(authorizer, ContextSigner(keys), caller_secret=IN_PROCESS)
    cases = {
        "billable call (metered)": {"scope": "detect", "billable": "true", "product": "stream", "units": "1"},
        "read call": {"scope": "read", "billable": "false"},
    }
    rows = []
    for label, context in cases.items():
        request = external_auth_pb2.CheckRequest.FromString(check_request_bytes(fixture.secret, context))
        headers = request.attributes.request.http.headers
        await servicer.answer(request)  # warm the cache
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(500):
                headers["x-request-id"] = uuid.uuid4().hex
                await servicer.answer(request)
            calls += 500
        elapsed = time.perf_counter() - started
        rows.append(("inproc", label, f"{elapsed / calls * 1e6:.1f} µs/check", f"{calls / elapsed:,.0f} checks/s"))
        await meter.flush_once()
    bad = external_auth_pb2.CheckRequest.FromString(check_request_bytes("dlk_live_malformed", cases["read call"]))
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds / 2:
        for _ in range(500):
            await servicer.answer(bad)
        calls += 500
    elapsed = time.perf_counter() - started
    rows.append(("inproc", "malformed key (no database)", f"{elapsed / calls * 1e6:.1f} µs/check", ""))
    await pool.close()
    return rows


# --- rate limits through Redis -------------------------------------------------------------------------------


async def bench_redis(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    from envoy.service.auth.v3 import external_auth_pb2

    from authz_service.check.assembly import assemble_authorizer, database_parts
    from authz_service.check.context_signer import ContextSigner
    from authz_service.check.ext_authz import AuthorizationServicer
    from authz_service.check.rate_limit import RateLimiter
    from authz_service.check.shared_rate_limit import SharedRateLimiter

    redis_url = os.environ.get("DRIFTLOCK_REDIS_URL", "redis://127.0.0.1:6379/0")
    pool = await db.create_pool(fixture.url, application_name="bench", max_size=2)
    async with pool.acquire() as conn:
        # A limit no benchmark reaches, so that every check runs the limiter and is allowed.
        await plans.upsert_plan(
            conn, "bench-rate-limited", included_units=10**12, overage=Overage.SOFT, rate_limit_rps=1e9
        )
        org = await orgs.create_org(conn, f"bench-{uuid.uuid4().hex[:6]}", plan="bench-rate-limited")
        _key, secret = await api_keys.create_key(conn, org.id)
    shared = SharedRateLimiter.from_url(redis_url, RateLimiter(), timeout=1.0)
    signer = ContextSigner(context_keys.ContextKeys(context_keys.EDDSA, (fixture.signing_key,)))

    def servicer(shared_limits):
        parts = database_parts(pool, IN_PROCESS_SETTINGS, replica="bench")
        parts.shared_limits = shared_limits
        authorizer = assemble_authorizer(parts, IN_PROCESS_SETTINGS)
        return AuthorizationServicer(authorizer, signer, caller_secret=IN_PROCESS)

    request = external_auth_pb2.CheckRequest.FromString(
        check_request_bytes(secret, {"scope": "read", "billable": "false"})
    )
    sides = {"local buckets": servicer(None), "Redis (GCRA script)": servicer(shared)}
    for side in sides.values():
        response = await side.answer(request)  # warm the key cache and the script
        if external_auth_pb2.CheckResponse.FromString(response).status.code != 0:
            raise SystemExit(f"bench check was refused: {response}")
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for label, side in sides.items():
            for in_flight in (1, 64):
                calls, started = 0, time.perf_counter()
                while time.perf_counter() - started < seconds / 4:
                    await asyncio.gather(*(side.answer(request) for _ in range(in_flight)))
                    calls += in_flight
                results.setdefault((label, in_flight), []).append(calls / (time.perf_counter() - started))
    await shared.close()
    await pool.close()
    rows = []
    for in_flight in (1, 64):
        local = statistics.median(results[("local buckets", in_flight)])
        remote = statistics.median(results[("Redis (GCRA script)", in_flight)])
        what = "one at a time" if in_flight == 1 else "64 in flight"
        rows.append(("redis", f"local buckets, {what}", f"{1e6 / local:.1f} µs/check", f"{local:,.0f} checks/s"))
        rows.append(
            (
                "redis",
                f"Redis, {what}",
                f"{1e6 / remote:.1f} µs/check",
                f"{remote:,.0f} checks/s, +{1e6 / remote - 1e6 / local:.0f} µs per check",
            )
        )
    return rows


# --- the cost of exact caps ---------------------------------------------------------------------------------------


async def bench_caps(fixture: Fixture, seconds: float) -> list[tuple[str, str, str, str]]:
    """The same billable check on a block plan, far from its cap and within the exact margin of it."""
    from envoy.service.auth.v3 import external_auth_pb2

    from authz_service.check.assembly import assemble_authorizer, database_parts
    from authz_service.check.context_signer import ContextSigner
    from authz_service.check.ext_authz import AuthorizationServicer

    pool = await db.create_pool(fixture.url, application_name="bench-caps", max_size=2)
    async with pool.acquire() as conn:
        await plans.upsert_plan(conn, "bench-block", included_units=10**9, overage=Overage.BLOCK)
    context = {"scope": "detect", "billable": "true", "product": "stream", "units": "1"}
    rows = []
    # The margin decides the path: 1,000 units is far from a cap of 10^9; a margin above the cap is always near.
    for label, margin in (("far from the cap (in memory)", 1000), ("near the cap (reserved in the database)", 10**10)):
        async with pool.acquire() as conn:
            org = await orgs.create_org(conn, f"bench-caps-{uuid.uuid4().hex[:6]}", plan="bench-block")
            _key, secret = await api_keys.create_key(conn, org.id)
        settings = dataclasses.replace(IN_PROCESS_SETTINGS, quota_exact_margin_units=margin)
        parts = database_parts(pool, settings, replica="bench-caps")
        meter = parts.meter
        authorizer = assemble_authorizer(parts, settings)
        keys = context_keys.ContextKeys(context_keys.EDDSA, (fixture.signing_key,))
        servicer = AuthorizationServicer(authorizer, ContextSigner(keys), caller_secret=IN_PROCESS)
        request = external_auth_pb2.CheckRequest.FromString(check_request_bytes(secret, context))
        headers = request.attributes.request.http.headers
        await servicer.answer(request)
        statements_before = await _flush_statements(pool)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(100):
                headers["x-request-id"] = uuid.uuid4().hex
                await servicer.answer(request)
            calls += 100
            await meter.flush_cycle()  # as the flush loop would, about once a second at this rate
        elapsed = time.perf_counter() - started
        statements = await _flush_statements(pool) - statements_before
        rows.append(
            (
                "caps",
                label,
                f"{elapsed / calls * 1e6:.1f} µs/check",
                f"{statements / calls:.3f} statements/check",
            )
        )
    await pool.close()
    return rows


async def _flush_statements(pool) -> int:
    """Statements that wrote usage: flushes and reservations each insert one meter_flushes row."""
    return await pool.fetchval("SELECT count(*) FROM driftlock.meter_flushes WHERE replica = 'bench-caps'")


# --- gRPC, no Envoy -------------------------------------------------------------------------------------------


async def bench_grpc(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    """h2load against authz (a billable call on a plan without a rate limit, and on one with a limit, whose
    headers every answer carries) and against the do-nothing server, interleaved. Audit sampling, metering and
    context tokens as in production."""
    context = {"scope": "detect", "billable": "true", "product": "stream"}
    frames: dict[str, Path] = {}
    for label, secret in (
        ("no rate limit", fixture.secret),
        ("rate limit headers", fixture.rate_limited_secret),
        ("every control", fixture.controlled_secret),
    ):
        body = check_request_bytes(secret, context)
        frames[label] = fixture.workdir / f"check-{len(frames)}.grpc"
        frames[label].write_bytes(grpc_frame(body))
    ours, our_port, our_metrics = await start_authz(fixture, "authz-grpc")
    null, null_port, _ = await start_authz(fixture, "null-grpc", null=True)
    sides = [(f"authz, {label}", our_port, frame, ours) for label, frame in frames.items()]
    sides.append(("do-nothing", null_port, frames["no rate limit"], null))
    results: dict[str, list[float]] = {label: [] for label, *_ in sides}
    # The server's CPU time per answered check: steadier than throughput on a shared machine, and what sizing
    # needs (a core serves 1 / that many checks a second).
    cpu_per_check: dict[str, list[float]] = {label: [] for label, *_ in sides}
    try:
        for _ in range(rounds):
            for label, port, frame, child in sides:
                cpu_before = cpu_seconds(child.process.pid)
                output = await run(
                    [
                        "h2load",
                        "-D",
                        str(round(seconds)),
                        "-c",
                        "8",
                        "-m",
                        "16",
                        "-d",
                        str(frame),
                        "-H",
                        "content-type: application/grpc",
                        "-H",
                        "te: trailers",
                        "-H",
                        f"{CALLER_SECRET_METADATA}: {fixture.ext_authz_secret}",
                        f"http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check",
                    ]
                )
                rps = h2load_rps(output)
                results[label].append(rps)
                cpu_per_check[label].append((cpu_seconds(child.process.pid) - cpu_before) / (rps * round(seconds)))
        allowed = await metric_total(our_metrics, "driftlock_authz_checks", decision="allow")
        denied = await metric_total(our_metrics, "driftlock_authz_checks", decision="deny")
        if denied or not allowed:
            raise RuntimeError(f"authz allowed {allowed:.0f} and denied {denied:.0f} of the benchmark's checks")
    finally:
        await ours.stop()
        await null.stop()
    null_rps = statistics.median(results["do-nothing"])
    null_cpu = statistics.median(cpu_per_check["do-nothing"])
    rows = []
    for label, *_ in sides[:-1]:
        rps, cpu = statistics.median(results[label]), statistics.median(cpu_per_check[label])
        measured = side_by_side("grpc", label, results[label], results["do-nothing"])
        rows.append(("grpc", f"{label} (billable)", f"{rps:,.0f} req/s", measured.ratio_cell()))
        rows.append(("grpc", f"  CPU per check, {label}", f"{cpu * 1e6:.0f} µs", f"{null_cpu / cpu:.2f}x do-nothing's"))
    rows.append(("grpc", "do-nothing ext_authz", f"{null_rps:,.0f} req/s", "1.00x"))
    rows.append(("grpc", "  CPU per check, do-nothing", f"{null_cpu * 1e6:.0f} µs", "1.00x"))
    return rows


# --- through Envoy -------------------------------------------------------------------------------------------


async def bench_edge(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    backend, backend_port = await start_backend(fixture)
    ours, our_port, metrics_port = await start_authz(fixture, "authz-edge")
    null, null_port, _ = await start_authz(fixture, "null-edge", null=True)
    edges = {}
    children = [backend, ours, null]
    try:
        for label, authz_port in (("authz", our_port), ("do-nothing", null_port)):
            child, port, _admin = await start_edge(
                fixture, label, backend_port=backend_port, authz_ports=[authz_port], requests_per_source=0
            )
            children.append(child)
            edges[label] = port
        sides = [
            ("authz, no rate limit", edges["authz"], fixture.secret),
            ("authz, rate limit headers", edges["authz"], fixture.rate_limited_secret),
            ("authz, every control", edges["authz"], fixture.controlled_secret),
            ("do-nothing", edges["do-nothing"], fixture.secret),
        ]
        results: dict[str, list[float]] = {label: [] for label, _, _ in sides}
        queries_before = await metric_total(metrics_port, "driftlock_authz_db_queries")
        flushes_before = await metric_total(metrics_port, "driftlock_authz_db_queries", query="meter_flush")
        started = time.monotonic()
        served = 0
        for _ in range(rounds):
            for label, port, secret in sides:
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
                        f"Authorization: Bearer {secret}",
                        f"http://127.0.0.1:{port}/api/v1/stream/detect",
                    ]
                )
                rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
                total = re.search(r"(\d+) requests in", output)
                non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
                if rps is None or total is None:
                    raise RuntimeError(f"could not read wrk's output:\n{output}")
                if non_2xx:
                    raise RuntimeError(f"wrk saw {non_2xx.group(1)} failed responses through {label}")
                results[label].append(float(rps.group(1)))
                if label != "do-nothing":
                    served += int(total.group(1))
        await asyncio.sleep(1.5)  # let the last flush happen, so its statement is counted
        statements = await metric_total(metrics_port, "driftlock_authz_db_queries") - queries_before
        flushes = await metric_total(metrics_port, "driftlock_authz_db_queries", query="meter_flush") - flushes_before
        intervals = (time.monotonic() - started) / Settings().meter_flush_interval_seconds
    finally:
        for child in reversed(children):
            await child.stop()
    null_rps = statistics.median(results["do-nothing"])
    rows = []
    for label, _port, _secret in sides[:-1]:
        median_rps = statistics.median(results[label])
        measured = side_by_side("edge", f"Envoy + {label}", results[label], results["do-nothing"])
        rows.append(("edge", f"Envoy + {label} (billable)", f"{median_rps:,.0f} req/s", measured.ratio_cell()))
    rows.append(("edge", "Envoy + do-nothing ext_authz", f"{null_rps:,.0f} req/s", "1.00x"))
    return [
        *rows,
        (
            "edge",
            "database statements per 1,000 billable requests",
            f"{statements / served * 1000:.2f}",
            f"{statements:.0f} statements, {served:,} requests",
        ),
        (
            "edge",
            "metering statements per flush interval",
            f"{flushes / intervals:.2f}",
            f"{flushes:.0f} flushes in {intervals:.0f} intervals",
        ),
    ]


PARTS = (
    "inproc", "caps", "grpc", "edge", "redis", "flood", "flood60", "workers", "latency", "cold", "memory", "startup",
    "history", "events", "controls", "mtls",
)  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per pair")
    parser.add_argument(
        "--only",
        default="inproc,caps,grpc,edge,redis,workers",
        help="any of " + ",".join(PARTS),
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the chosen parts this many times and print the median of the runs' ratios (publish those)",
    )
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    for tool, part in (
        ("h2load", "grpc"),
        ("wrk", "edge"),
        ("wrk", "flood"),
        ("h2load", "workers"),
        ("wrk", "history"),
    ):
        if part in wanted and shutil.which(tool) is None:
            print(f"skipping {part}: {tool} is not installed (apt-get install wrk nghttp2-client)")
            wanted.discard(part)
    if "latency" in wanted and (why := go_missing()):
        print(f"skipping latency: {why}")
        wanted.discard("latency")
    for number in range(1, args.runs + 1):
        if args.runs > 1:
            print(f"\n== run {number} of {args.runs}", flush=True)
        await run_parts(wanted, args)
    if args.runs > 1:
        from bench.harness import MEASURED

        print(f"\n{time.strftime('%Y-%m-%d', time.gmtime())}: {args.runs} runs, * = disturbed (not counted)\n")
        print(table([("part", "what", "figure", "each run (baseline's rate)"), *runs_summary(MEASURED)]))


async def run_parts(wanted: set[str], args: argparse.Namespace) -> None:
    rows = [("part", "what", "median", "ratio")]
    with tempfile.TemporaryDirectory(prefix="driftlock-bench-") as scratch:
        async with Fixture(Path(scratch)) as fixture:
            if "inproc" in wanted:
                rows += await bench_inproc(fixture, args.seconds / 2)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "caps" in wanted:
                rows += await bench_caps(fixture, args.seconds / 2)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "grpc" in wanted:
                rows += await bench_grpc(fixture, args.seconds, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "edge" in wanted:
                rows += await bench_edge(fixture, args.seconds, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "redis" in wanted:
                rows += await bench_redis(fixture, args.seconds, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "flood" in wanted:
                rows += await bench_flood(fixture, args.seconds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "flood" in wanted or "flood60" in wanted:
                rows += await bench_distributed_flood(fixture, args.seconds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "workers" in wanted:
                rows += await bench_workers(fixture, args.seconds, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "latency" in wanted:
                rows += await bench_latency(fixture, args.seconds, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "cold" in wanted:
                rows += await bench_cold(fixture)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "memory" in wanted:
                rows += await bench_memory(fixture)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "startup" in wanted:
                rows += await bench_startup(fixture)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "history" in wanted:
                rows += await bench_history(fixture, args.seconds, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "events" in wanted:
                rows += await bench_events(fixture, args.seconds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "controls" in wanted:  # customer controls (issue 20): bench/controls.py
                rows += await bench_controls(fixture, args.seconds / 2, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
            if "mtls" in wanted:  # mutual TLS between Envoy and authz (issue 23): bench/mtls.py
                rows += await bench_mtls(fixture, args.seconds / 2, args.rounds)
                print(table(rows), flush=True)  # so far: a later part that fails keeps what was measured
    print(f"\n{os.cpu_count()} CPUs; {args.rounds} interleaved rounds of {args.seconds:.0f}s per pair\n")
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())

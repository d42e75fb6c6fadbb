"""Added latency through Envoy at a fixed rate well below saturation: authz against the do-nothing ext_authz.

    python -m bench --only latency [--seconds 8] [--rounds 3]

Both sides stand behind the shipped Envoy configuration with a zero-cost backend, as in the `edge` part, and
are driven alternately (A B A B ...) by `bench/fixedrate`, a small Go program built here with `go build`: it
sends at a fixed rate, open loop, and measures each request from the time it was due rather than from when it
went out (no coordinated omission). A Python client would take the CPU authz needs on a 2-core machine, and wrk2
is not packaged. Each run starts with a warm-up that is not reported.
"""

import asyncio
import json
import os
import shutil
import statistics
from pathlib import Path

from bench.harness import HERE, Fixture, metric_total, start_authz, start_backend, start_edge

RATE = int(os.environ.get("BENCH_LATENCY_RATE", "1000"))  # requests per second
CONNECTIONS = 16  # enough that a request rarely waits for a connection at this rate
WARMUP_SECONDS = 1.0
DETECT = "/api/v1/stream/detect"
# A request due while all 16 connections are busy waits; at 1% of them waiting this long the system is saturated.
SATURATED_LAG_MS = 10.0
TARGETS = {"p50": 0.3, "p99": 1.0}  # issue 10: at most this many milliseconds added over the do-nothing server


def go_missing() -> str | None:
    """Why the part cannot run here, or None."""
    if shutil.which("go") is None:
        return "go is not installed (apt-get install golang-go)"
    return None


async def build_fixedrate(workdir: Path) -> Path:
    """The load generator, compiled into the scratch directory from the standard library alone (offline)."""
    binary = workdir / "fixedrate"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off"}
    if not any(os.environ.get(name) for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(workdir / "go-cache")  # go refuses to build without somewhere to cache
    process = await asyncio.create_subprocess_exec(
        "go",
        "build",
        "-o",
        str(binary),
        ".",
        cwd=HERE / "fixedrate",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"go build of bench/fixedrate failed:\n{out.decode(errors='replace')}")
    return binary


async def fixed_rate(binary: Path, url: str, *, rate: int, seconds: float, header: str) -> dict:
    """One run of the generator: its JSON report. Refuses a run with a failed response."""
    process = await asyncio.create_subprocess_exec(
        str(binary),
        "-url",
        url,
        "-rate",
        str(rate),
        "-duration",
        f"{seconds}s",
        "-warmup",
        f"{WARMUP_SECONDS}s",
        "-connections",
        str(CONNECTIONS),
        "-H",
        header,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"fixedrate failed: {err.decode(errors='replace').strip()}")
    report = json.loads(out)
    if report["non_2xx"] or report["errors"]:
        raise RuntimeError(
            f"fixedrate saw {report['non_2xx']} failed responses {report['statuses']} and {report['errors']} "
            f"errors ({report.get('first_error', '')}) through {url}: no figure from this run"
        )
    # Requests waited for a free connection: at this rate the gateway (or the machine) is saturated, and the
    # figures would be queueing, not the latency added well below saturation.
    if report["send_lag_p99_ms"] > SATURATED_LAG_MS:
        raise RuntimeError(
            f"1% of the requests through {url} waited more than {report['send_lag_p99_ms']:.0f} ms to be sent (p50 "
            f"{report['p50_ms']:.1f} ms): saturated at {rate} req/s on this machine now, no figure from this run "
            "(BENCH_LATENCY_RATE sets a lower rate)"
        )
    # The generator fell behind its own schedule: the latencies would be the client's, not the gateway's.
    if report["achieved_rate"] < 0.95 * rate:
        raise RuntimeError(
            f"fixedrate held {report['achieved_rate']:.0f} of {rate} req/s through {url} (requests waited up to "
            f"{report['send_lag_max_ms']:.0f} ms to be sent): the machine is too busy, no figure from this run"
        )
    return report


async def bench_latency(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    binary = await build_fixedrate(fixture.workdir)
    backend, backend_port = await start_backend(fixture)
    ours, our_port, metrics_port = await start_authz(fixture, "authz-latency")
    null, null_port, _ = await start_authz(fixture, "null-latency", null=True)
    children = [backend, ours, null]
    edges = {}
    try:
        for label, authz_port in (("authz", our_port), ("do-nothing", null_port)):
            child, port, _admin = await start_edge(
                fixture, f"latency-{label}", backend_port=backend_port, authz_ports=[authz_port], requests_per_source=0
            )
            children.append(child)
            edges[label] = port
        results: dict[str, list[dict]] = {"authz": [], "do-nothing": []}
        for _ in range(rounds):
            for label, port in edges.items():
                report = await fixed_rate(
                    binary,
                    f"http://127.0.0.1:{port}{DETECT}",
                    rate=RATE,
                    seconds=seconds,
                    header=f"Authorization: Bearer {fixture.secret}",
                )
                results[label].append(report)
        # A denial would be answered with a 4xx, which fixedrate refuses already; this also catches an allow that
        # never reached authz (a misrouted Envoy would answer 200 from the backend without asking).
        allowed = await metric_total(metrics_port, "driftlock_authz_checks", decision="allow")
        denied = await metric_total(metrics_port, "driftlock_authz_checks", decision="deny")
        expected = sum(r["requests"] for r in results["authz"])
        if denied or allowed < expected:
            raise RuntimeError(f"authz allowed {allowed:.0f} and denied {denied:.0f} of at least {expected} checks")
    finally:
        for child in reversed(children):
            await child.stop()

    def median(label: str, field: str) -> float:
        return statistics.median(r[field] for r in results[label])

    rows = []
    for name, field in (("p50", "p50_ms"), ("p99", "p99_ms"), ("p99.9", "p99_9_ms")):
        ours_ms, null_ms = median("authz", field), median("do-nothing", field)
        target = f" (target +{TARGETS[name]:.1f})" if name in TARGETS else ""
        rows.append(
            (
                "latency",
                f"Envoy + authz at {RATE:,} req/s, {name}",
                f"{ours_ms:.2f} ms",
                f"{ours_ms - null_ms:+.2f} ms over do-nothing{target}",
            )
        )
        rows.append(("latency", f"Envoy + do-nothing at {RATE:,} req/s, {name}", f"{null_ms:.2f} ms", ""))
    rows.append(
        (
            "latency",
            "service time p50 / p99 (from the actual send)",
            f"{median('authz', 'service_p50_ms'):.2f} / {median('authz', 'service_p99_ms'):.2f} ms",
            f"do-nothing {median('do-nothing', 'service_p50_ms'):.2f} / {median('do-nothing', 'service_p99_ms'):.2f}"
            " ms (without the generator's own lateness, ~1 ms timer granularity in Go before 1.23)",
        )
    )
    rows.append(
        (
            "latency",
            "max (worst round)",
            f"{max(r['max_ms'] for r in results['authz']):.1f} ms",
            f"do-nothing {max(r['max_ms'] for r in results['do-nothing']):.1f} ms",
        )
    )
    return rows

"""Workers: authz as one process against `authz --workers 2`, over gRPC with h2load, interleaved (A B A B ...).

    python -m bench --only workers [--seconds 8] [--rounds 3]

h2load is pinned with `taskset` to one CPU (the last one this process may use). With three CPUs or more, authz
runs on the others, so the load generator never takes a core a worker needs; with two, authz runs on both and
h2load shares the last (it costs a few microseconds per request, authz hundreds), which is what a 2-core machine
allows. The table says which CPUs each had. h2load's 8 connections are spread over the workers by the
kernel (SO_REUSEPORT, by connection), so the table also gives each worker's share of the checks.
"""

import os
import re
import statistics
import struct
import sys

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from authz_service.ext_authz import CALLER_SECRET_METADATA
from bench.harness import Fixture, run
from driftlock_cli.supervisor import Child, free_port, grpc_serving, start_child, wait_until

CONNECTIONS, STREAMS = 8, 16


def _check_frame(fixture: Fixture) -> bytes:
    """One billable Check as Envoy sends it, framed for gRPC (what h2load sends, over and over)."""
    from envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", "/api/v1/stream/detect"
    http.headers.update({"authorization": f"Bearer {fixture.secret}", "x-request-id": "bench", "host": "bench"})
    request.attributes.context_extensions.update({"scope": "detect", "billable": "true", "product": "stream"})
    body = request.SerializeToString()
    return struct.pack(">?I", False, len(body)) + body


def _rps(output: str) -> float:
    # h2load counts a gRPC error as a success (HTTP 200, the status is in the trailers): the server's counters
    # are checked after the runs.
    match = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", output)
    failed = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", output)
    if match is None or failed is None:
        raise RuntimeError(f"could not read h2load's output:\n{output}")
    if int(failed.group(2)):
        raise RuntimeError(f"h2load saw failures:\n{output}")
    return float(match.group(1))


async def _checks_by_worker(metrics_port: int) -> dict[tuple[str, str], float]:
    """driftlock_authz_checks_total by (worker, decision); worker "" for a single process."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "driftlock_authz_checks_total":
                key = (sample.labels.get("worker", ""), sample.labels["decision"])
                found[key] = found.get(key, 0.0) + sample.value
    return found


async def _workers_up(metrics_port: int) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "driftlock_authz_worker_up"
    )


async def _start(fixture: Fixture, workers: int, cpus: str) -> tuple[Child, int, int]:
    port, metrics_port = free_port(), free_port()
    argv = ["taskset", "-c", cpus, sys.executable, "-m", "driftlock_cli", "authz", "--workers", str(workers)]
    name = f"authz-{workers}w"
    child = await start_child(
        name, argv, env=fixture.authz_env(port, metrics_port), log_file=fixture.workdir / f"{name}.log"
    )
    if workers > 1:

        async def all_up() -> bool:
            return await _workers_up(metrics_port) == workers

        await wait_until(all_up, timeout=60, what=f"{workers} workers to serve", child=child)
    await wait_until(grpc_serving(f"127.0.0.1:{port}"), timeout=60, what=f"{name} to serve", child=child)
    return child, port, metrics_port


async def bench_workers(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    cpus = sorted(os.sched_getaffinity(0))
    # With three CPUs or more h2load gets one of its own. With two, authz may use both and h2load (C, a few
    # microseconds per request against authz's hundreds) shares the last one: dedicating a CPU to it would
    # leave authz one core, where two workers can at best match one.
    load_cpu, authz_cpus = (cpus[-1], cpus[:-1]) if len(cpus) > 2 else (cpus[-1], cpus)
    authz_list = ",".join(map(str, authz_cpus))
    frame = fixture.workdir / "workers-check.grpc"
    frame.write_bytes(_check_frame(fixture))
    sides = {1: await _start(fixture, 1, authz_list)}
    results: dict[int, list[float]] = {1: [], 2: []}
    try:
        sides[2] = await _start(fixture, 2, authz_list)
        for _ in range(rounds):
            for workers, (_child, port, _metrics) in sides.items():
                output = await run(
                    [
                        "taskset",
                        "-c",
                        str(load_cpu),
                        "h2load",
                        "-D",
                        str(max(1, round(seconds))),
                        "-c",
                        str(CONNECTIONS),
                        "-m",
                        str(STREAMS),
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
                results[workers].append(_rps(output))
        counts = {workers: await _checks_by_worker(metrics) for workers, (_c, _p, metrics) in sides.items()}
    finally:
        for child, _port, _metrics in sides.values():
            await child.stop(30)
    for workers, found in counts.items():
        denied = sum(n for (_w, decision), n in found.items() if decision == "deny")
        if denied or not found:
            raise RuntimeError(f"authz with {workers} worker(s) denied {denied:.0f} of the benchmark's checks")
    allowed = {w: n for (w, decision), n in counts[2].items() if decision == "allow"}
    total = sum(allowed.values()) or 1.0
    shares = " / ".join(f"{allowed.get(str(i), 0.0) / total:.0%}" for i in range(2))
    one, two = statistics.median(results[1]), statistics.median(results[2])
    if len(authz_cpus) == 1:
        room = ": authz has one CPU, so 2 workers can at best match 1"
    elif load_cpu in authz_cpus:
        room = f" (h2load shares CPU {load_cpu})"
    else:
        room = ""
    return [
        ("workers", f"1 worker (h2load {CONNECTIONS}x{STREAMS})", f"{one:,.0f} req/s", "1.00x"),
        ("workers", "2 workers (--workers 2)", f"{two:,.0f} req/s", f"{two / one:.2f}x 1 worker"),
        ("workers", "2 workers: share of the checks of worker 0 / 1", shares, ""),
        (
            "workers",
            "CPUs",
            f"h2load on CPU {load_cpu}",
            f"authz on CPU {authz_list} of {len(cpus)}{room}",
        ),
    ]

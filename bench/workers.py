"""Workers: authz as one process against `authz --workers 2`, over gRPC with h2load, interleaved (A B A B ...).

    python -m bench --only workers [--seconds 8] [--rounds 3]

h2load is pinned with `taskset` to one CPU (the last one this process may use). With three CPUs or more, authz
runs on the others, so the load generator never takes a core a worker needs; with two, authz runs on both and
h2load shares the last (it costs a few microseconds per request, authz hundreds), which is what a 2-core machine
allows. The table says which CPUs each had. h2load's 8 connections are spread over the workers by the
kernel (SO_REUSEPORT, by connection), so the table also gives each worker's share of the checks.
"""

import os
import statistics
import sys

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from bench.harness import Fixture, check_request_bytes, gauge_samples, grpc_frame, h2load_rps, run, scrape
from driftlock_cli.supervisor import Child, free_port, grpc_serving, start_child, wait_until

CONNECTIONS, STREAMS = 8, 16


async def _checks_by_worker(metrics_port: int) -> dict[tuple[str, str], float]:
    """driftlock_authz_checks_total by (worker, decision); worker "" for a single process."""
    found: dict[tuple[str, str], float] = {}
    for family in await scrape(metrics_port):
        for sample in family.samples:
            if sample.name == "driftlock_authz_checks_total":
                key = (sample.labels.get("worker", ""), sample.labels["decision"])
                found[key] = found.get(key, 0.0) + sample.value
    return found


async def _workers_up(metrics_port: int) -> float:
    return sum((await gauge_samples(metrics_port, "driftlock_authz_worker_up")).values())


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
    frame.write_bytes(
        grpc_frame(check_request_bytes(fixture.secret, {"scope": "detect", "billable": "true", "product": "stream"}))
    )
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
                results[workers].append(h2load_rps(output))
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

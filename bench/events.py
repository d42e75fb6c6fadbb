"""Events to the product: how many deliveries one authz process sustains, and the lag from a change to its
delivery under load.

    python -m bench --only events

One real authz process (its EventDeliverer) and one organisation endpoint: a receiver in this process that
answers 204 at once, so that the figures are the gateway's. BENCH_EVENTS sets the backlog (default 5,000).

- backlog:  that many events written in one transaction, then delivered: deliveries per second from the commit
            to the last acknowledgement (fan-out, claim, sign, POST, record).
- lag:      events written one per transaction at a steady rate (BENCH_EVENTS_RATE, default 100/s), each
            delivered as it comes: p50 and p99 of (arrival at the receiver - the event's occurred_at, i.e. its
            transaction's start). The NOTIFY at commit wakes the deliverer; without it, the 2 s poll would set
            the lag.
"""

import asyncio
import os
import statistics
import time
from datetime import datetime

from aiohttp import web

from bench.harness import Fixture, start_authz
from driftlock_cli.supervisor import free_port
from driftlock_kernel import db, event_endpoints, events, orgs
from driftlock_kernel.events import EventType


class Receiver:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.lags: list[float] = []
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.json()
        now = time.time()
        message_id = request.headers["webhook-id"]
        if message_id not in self.arrivals:
            self.arrivals[message_id] = now
            self.lags.append(now - datetime.fromisoformat(body["timestamp"]).timestamp())
        return web.Response(status=204)

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self.receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.arrivals)} of {count} events arrived within {timeout:.0f}s")
            await asyncio.sleep(0.01)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def bench_events(fixture: Fixture, seconds: float) -> list[tuple[str, str, str, str]]:
    backlog = int(os.environ.get("BENCH_EVENTS", "5000"))
    rate = float(os.environ.get("BENCH_EVENTS_RATE", "100"))
    receiver = await Receiver().start()
    pool = await db.create_pool(fixture.url, application_name="bench-events", max_size=2)
    async with pool.acquire() as conn:
        org = await orgs.create_org(conn, "bench-events")
        await event_endpoints.create_endpoint(
            conn, org.id, f"http://127.0.0.1:{receiver.port}/hook", [], allow_private=True
        )
    child, _port, _metrics = await start_authz(fixture, "authz-events", DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS="true")
    rows: list[tuple[str, str, str, str]] = []
    try:
        # The backlog, in one transaction: throughput.
        async with pool.acquire() as conn, conn.transaction():
            for n in range(backlog):
                await events.emit(conn, EventType.KEY_REVOKED, org.id, {"key_id": str(n)}, dedupe_key=None)
        started = time.time()
        await receiver.wait_for(backlog, timeout=600)
        took = max(receiver.arrivals.values()) - started
        rows.append(("events", f"backlog of {backlog}: deliveries/s, one process", f"{backlog / took:,.0f}", ""))

        # A steady rate, one event per transaction: the lag from the change to its delivery.
        receiver.lags.clear()
        before = len(receiver.arrivals)
        sent = 0
        begin = time.monotonic()
        async with pool.acquire() as conn:
            while (elapsed := time.monotonic() - begin) < seconds:
                due = int(elapsed * rate) + 1
                while sent < due:
                    await events.emit(conn, EventType.ORG_SUSPENDED, org.id, {"n": sent}, dedupe_key=None)
                    sent += 1
                await asyncio.sleep(0.002)
        await receiver.wait_for(before + sent, timeout=120)
        lags = [lag * 1000 for lag in receiver.lags]
        rows += [
            ("events", f"lag at {rate:.0f}/s, p50 ms ({sent} events)", f"{statistics.median(lags):.1f}", ""),
            ("events", f"lag at {rate:.0f}/s, p99 ms", f"{percentile(lags, 99):.1f}", ""),
        ]
    finally:
        await child.stop()
        await pool.close()
        if receiver.runner is not None:
            await receiver.runner.cleanup()
    return rows

"""The audit writer's bounded queue, and alert delivery with retries, against real servers."""

import json
import uuid
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import REGISTRY

from authz_service.alerts import AlertNotifier
from authz_service.audit import AuditEntry, AuditLog
from authz_service.meter_store import RaisedAlert
from driftlock_kernel import db
from tests.support.net import eventually, free_port
from tests.support.tcp_proxy import FaultProxy


def dropped() -> float:
    return REGISTRY.get_sample_value("driftlock_audit_entries_dropped_total") or 0.0


def entry(request_id: str) -> AuditEntry:
    """A denial of a known key: one row each (denials that name no key are counted instead)."""
    org_id, key_id = str(uuid.uuid4()), str(uuid.uuid4())
    return AuditEntry(datetime.now(UTC), request_id, org_id, key_id, "POST", "/api/v1/stream/detect", "deny", "x")


async def test_a_full_audit_queue_drops_and_counts_then_writes_the_rest(database_url, pool):
    proxy = await FaultProxy(database_url).start()
    proxied = await db.create_pool(proxy.url(), application_name="tests-audit", max_size=1, command_timeout=2)
    try:
        audit = AuditLog(proxied, max_queue=3)
        await proxy.cut()
        dropped_before = dropped()
        ids = [f"audit-{uuid.uuid4()}" for _ in range(5)]
        for request_id in ids:
            audit.add(entry(request_id))
        assert dropped() - dropped_before == 2
        assert not await audit.write_once()  # the database is away: kept for later
        await proxy.restore()

        async def written() -> bool:
            return await audit.write_once()

        await eventually(written, within=10, what="the audit queue written after the outage", interval=0.2)
        stored = await pool.fetch("SELECT request_id FROM driftlock.audit_log WHERE request_id = ANY($1::text[])", ids)
        assert sorted(r["request_id"] for r in stored) == sorted(ids[:3])
    finally:
        proxied.terminate()
        await proxy.stop()


async def test_alert_delivery_retries_until_the_receiver_accepts():
    received: list[dict] = []
    answers = [500, 503, 200]

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=answers[len(received) - 1])

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    outcomes: list[tuple[int, bool]] = []

    async def on_delivered(alert_id: int, delivered: bool) -> None:
        outcomes.append((alert_id, delivered))

    notifier = AlertNotifier(f"http://127.0.0.1:{port}/hook", on_delivered=on_delivered, first_delay=0.01)
    notifier.start()
    try:
        now = datetime.now(UTC)
        notifier.submit(
            RaisedAlert(
                id=7,
                org_id="org-1",
                period_start=now,
                period_end=now,
                threshold=90,
                used_units=90,
                included_units=100,
                plan="pro",
                created_at=now,
            )
        )

        async def delivered() -> bool:
            return outcomes == [(7, True)]

        await eventually(delivered, within=10, what="delivery after two failures")
    finally:
        await notifier.close()
        await runner.cleanup()
    assert len(received) == 3
    assert {json.dumps(r, sort_keys=True) for r in received} == {json.dumps(received[0], sort_keys=True)}
    assert received[0]["type"] == "usage.threshold_reached" and received[0]["threshold"] == 90

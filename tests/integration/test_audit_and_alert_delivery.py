"""The audit writer's bounded queue, and alert delivery from the stored rows (until acknowledged or expired,
across restarts and replicas, signed), against real servers."""

import json
import uuid
from datetime import UTC, datetime

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from authz_service.check.audit import AuditEntry, AuditLog
from authz_service.usage.alerts import SIGNATURE_HEADER, AlertNotifier
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


class Receiver:
    """An alert webhook receiver that answers from a script (then 200), verifying each signature the way
    docs/operations.md tells receivers to."""

    def __init__(self, secret: str, answers: list[int] | None = None):
        self.secret = secret
        self.answers = list(answers or [])
        self.received: list[dict] = []
        self.bad_signatures = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(body, request.headers.get(SIGNATURE_HEADER, ""), self.secret):
            self.bad_signatures += 1
            return web.Response(status=400)
        self.received.append(json.loads(body))
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._receive)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def ids(self) -> list[int]:
        return [r["id"] for r in self.received]


def verify(body: bytes, header: str, secret: str, tolerance: int = 300) -> bool:
    """The receiver's check, as documented: the timestamp is recent and one v1 is HMAC-SHA256("<t>.<body>")."""
    import hashlib
    import hmac
    import time

    fields = [item.split("=", 1) for item in header.split(",") if "=" in item]
    timestamps = [v for k, v in fields if k == "t"]
    if not timestamps or not timestamps[0].isdigit() or abs(time.time() - int(timestamps[0])) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamps[0]}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for k, v in fields if k == "v1")


SECRET = "s" * 40


@pytest.fixture
async def alert_db(fresh_database_url, transaction_pooler):
    """A database of its own: every authz replica delivers every due alert of its database, and the session's
    gateway (with its own alert receiver) runs on the shared one."""
    from driftlock_kernel import migrate, orgs

    async with db.connection(fresh_database_url, transaction_pooler=transaction_pooler) as conn:
        await migrate.migrate(conn)
        org = await orgs.create_org(conn, "alerts")
    pool = await db.create_pool(
        fresh_database_url, application_name="tests-alerts", max_size=4, transaction_pooler=transaction_pooler
    )
    yield pool, org
    await pool.close()


async def stored_alert(pool, org_id, threshold: int, *, created_ago_hours: float = 0.0) -> int:
    return await pool.fetchval(
        """INSERT INTO driftlock.usage_alerts (org_id, period_start, period_end, threshold, used_units,
                                               included_units, plan_name, created_at)
           VALUES ($1, date_trunc('month', now()), date_trunc('month', now()) + interval '1 month', $2::int,
                   $2::int, 100, 'pro', now() - $3 * interval '1 hour')
           RETURNING id""",
        org_id,
        threshold,
        created_ago_hours,
    )


def notifier(pool, receiver: Receiver, **options) -> AlertNotifier:
    options = {"poll_interval": 0.1, "first_delay": 0.05, "lease_seconds": 30.0, **options}
    return AlertNotifier(receiver.url, pool, [SECRET], **options)


async def alert_row(pool, alert_id: int) -> dict:
    return dict(await pool.fetchrow("SELECT * FROM driftlock.usage_alerts WHERE id = $1", alert_id))


async def test_an_alert_left_undelivered_by_a_previous_process_is_delivered_at_the_next_start(alert_db):
    pool, org = alert_db
    alert_id = await stored_alert(pool, org.id, 90)  # raised by a process that died before sending it
    receiver = await Receiver(SECRET).start()
    sender = notifier(pool, receiver)
    sender.start()
    try:

        async def delivered() -> bool:
            return (await alert_row(pool, alert_id))["webhook_delivered_at"] is not None

        await eventually(delivered, within=10, what="the stored alert delivered")
    finally:
        await sender.close()
        await receiver.stop()
    assert receiver.ids() == [alert_id] and receiver.bad_signatures == 0
    assert receiver.received[0]["type"] == "usage.threshold_reached" and receiver.received[0]["threshold"] == 90


async def test_alerts_are_retried_until_acknowledged_across_a_restart_and_sent_by_one_replica_at_a_time(alert_db):
    pool, org = alert_db
    ids = [await stored_alert(pool, org.id, threshold) for threshold in (70, 90, 100)]
    receiver = await Receiver(SECRET, answers=[500, 503, 500]).start()
    # Each alert's first attempt is refused; the next comes 1 to 3 s later, after the restart.
    first = notifier(pool, receiver, lease_seconds=2.0, http_timeout=1.0, first_delay=2.0)
    first.start()
    try:

        async def all_refused_once() -> bool:
            rows = [await alert_row(pool, i) for i in ids]
            return all(r["webhook_last_error"] is not None for r in rows)

        await eventually(all_refused_once, within=10, what="a refused attempt recorded for every alert")
        await first.close()  # a restart, with attempts left to make
        # A short lease, so that an attempt cut short by the restart would be claimed again within the wait.
        replicas = [notifier(pool, receiver, lease_seconds=2.0, http_timeout=1.0) for _ in range(2)]
        for replica in replicas:
            replica.start()

        async def all_delivered() -> bool:
            rows = [await alert_row(pool, i) for i in ids]
            return all(r["webhook_delivered_at"] is not None for r in rows)

        await eventually(all_delivered, within=15, what="every alert acknowledged")
        for replica in replicas:
            await replica.close()
    finally:
        await receiver.stop()
    # Two attempts each: one refused before the restart, one accepted after it, from one of the two replicas.
    assert sorted(receiver.ids()) == sorted(ids * 2), receiver.ids()
    assert receiver.bad_signatures == 0
    assert all(r["webhook_attempts"] == 2 for r in [await alert_row(pool, i) for i in ids])


async def test_an_alert_older_than_the_expiry_is_marked_expired_and_not_sent(alert_db, fresh_database_url):
    from tests.support.cli import run_cli

    pool, org = alert_db
    old = await stored_alert(pool, org.id, 70, created_ago_hours=80)
    fresh = await stored_alert(pool, org.id, 90)
    receiver = await Receiver(SECRET).start()
    sender = notifier(pool, receiver, expiry_seconds=72 * 3600)
    sender.start()
    try:

        async def settled() -> bool:
            return (await alert_row(pool, fresh))["webhook_delivered_at"] is not None and (await alert_row(pool, old))[
                "webhook_expired_at"
            ] is not None

        await eventually(settled, within=10, what="the fresh alert delivered and the old one expired")
    finally:
        await sender.close()
        await receiver.stop()
    assert receiver.ids() == [fresh]
    listed = run_cli("alerts", "list", "--org", str(org.id), "--json", database_url=fresh_database_url).json()["alerts"]
    assert {a["threshold"]: a["webhook_expired_at"] is not None for a in listed} == {70: True, 90: False}


async def test_a_forged_or_altered_alert_fails_the_documented_verification():
    from authz_service.usage.alerts import signature

    body = b'{"id": 1}'
    header = signature(body, [SECRET, "t" * 40], 1_900_000_000)
    assert header.startswith("t=1900000000,v1=") and header.count("v1=") == 2
    now_header = signature(body, [SECRET], int(__import__("time").time()))
    assert verify(body, now_header, SECRET)
    assert not verify(body + b" ", now_header, SECRET)
    assert not verify(body, now_header, "u" * 40)
    assert not verify(body, header, SECRET)  # too old

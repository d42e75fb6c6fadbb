"""Delivering events (driftlock.events) to every endpoint subscribed to them, at least once, in the Standard
Webhooks format. authz owns it (one owner); every replica runs an `EventDeliverer`, and the database decides who
sends what:

- Fan-out: events not fanned out yet are claimed with `FOR UPDATE SKIP LOCKED` and get one delivery row per
  enabled endpoint of their organisation subscribed to their type, plus one for the operator's endpoint
  (DRIFTLOCK_EVENTS_WEBHOOK_URL, every organisation's events). A unique (event, endpoint) makes a second fan-out
  a no-op.
- Delivery: due rows are claimed by one statement (`FOR UPDATE SKIP LOCKED` inside an UPDATE, which works through
  a transaction pooler) that also moves their next attempt a lease ahead, so no two replicas send one delivery
  at once; a replica that dies mid-send leaves the row to be claimed again when the lease ends.
- Retries: exponential backoff with jitter (5 s doubling to at most an hour) until a 2xx, or until the delivery is
  older than DRIFTLOCK_EVENTS_DELIVERY_EXPIRY_HOURS (72 by default: at least 3 days of retries), when it is
  marked failed. Every attempt carries the event's id as `webhook-id`, so receivers deduplicate on it.
- An endpoint whose every attempt failed for DRIFTLOCK_EVENTS_DISABLE_AFTER_HOURS (120) is disabled, and the
  operator gets an `event_endpoint.disabled` event; an update of the endpoint enables it again.
- Events of the clock (`key.expiring` 7 days and 1 day ahead, `billing.service_restricted` when a grace period
  ends) are found by a scan every minute; their dedupe key makes each one event whichever replica finds it.

No SSRF: a customer's URL is checked when it is stored and again at every attempt, on the addresses the
connection actually uses (a resolver that refuses private, loopback, link-local and metadata addresses, unless
DRIFTLOCK_EVENTS_ALLOW_PRIVATE_URLS; metadata addresses always). Redirects are not followed, attempts time out,
and at most a small piece of an answer's body is read.
"""

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import aiohttp.abc
import asyncpg

from authz_service import metrics
from authz_service.usage.alerts import retry_delay
from driftlock_kernel import db, events
from driftlock_kernel.background import BackgroundTask, wait_set
from driftlock_kernel.billing import BillingPolicy
from driftlock_kernel.errors import one_line
from driftlock_kernel.keys import redact_keys
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "driftlock_events"
ANSWER_BYTES_READ = 512
# Attempts that finish within this are recorded together (one statement for their acknowledgements).
COALESCE_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class OperatorEndpoint:
    """DRIFTLOCK_EVENTS_WEBHOOK_URL and the keys its events are signed with (several while one rotates)."""

    url: str
    keys: tuple[bytes, ...]


class AddressRefused(OSError):
    pass


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """Resolves like the system and refuses a name when any address it resolves to may not receive events: the
    check is made on the very addresses the connection is made to, so a name that changes its answer between
    the check and the connection (DNS rebinding) gains nothing."""

    def __init__(self, *, allow_private: bool):
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            refusal = events.address_refusal(result["host"], allow_private=self._allow_private)
            if refusal is not None:
                raise AddressRefused(f"{host}: {refusal}")
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    event_id: str
    endpoint_id: uuid.UUID | None
    attempts: int
    type: str
    org_id: uuid.UUID | None
    data: dict[str, Any]
    occurred_at: datetime
    created_at: datetime
    url: str | None
    secret: str | None


FAN_OUT_SQL = """
WITH claimed AS (
    SELECT id, org_id, type, operator_only FROM driftlock.events
    WHERE fanned_out_at IS NULL
    ORDER BY occurred_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), inserted AS (
    INSERT INTO driftlock.event_deliveries (event_id, endpoint_id)
    SELECT c.id, ep.id FROM claimed c
    JOIN driftlock.event_endpoints ep
      ON ep.org_id = c.org_id AND NOT c.operator_only AND ep.disabled_at IS NULL
     AND (cardinality(ep.event_types) = 0 OR c.type = ANY (ep.event_types))
    UNION ALL
    SELECT c.id, NULL FROM claimed c WHERE $2
    ON CONFLICT DO NOTHING
    RETURNING 1
), marked AS (
    UPDATE driftlock.events e SET fanned_out_at = now() FROM claimed c WHERE e.id = c.id RETURNING 1
)
SELECT (SELECT count(*) FROM marked) AS events, (SELECT count(*) FROM inserted) AS deliveries
"""
EXPIRE_SQL = """
UPDATE driftlock.event_deliveries SET state = 'failed'
WHERE state = 'pending' AND created_at < now() - $1 * interval '1 second'
RETURNING id, event_id, endpoint_id
"""
CLAIM_SQL = """
WITH claimed AS (
    UPDATE driftlock.event_deliveries d
    SET next_attempt_at = now() + $2 * interval '1 second', attempts = d.attempts + 1, last_attempt_at = now()
    WHERE d.id IN (
        SELECT d2.id FROM driftlock.event_deliveries d2
        LEFT JOIN driftlock.event_endpoints ep ON ep.id = d2.endpoint_id
        WHERE d2.state = 'pending' AND d2.next_attempt_at <= now()
          -- None of an endpoint that has its fill in flight here already ($4): a slow one cannot take every
          -- sender.
          AND CASE WHEN d2.endpoint_id IS NULL THEN $3
                   ELSE ep.disabled_at IS NULL AND d2.endpoint_id <> ALL ($4::uuid[]) END
        ORDER BY d2.next_attempt_at
        LIMIT $1
        FOR UPDATE OF d2 SKIP LOCKED)
    RETURNING d.id, d.event_id, d.endpoint_id, d.attempts, d.created_at
)
SELECT c.id, c.event_id, c.endpoint_id, c.attempts, c.created_at, e.type, e.org_id, e.data, e.occurred_at,
       ep.url, ep.secret
FROM claimed c
JOIN driftlock.events e ON e.id = c.event_id
LEFT JOIN driftlock.event_endpoints ep ON ep.id = c.endpoint_id
"""
DELIVERED_SQL = """
UPDATE driftlock.event_deliveries d
SET state = 'delivered', delivered_at = now(), last_status = acked.status, last_error = NULL
FROM unnest($1::bigint[], $2::int[]) AS acked (id, status)
WHERE d.id = acked.id AND d.state = 'pending'
"""
ENDPOINT_OK_SQL = """
UPDATE driftlock.event_endpoints SET failing_since = NULL WHERE id = ANY ($1::uuid[]) AND failing_since IS NOT NULL
"""
ALERT_DELIVERED_SQL = """
UPDATE driftlock.usage_alerts
SET webhook_delivered_at = coalesce(webhook_delivered_at, now()), webhook_attempts = $2, webhook_last_error = NULL
WHERE id = $1::bigint
"""
RETRY_SQL = """
UPDATE driftlock.event_deliveries
SET next_attempt_at = now() + $2 * interval '1 second', last_status = $3, last_error = $4
WHERE id = $1 AND state = 'pending'
"""
ENDPOINT_FAILED_SQL = """
UPDATE driftlock.event_endpoints SET failing_since = coalesce(failing_since, now()) WHERE id = $1
"""
DISABLE_SQL = """
UPDATE driftlock.event_endpoints
SET disabled_at = now(), disabled_reason = $3, updated_at = now()
WHERE id = $1 AND disabled_at IS NULL AND failing_since <= now() - $2 * interval '1 second'
RETURNING id, org_id, url, failing_since, disabled_at
"""
OPERATOR_ONLY_SQL = "UPDATE driftlock.events SET operator_only = true WHERE id = $1"
# Each key warned about once per window and expiry (a new expiry is warned about again); keys created inside a
# window were given that expiry knowingly and are not warned about in it.
KEY_EXPIRING_SQL = """
SELECT count(driftlock.emit_event('key.expiring', k.org_id,
           jsonb_build_object('key_id', k.id, 'name', k.name, 'expires_at', k.expires_at, 'days_before', w.days),
           'key.expiring:' || w.days || 'd:' || k.id || ':' || extract(epoch FROM k.expires_at)::bigint))
FROM driftlock.api_keys k CROSS JOIN (VALUES (7), (1)) AS w(days)
WHERE k.revoked_at IS NULL AND k.rolled_to IS NULL
  AND k.expires_at > now() AND k.expires_at <= now() + w.days * interval '1 day'
  AND (w.days = 1 OR k.expires_at > now() + interval '1 day')
  AND k.created_at <= k.expires_at - w.days * interval '1 day'
"""
# Restrictions that began in the last few days (not every one of an organisation overdue for months, at once).
SERVICE_RESTRICTED_SQL = """
SELECT count(driftlock.emit_event('billing.service_restricted', o.id,
           jsonb_build_object('past_due_since', o.past_due_since, 'billing_status', o.billing_status,
                              'restricted_at', o.past_due_since + $1 * interval '1 second'),
           'billing.service_restricted:' || o.id || ':' || extract(epoch FROM o.past_due_since)::bigint))
FROM driftlock.organizations o
WHERE o.billing_status IN ('past_due', 'unpaid') AND o.past_due_since IS NOT NULL
  AND o.past_due_since + $1 * interval '1 second' <= now()
  AND o.past_due_since + $1 * interval '1 second' > now() - interval '3 days'
"""


class EventDeliverer:
    """Fans events out to endpoints and delivers them from a background task; see the module docstring."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        operator: OperatorEndpoint | None = None,
        allow_private: bool = False,
        policy: BillingPolicy | None = None,
        expiry_seconds: float = 72 * 3600,
        disable_after_seconds: float = 120 * 3600,
        poll_interval: float = 2.0,
        scan_interval: float = 60.0,
        lease_seconds: float = 60.0,
        first_delay: float = 5.0,
        max_delay: float = 3600.0,
        http_timeout: float = 10.0,
        batch: int = 100,
        max_in_flight: int = 200,
        per_endpoint_limit: int = 20,
    ):
        self._outage_log = RepeatedLog(log)
        if lease_seconds <= http_timeout:
            raise ValueError("the lease must outlast an attempt, or two replicas could send one delivery at once")
        self._pool = pool
        self._operator = operator
        self._allow_private = allow_private
        self._policy = policy
        self._expiry = expiry_seconds
        self._disable_after = disable_after_seconds
        self._poll_interval = poll_interval
        self._scan_interval = scan_interval
        self._lease = lease_seconds
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._http_timeout = http_timeout
        self._batch = batch
        self._max_in_flight = max_in_flight
        self._per_endpoint_limit = per_endpoint_limit
        self._in_flight: set[asyncio.Task[None]] = set()
        self._per_endpoint: dict[uuid.UUID | None, int] = {}
        self._finished: list[tuple[Claimed, bool, int | None, str | None]] = []
        self._wake = asyncio.Event()
        self._customer_session: aiohttp.ClientSession | None = None
        self._operator_session: aiohttp.ClientSession | None = None
        self._last_scan = 0.0
        self._last_poll = 0.0
        self._new_events = True
        self._wake_soon: asyncio.TimerHandle | None = None
        self._worker = BackgroundTask("event-deliverer", self._run)

    def _session(self, *, allow_private: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(allow_private=allow_private), use_dns_cache=False, limit=100
        )
        return aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self._http_timeout), trust_env=False
        )

    def start(self) -> None:
        # The operator chose their URL: only metadata addresses are refused for it.
        self._customer_session = self._session(allow_private=self._allow_private)
        self._operator_session = self._session(allow_private=True)
        self._worker.start()

    def _woken(self) -> None:
        self._wake_soon = None
        self._wake.set()

    def wake(self, *_: object) -> None:
        """Look for work now (an event was just written) rather than at the next poll."""
        self._new_events = True
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except db.DATABASE_ERRORS as error:
                # An outage fails every poll the same way: the first at once, then one count a minute.
                self._outage_log.warning("poll", "could not read events to deliver (will retry): %s", one_line(error))
            await wait_set(self._wake, self._poll_interval)
            self._wake.clear()

    async def run_once(self) -> int:
        """One round: scan the clock (when due), fan out, expire, record what finished, and start sending what
        is due, as far as the limits on deliveries in flight allow; the deliveries started."""
        now = time.monotonic()
        if now - self._last_scan >= self._scan_interval:
            await self.scan_clock()
        # A finished attempt wakes the loop too: then only record it and claim more, without the other queries.
        if self._new_events or now - self._last_poll >= self._poll_interval:
            self._new_events = False
            self._last_poll = now
            while await self.fan_out() == self._batch:
                pass
            await self.expire()
        await self._record_finished()
        started = 0
        # Refilled in chunks, not one claim per finished attempt.
        refill = max(1, min(self._batch, self._max_in_flight) // 4)
        while (room := min(self._batch, self._max_in_flight - len(self._in_flight))) >= refill or (
            room > 0 and not self._in_flight
        ):
            claimed = await self._claim(room)
            for delivery in claimed:
                self._start(delivery)
            started += len(claimed)
            if len(claimed) < room:
                break
        return started

    async def _claim(self, limit: int) -> list[Claimed]:
        busy = [e for e, n in self._per_endpoint.items() if e is not None and n >= self._per_endpoint_limit]
        operator_ok = self._operator is not None and self._per_endpoint.get(None, 0) < self._per_endpoint_limit
        rows = await self._pool.fetch(CLAIM_SQL, limit, self._lease, operator_ok, busy)
        return [db.from_row(Claimed, row) for row in rows]

    def _start(self, delivery: Claimed) -> None:
        self._per_endpoint[delivery.endpoint_id] = self._per_endpoint.get(delivery.endpoint_id, 0) + 1

        async def send() -> None:
            try:
                self._finished.append((delivery, *await self._post(delivery)))
            finally:
                left = self._per_endpoint.get(delivery.endpoint_id, 1) - 1
                if left:
                    self._per_endpoint[delivery.endpoint_id] = left
                else:
                    self._per_endpoint.pop(delivery.endpoint_id, None)
                # Record it and claim more soon, together with whatever else finishes meanwhile.
                if self._wake_soon is None:
                    self._wake_soon = asyncio.get_running_loop().call_later(COALESCE_SECONDS, self._woken)

        task = asyncio.create_task(send(), name=f"deliver-{delivery.id}")
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def deliver_due(self) -> int:
        """Send what is due and wait for every attempt to finish and be recorded (tests, the CLI); the number
        claimed."""
        started = await self.run_once()
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))
        await self._record_finished()
        return started

    async def _record_finished(self) -> None:
        finished, self._finished = self._finished, []
        acknowledged = [(d, status) for d, ok, status, _ in finished if ok]
        if acknowledged:
            await self._record_delivered(acknowledged)
        for delivery, ok, status, reason in finished:
            if not ok:
                await self._record_failure(delivery, status, reason or "")

    async def scan_clock(self) -> int:
        """Write the events that time alone brings about; the number written now."""
        self._last_scan = time.monotonic()
        written = int(await self._pool.fetchval(KEY_EXPIRING_SQL) or 0)
        if self._policy is not None and self._policy.block_billable_when_overdue:
            written += int(await self._pool.fetchval(SERVICE_RESTRICTED_SQL, self._policy.grace_seconds) or 0)
        return written

    async def fan_out(self) -> int:
        row = await self._pool.fetchrow(FAN_OUT_SQL, self._batch, self._operator is not None)
        return int(row["events"]) if row else 0

    async def expire(self) -> None:
        for row in await self._pool.fetch(EXPIRE_SQL, self._expiry):
            metrics.EVENT_DELIVERIES.labels(outcome="gave_up").inc()
            log.error(
                "event %s to %s not acknowledged within %.0f h; no longer sent",
                row["event_id"],
                f"endpoint {row['endpoint_id']}" if row["endpoint_id"] else "the operator's endpoint",
                self._expiry / 3600,
            )

    async def _post(self, delivery: Claimed) -> tuple[bool, int | None, str | None]:
        """(acknowledged, HTTP status, why not)."""
        if delivery.endpoint_id is None:
            if self._operator is None:
                return False, None, "no operator endpoint is configured"
            url, keys, session = self._operator.url, self._operator.keys, self._operator_session
            allow_private = True
        else:
            url, keys, session = str(delivery.url), (events.secret_key(str(delivery.secret)),), self._customer_session
            allow_private = self._allow_private
        if session is None:
            raise RuntimeError("EventDeliverer.start() was not called")
        try:
            host, _ = events.check_url_shape(url)
        except events.UrlRefused as error:
            return False, None, str(error)
        # An address written in the URL never reaches the resolver: checked here.
        refusal = events.address_refusal(host, allow_private=allow_private) if _is_ip(host) else None
        if refusal is not None:
            return False, None, refusal
        payload = events.body(delivery.type, delivery.occurred_at, delivery.data)
        headers = events.headers(keys, delivery.event_id, int(time.time()), payload)
        try:
            async with session.post(url, data=payload, headers=headers, allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return True, response.status, None
                answer = await response.content.read(ANSWER_BYTES_READ)
                text = " ".join(answer.decode("utf-8", "replace").split())[:200]
                return False, response.status, f"HTTP {response.status}" + (f": {text}" if text else "")
        except AddressRefused as error:
            return False, None, str(error)
        except aiohttp.ClientConnectorError as error:
            cause = error.os_error if isinstance(error.os_error, AddressRefused) else error
            return False, None, f"{type(cause).__name__}: {one_line(cause)}"
        except (aiohttp.ClientError, TimeoutError) as error:
            return False, None, f"{type(error).__name__}: {one_line(error) or 'timed out'}"

    async def _record_delivered(self, acknowledged: list[tuple[Claimed, int | None]]) -> None:
        """One statement for the batch's acknowledgements (a delivery per statement caps what a process sends)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    DELIVERED_SQL, [d.id for d, _ in acknowledged], [status or 0 for _, status in acknowledged]
                )
                endpoints = list({d.endpoint_id for d, _ in acknowledged if d.endpoint_id is not None})
                if endpoints:
                    await conn.execute(ENDPOINT_OK_SQL, endpoints)
                for delivery, _ in acknowledged:
                    if delivery.endpoint_id is None and delivery.type == events.EventType.USAGE_THRESHOLD_REACHED:
                        # `alerts list` still says when the operator acknowledged an alert.
                        await conn.execute(ALERT_DELIVERED_SQL, delivery.data.get("alert_id"), delivery.attempts)
        except db.DATABASE_ERRORS as error:
            # The leases end on their own: these are claimed and sent again later (at least once).
            log.warning("could not record %d delivered events: %s", len(acknowledged), one_line(error))
            return
        now = time.time()
        for delivery, _ in acknowledged:
            metrics.EVENT_DELIVERIES.labels(outcome="delivered").inc()
            metrics.EVENT_DELIVERY_LAG.observe(max(0.0, now - delivery.occurred_at.timestamp()))

    async def _record_failure(self, delivery: Claimed, status: int | None, reason: str) -> None:
        delay = retry_delay(delivery.attempts, self._first_delay, self._max_delay)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(RETRY_SQL, delivery.id, delay, status, redact_keys(reason)[:500])
                if delivery.endpoint_id is not None:
                    await conn.execute(ENDPOINT_FAILED_SQL, delivery.endpoint_id)
                    await self._disable_if_failing(conn, delivery.endpoint_id, reason)
        except db.DATABASE_ERRORS as error:
            log.warning("could not record the attempt to deliver %s: %s", delivery.event_id, one_line(error))
            return
        metrics.EVENT_DELIVERIES.labels(outcome="retry").inc()
        log.warning(
            "event %s (%s) delivery attempt %d to %s failed (%s); next in %.0fs",
            delivery.event_id,
            delivery.type,
            delivery.attempts,
            f"endpoint {delivery.endpoint_id}" if delivery.endpoint_id else "the operator's endpoint",
            redact_keys(reason),
            delay,
        )

    async def _disable_if_failing(self, conn: db.Connection, endpoint_id: uuid.UUID, reason: str) -> None:
        hours = self._disable_after / 3600
        row = await conn.fetchrow(
            DISABLE_SQL, endpoint_id, self._disable_after, f"every attempt failed for {hours:g} h; last: {reason}"[:500]
        )
        if row is None:
            return
        event_id = await events.emit(
            conn,
            events.EventType.ENDPOINT_DISABLED,
            row["org_id"],
            {"endpoint_id": row["id"], "url": row["url"], "failing_since": row["failing_since"], "last_error": reason},
            dedupe_key=f"event_endpoint.disabled:{row['id']}:{row['disabled_at'].timestamp()}",
        )
        if event_id is not None:
            await conn.execute(OPERATOR_ONLY_SQL, event_id)
        log.error("event endpoint %s of organisation %s disabled: %s", row["id"], row["org_id"], reason)

    async def close(self) -> None:
        """Stop; a delivery still being sent keeps its lease and is sent again by whoever claims it next, and
        what was acknowledged is recorded (else it too would be sent again: at least once)."""
        await self._worker.stop()
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        with contextlib.suppress(*db.DATABASE_ERRORS):
            await self._record_finished()
        for session in (self._customer_session, self._operator_session):
            if session is not None:
                await session.close()


def _is_ip(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.strip("[]"))
    except OSError:
        return False
    return True

"""Usage alerts at 70, 90 and 100 % of a plan's included units, and their delivery to DRIFTLOCK_ALERT_WEBHOOK_URL.

Which thresholds a total has reached is a plain function. Raising them is the database's job (a unique row per
organisation, period and threshold, so racing replicas raise each one once). Delivering them is the outbox's:

- Every replica runs an `AlertNotifier`. It delivers from the stored rows, not from memory: it claims the rows
  that are due with one statement (`FOR UPDATE SKIP LOCKED` inside an UPDATE, which works through a transaction
  pooler), which also moves their next attempt a lease ahead, so while one replica is sending an alert no other
  picks it up (one sender per alert). A replica that dies while sending leaves the row to be claimed again when
  the lease ends, by any replica or by its own next start.
- An alert is sent until the receiver acknowledges it with a 2xx, with exponential backoff and jitter between
  attempts (1 s, 2 s, 4 s, ... at most an hour), or until it is older than DRIFTLOCK_ALERT_DELIVERY_EXPIRY_HOURS
  (72, like Stripe's retries), when it is marked expired and no longer sent. Delivery is at least once: a
  receiver deduplicates on the alert's `id`.
- Each POST is signed like Stripe's webhooks: `DriftLock-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of
  "<t>.<body>" with DRIFTLOCK_ALERT_WEBHOOK_SECRET>` (one v1 per configured secret, while a secret is rotated).
  docs/operations.md shows how a receiver verifies it.
"""

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Sequence

import aiohttp
import asyncpg

from authz_service import metrics
from authz_service.usage.meter_store import UsageAlert
from driftlock_kernel import db
from driftlock_kernel.background import BackgroundTask, wait_set
from driftlock_kernel.errors import one_line
from driftlock_kernel.jsonfmt import to_json
from driftlock_kernel.keys import redact_keys

log = logging.getLogger(__name__)

THRESHOLDS = (70, 90, 100)
SIGNATURE_HEADER = "DriftLock-Signature"


def thresholds_reached(used_units: int, included_units: int) -> tuple[int, ...]:
    """Thresholds that `used_units` has reached; none for a plan that includes nothing."""
    if included_units <= 0:
        return ()
    return tuple(t for t in THRESHOLDS if used_units * 100 >= t * included_units)


def alert_payload(alert: UsageAlert) -> dict[str, object]:
    return {
        "type": "usage.threshold_reached",
        "id": alert.id,
        "org_id": alert.org_id,
        "threshold": alert.threshold,
        "used_units": alert.used_units,
        "included_units": alert.included_units,
        "plan": alert.plan,
        "period_start": alert.period_start,
        "period_end": alert.period_end,
        "created_at": alert.created_at,
    }


def signature(body: bytes, secrets: Sequence[str], timestamp: int) -> str:
    """The DriftLock-Signature header for `body`: `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`,
    one v1 per secret."""
    signed = f"{timestamp}.".encode() + body
    digests = [hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest() for secret in secrets]
    return ",".join([f"t={timestamp}", *(f"v1={digest}" for digest in digests)])


def retry_delay(attempts: int, first: float, most: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones: doubling from `first`, at most `most`, with
    jitter (between half and one and a half of it) so that replicas do not retry in step."""
    base = min(most, first * 2 ** max(0, attempts - 1))
    return base * (0.5 + random.random())


# Expire what is too old, then claim what is due; each statement a transaction of its own.
EXPIRE_SQL = """
UPDATE driftlock.usage_alerts SET webhook_expired_at = now()
WHERE webhook_delivered_at IS NULL AND webhook_expired_at IS NULL AND created_at < now() - $1 * interval '1 second'
RETURNING id
"""
CLAIM_SQL = """
UPDATE driftlock.usage_alerts a
SET webhook_next_attempt_at = now() + $2 * interval '1 second', webhook_attempts = a.webhook_attempts + 1
WHERE a.id IN (
    SELECT id FROM driftlock.usage_alerts
    WHERE webhook_delivered_at IS NULL AND webhook_expired_at IS NULL AND webhook_next_attempt_at <= now()
    ORDER BY webhook_next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED)
RETURNING a.id, a.org_id::text AS org_id, a.period_start, a.period_end, a.threshold, a.used_units,
          a.included_units, a.plan_name AS plan, a.created_at, a.webhook_attempts
"""
DELIVERED_SQL = """
UPDATE driftlock.usage_alerts SET webhook_delivered_at = now(), webhook_last_error = NULL WHERE id = $1
"""
RETRY_SQL = """
UPDATE driftlock.usage_alerts SET webhook_next_attempt_at = now() + $2 * interval '1 second', webhook_last_error = $3
WHERE id = $1 AND webhook_delivered_at IS NULL
"""


class AlertNotifier:
    """Delivers stored alerts to a webhook URL from a background task, until acknowledged or expired."""

    def __init__(
        self,
        url: str,
        pool: asyncpg.Pool,
        secrets: Sequence[str],
        *,
        expiry_seconds: float = 72 * 3600,
        poll_interval: float = 5.0,
        lease_seconds: float = 60.0,
        first_delay: float = 1.0,
        max_delay: float = 3600.0,
        http_timeout: float = 10.0,
        batch: int = 50,
    ):
        if not secrets:
            raise ValueError("alert webhooks are signed: at least one secret is required")
        if lease_seconds <= http_timeout:
            raise ValueError("the lease must outlast an attempt, or two replicas could send one alert at once")
        self._url = url
        self._pool = pool
        self._secrets = tuple(secrets)
        self._expiry = expiry_seconds
        self._poll_interval = poll_interval
        self._lease = lease_seconds
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._http_timeout = http_timeout
        self._batch = batch
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._worker = BackgroundTask("alert-notifier", self._run)

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._http_timeout))
        self._worker.start()

    def wake(self) -> None:
        """Look for due alerts now (this replica just raised one) rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                while await self.deliver_due() == self._batch:
                    pass  # a full batch: there may be more due
            except db.DATABASE_ERRORS as error:
                log.warning("could not read usage alerts to deliver (will retry): %s", one_line(error))
            await wait_set(self._wake, self._poll_interval)
            self._wake.clear()

    async def deliver_due(self) -> int:
        """Expire what is too old, claim what is due and send it; returns the alerts claimed."""
        expired = await self._pool.fetch(EXPIRE_SQL, self._expiry)
        for row in expired:
            metrics.ALERT_DELIVERIES.labels(outcome="gave_up").inc()
            log.error("usage alert %s not acknowledged within %.0f h; no longer sent", row["id"], self._expiry / 3600)
        claimed = [db.from_row(UsageAlert, row) for row in await self._pool.fetch(CLAIM_SQL, self._batch, self._lease)]
        if claimed:
            await asyncio.gather(*(self._deliver(alert) for alert in claimed))
        return len(claimed)

    async def _deliver(self, alert: UsageAlert) -> None:
        if self._session is None:
            raise RuntimeError("AlertNotifier.start() was not called")
        body = to_json(alert_payload(alert)).encode()
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature(body, self._secrets, int(time.time())),
        }
        try:
            async with self._session.post(self._url, data=body, headers=headers) as response:
                delivered = 200 <= response.status < 300
                reason = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            delivered, reason = False, f"{type(error).__name__}: {one_line(error)}"
        try:
            if delivered:
                await self._pool.execute(DELIVERED_SQL, alert.id)
                metrics.ALERT_DELIVERIES.labels(outcome="delivered").inc()
                return
            delay = retry_delay(alert.webhook_attempts, self._first_delay, self._max_delay)
            await self._pool.execute(RETRY_SQL, alert.id, delay, redact_keys(reason)[:500])
        except db.DATABASE_ERRORS as error:
            # The lease ends on its own: the alert is claimed (and, if it was delivered, sent) again later.
            log.warning("could not record the delivery attempt of alert %s: %s", alert.id, one_line(error))
            return
        metrics.ALERT_DELIVERIES.labels(outcome="retry").inc()
        log.warning(
            "alert %s delivery attempt %d failed (%s); next in %.0fs", alert.id, alert.webhook_attempts, reason, delay
        )

    async def close(self) -> None:
        """Stop; an alert being sent keeps its lease and is sent again by whoever claims it next."""
        await self._worker.stop()
        if self._session is not None:
            await self._session.close()

"""Usage alerts at 70, 90 and 100 % of a plan's included units.

Which thresholds a total has reached is a plain function. Raising them is the database's job (a unique row per
organisation, period and threshold, so racing replicas raise each one once); telling someone is the notifier's:
it POSTs each alert this replica raised to DRIFTLOCK_ALERT_WEBHOOK_URL, with retries and backoff, off the
request path. Delivery is at least once; a receiver deduplicates on the alert's `id`.
"""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import aiohttp

from authz_service import metrics
from authz_service.meter_store import RaisedAlert
from driftlock_kernel.background import BackgroundTask
from driftlock_kernel.jsonfmt import to_json

log = logging.getLogger(__name__)

THRESHOLDS = (70, 90, 100)


def thresholds_reached(used_units: int, included_units: int) -> tuple[int, ...]:
    """Thresholds that `used_units` has reached; none for a plan that includes nothing."""
    if included_units <= 0:
        return ()
    return tuple(t for t in THRESHOLDS if used_units * 100 >= t * included_units)


def alert_payload(alert: RaisedAlert) -> dict[str, object]:
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


class AlertNotifier:
    """Delivers alerts to a webhook URL from a background task; `submit` never blocks."""

    def __init__(
        self,
        url: str,
        *,
        on_delivered: Callable[[int, bool], Awaitable[None]],
        max_attempts: int = 8,
        first_delay: float = 0.5,
        max_delay: float = 60.0,
        queue_size: int = 10_000,
    ):
        self._url = url
        self._on_delivered = on_delivered
        self._max_attempts = max_attempts
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._queue: asyncio.Queue[RaisedAlert] = asyncio.Queue(queue_size)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._worker = BackgroundTask("alert-notifier", self._run)

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._worker.start()

    def submit(self, alert: RaisedAlert) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            log.error("alert queue full; alert %s stays undelivered in the database", alert.id)

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            # Each alert retries on its own, so one slow receiver does not hold back the others.
            task = asyncio.create_task(self._deliver(alert))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, alert: RaisedAlert) -> None:
        if self._session is None:
            raise RuntimeError("AlertNotifier.start() was not called")
        body = to_json(alert_payload(alert))
        delay = self._first_delay
        for attempt in range(1, self._max_attempts + 1):
            try:
                async with self._session.post(
                    self._url, data=body, headers={"content-type": "application/json"}
                ) as response:
                    if 200 <= response.status < 300:
                        metrics.ALERT_DELIVERIES.labels(outcome="delivered").inc()
                        await self._on_delivered(alert.id, True)
                        return
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                reason = type(error).__name__
            metrics.ALERT_DELIVERIES.labels(outcome="retry").inc()
            log.warning("alert %s delivery attempt %d failed: %s", alert.id, attempt, reason)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self._max_delay)
        metrics.ALERT_DELIVERIES.labels(outcome="gave_up").inc()
        await self._on_delivered(alert.id, False)

    async def close(self, timeout: float = 5.0) -> None:
        """Give deliveries under way a moment to finish; the rest stay marked undelivered in the database."""
        await self._worker.stop()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
        if self._session is not None:
            await self._session.close()

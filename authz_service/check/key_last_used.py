"""When each key was last used: noted in memory on every check (a dict assignment), written in one statement
every few seconds, never once per request.

A failed write keeps the times for the next one (merged, newest wins); at shutdown the last times are written
once more. The times are those of the checks, to the second: a dashboard's "last used", not an access log.
"""

import logging
from datetime import UTC, datetime

import asyncpg

from authz_service import metrics
from driftlock_kernel import api_keys, db
from driftlock_kernel.background import every
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)

# Bounds memory when the database is down for long: keys beyond this many wait for a later check.
MAX_PENDING_KEYS = 200_000


class LastUsedRecorder:
    def __init__(self, pool: asyncpg.Pool, *, interval: float):
        self._pool = pool
        self._pending: dict[str, float] = {}
        self._writer = every(interval, self.write_once, name="key-last-used")

    def touch(self, key_id: str, now: float) -> None:
        if key_id in self._pending or len(self._pending) < MAX_PENDING_KEYS:
            self._pending[key_id] = now

    def start(self) -> None:
        self._writer.start()

    async def write_once(self) -> bool:
        if not self._pending:
            return True
        batch, self._pending = self._pending, {}
        try:
            metrics.DB_QUERIES.labels(query="key_last_used").inc()
            async with self._pool.acquire() as conn:
                await api_keys.record_last_used(
                    conn, {key_id: datetime.fromtimestamp(at, UTC) for key_id, at in batch.items()}
                )
        except db.DATABASE_ERRORS as error:
            metrics.KEY_LAST_USED_WRITES.labels(outcome="failed").inc()
            log.warning("could not write the last use of %d keys (kept): %s", len(batch), one_line(error))
            for key_id, at in batch.items():
                if self._pending.get(key_id, 0.0) < at:
                    self._pending[key_id] = at
            return False
        metrics.KEY_LAST_USED_WRITES.labels(outcome="written").inc()
        return True

    async def close(self) -> None:
        await self._writer.stop()
        await self.write_once()

"""The audit log: every denial and a sample of allows, written in batches off the request path.

`add()` never waits: entries go to a bounded queue; when it is full (the database slow or down for long), new
entries are dropped and counted in `driftlock_audit_entries_dropped_total` rather than slowing checks. Keys are
never recorded, only their ids; paths without their query string.
"""

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from authz_service import metrics
from driftlock_kernel import db
from driftlock_kernel.background import every
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)

MAX_PATH = 512

INSERT_SQL = """
INSERT INTO driftlock.audit_log (at, request_id, org_id, key_id, method, path, decision, code)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                     $8::text[])
"""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: datetime
    request_id: str
    org_id: str | None
    key_id: str | None
    method: str
    path: str
    decision: str  # "allow" | "deny"
    code: str  # a contract code, or "ok"


def audit_path(path: str) -> str:
    return path.split("?", 1)[0][:MAX_PATH]


class AuditLog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        allow_sample_rate: float = 0.01,
        max_queue: int = 50_000,
        batch_size: int = 5_000,
        flush_interval: float = 1.0,
    ):
        self._pool = pool
        self._allow_sample_rate = allow_sample_rate
        self._queue: deque[AuditEntry] = deque()
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._writer = every(flush_interval, self._write_all, name="audit-writer")

    def wants_allow(self) -> bool:
        rate = self._allow_sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def add(self, entry: AuditEntry) -> None:
        if len(self._queue) >= self._max_queue:
            metrics.AUDIT_DROPPED.inc()
            return
        self._queue.append(entry)

    def start(self) -> None:
        self._writer.start()

    async def _write_all(self) -> None:
        while self._queue and await self.write_once():
            pass

    async def write_once(self) -> bool:
        batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
        if not batch:
            return False
        try:
            metrics.DB_QUERIES.labels(query="audit_insert").inc()
            await self._pool.execute(
                INSERT_SQL,
                [e.at for e in batch],
                [e.request_id for e in batch],
                [e.org_id for e in batch],
                [e.key_id for e in batch],
                [e.method for e in batch],
                [e.path for e in batch],
                [e.decision for e in batch],
                [e.code for e in batch],
            )
        except db.DATABASE_ERRORS as error:
            log.warning("could not write %d audit entries (kept, will retry): %s", len(batch), one_line(error))
            return False
        for _ in batch:
            self._queue.popleft()
        metrics.AUDIT_WRITTEN.inc(len(batch))
        return True

    async def close(self, timeout: float = 5.0) -> None:
        await self._writer.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._queue and loop.time() < deadline:
            if not await self.write_once():
                await asyncio.sleep(0.2)
        if self._queue:
            log.warning("%d audit entries not written at shutdown", len(self._queue))

"""The audit log: every denial of a known key and a sample of allows, one row each; denials that name no known key,
counted. All written in batches off the request path.

- A request that a known key made and that was allowed (sampled) is one row of `driftlock.audit_log`.
- A denial of a known key (revoked, expired, suspended, out of scope, rate-limited, unpaid, over quota) is one
  row of `driftlock.audit_log` the first time this replica sees its (minute, key, code); the rest of that minute
  are counted in `driftlock.audit_denials` by key (source `*`), like those naming no key. A refused key sent
  from many addresses as fast as they can then costs a few rows a minute, not one per request.
- A denial that names no known key (no key, a malformed or unknown one, or authz unable to tell) is counted in
  `driftlock.audit_denials`, one row per minute, source address and code with the count, the first and last
  time and the first request of the minute as an example. Such denials cost a client nothing to cause, so one
  row each would let it write to the database as fast as it can send; counted, a flood from one address costs
  a row a minute per code. At most `MAX_COUNTED` (minute, source, code) groups are held between two writes;
  past that, new sources are counted under source `*`.

`add()` never waits: rows queue in memory; when the queue is full (the database slow or down for long), new
rows are dropped and counted in `driftlock_audit_entries_dropped_total` rather than slowing checks. Counts are
merged in memory until written. Keys are never recorded, only their ids; paths without their query string and
with anything of the key format redacted.
"""

import asyncio
import logging
import random
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from authz_service import metrics
from driftlock_kernel import db
from driftlock_kernel.background import every
from driftlock_kernel.errors import one_line
from driftlock_kernel.keys import redact_keys
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)

MAX_PATH = 512
MAX_SOURCE = 64
COUNT_WINDOW_SECONDS = 60
MAX_COUNTED = 10_000
MANY_SOURCES = "*"

INSERT_SQL = """
INSERT INTO driftlock.audit_log (at, request_id, org_id, key_id, method, path, decision, code, source)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[])
"""

# Replicas add to the same rows: each write adds its counts to what is there.
COUNT_SQL = """
INSERT INTO driftlock.audit_denials AS d
    (minute, source, code, count, first_at, last_at, request_id, method, path, org_id, key_id)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[],
                     $6::timestamptz[], $7::text[], $8::text[], $9::text[], $10::uuid[], $11::uuid[])
ON CONFLICT (minute, source, code, key_id) DO UPDATE
SET count = d.count + excluded.count,
    first_at = least(d.first_at, excluded.first_at),
    last_at = greatest(d.last_at, excluded.last_at)
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
    source: str = ""  # the client's address as Envoy saw it

    @property
    def counted(self) -> bool:
        """A denial that names no known key: counted, not kept one by one."""
        return self.decision == "deny" and self.key_id is None

    @property
    def of_known_key(self) -> bool:
        """A denial of a known key: its first in a minute kept whole, the rest counted."""
        return self.decision == "deny" and self.key_id is not None


@dataclass(slots=True)
class _Count:
    count: int
    first_at: datetime
    last_at: datetime
    request_id: str
    method: str
    path: str
    org_id: str | None = None


CountKey = tuple[datetime, str, str, str | None]  # minute, source, code, key id (None: no known key)


def audit_path(path: str) -> str:
    """The path as stored and logged: without its query string, without anything of the key format (a client
    may put its key in a path segment), and bounded."""
    return redact_keys(path.split("?", 1)[0])[:MAX_PATH]


def count_key(entry: AuditEntry) -> CountKey:
    stamp = entry.at.timestamp()
    minute = datetime.fromtimestamp(stamp - stamp % COUNT_WINDOW_SECONDS, UTC)
    if entry.key_id is not None:
        # Per key, whatever address sent it: a refused key sent from a hundred addresses is one row a minute.
        return minute, MANY_SOURCES, entry.code, entry.key_id
    return minute, entry.source[:MAX_SOURCE], entry.code, None


class DenialCounts:
    """Denials that name no known key, per (minute, source, code), until written."""

    def __init__(self, max_groups: int = MAX_COUNTED):
        self._max_groups = max_groups
        self._counts: dict[CountKey, _Count] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def add(self, entry: AuditEntry) -> None:
        key = count_key(entry)
        found = self._counts.get(key)
        if found is None and len(self._counts) >= self._max_groups:
            key = (key[0], MANY_SOURCES, key[2], key[3])
            found = self._counts.get(key)
        if found is None:
            self._counts[key] = _Count(1, entry.at, entry.at, entry.request_id, entry.method, entry.path, entry.org_id)
            return
        found.count += 1
        found.last_at = max(found.last_at, entry.at)
        found.first_at = min(found.first_at, entry.at)

    def take(self) -> dict[CountKey, _Count]:
        taken, self._counts = self._counts, {}
        return taken

    def put_back(self, taken: dict[CountKey, _Count]) -> None:
        """Counts a write could not store, merged with those counted since (kept within the bound)."""
        for key, old in taken.items():
            found = self._counts.get(key)
            if found is None:
                if len(self._counts) >= self._max_groups and key[1] != MANY_SOURCES:
                    key = (key[0], MANY_SOURCES, key[2], key[3])
                    found = self._counts.get(key)
                if found is None:
                    self._counts[key] = old
                    continue
            found.count += old.count
            found.first_at = min(found.first_at, old.first_at)
            found.last_at = max(found.last_at, old.last_at)


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
        self._counts = DenialCounts()
        # (key id, code) of the known-key denials kept whole this minute, and which minute that is.
        self._kept: set[tuple[str, str]] = set()
        self._kept_minute = 0.0
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._writer = every(flush_interval, self._write_all, name="audit-writer")
        # A write fails every second while the database is away: one line, then a count a minute.
        self._failures = RepeatedLog(log)

    def wants_allow(self) -> bool:
        rate = self._allow_sample_rate
        return rate >= 1.0 or (rate > 0.0 and random.random() < rate)

    def add(self, entry: AuditEntry) -> None:
        if entry.counted:
            self._counts.add(entry)
            return
        if entry.of_known_key and not self._first_this_minute(entry):
            self._counts.add(entry)
            return
        if len(self._queue) >= self._max_queue:
            metrics.AUDIT_DROPPED.inc()
            return
        self._queue.append(entry)

    def _first_this_minute(self, entry: AuditEntry) -> bool:
        stamp = entry.at.timestamp()
        minute = stamp - stamp % COUNT_WINDOW_SECONDS
        if minute != self._kept_minute:
            self._kept_minute = minute
            self._kept.clear()
        group = (entry.key_id or "", entry.code)
        if group in self._kept:
            return False
        if len(self._kept) >= MAX_COUNTED:
            return False  # bounded: past it, every new group of the minute is counted only
        self._kept.add(group)
        return True

    def start(self) -> None:
        self._writer.start()

    async def _write_all(self) -> None:
        await self.write_counts()
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
                [e.source or None for e in batch],
            )
        except db.DATABASE_ERRORS as error:
            self._failures.warning(
                "rows", "could not write %d audit entries (kept, will retry): %s", len(batch), one_line(error)
            )
            return False
        for _ in batch:
            self._queue.popleft()
        metrics.AUDIT_WRITTEN.inc(len(batch))
        return True

    async def write_counts(self) -> bool:
        """Add the denials counted since the last write to their rows; True when there were some and they were
        stored. (A write whose acknowledgement is lost may be counted twice: these are counts, not money.)"""
        taken = self._counts.take()
        if not taken:
            return False
        keys = list(taken)
        counts = [taken[key] for key in keys]
        try:
            metrics.DB_QUERIES.labels(query="audit_count").inc()
            await self._pool.execute(
                COUNT_SQL,
                [key[0] for key in keys],
                [key[1] for key in keys],
                [key[2] for key in keys],
                [c.count for c in counts],
                [c.first_at for c in counts],
                [c.last_at for c in counts],
                [c.request_id for c in counts],
                [c.method for c in counts],
                [c.path for c in counts],
                [c.org_id for c in counts],
                [key[3] for key in keys],
            )
        except db.DATABASE_ERRORS as error:
            self._counts.put_back(taken)
            self._failures.warning(
                "counts",
                "could not write %d groups of counted denials (kept, will retry): %s",
                len(keys),
                one_line(error),
            )
            return False
        metrics.AUDIT_DENIALS_COUNTED.inc(sum(c.count for c in counts))
        return True

    async def close(self, timeout: float = 5.0) -> None:
        await self._writer.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self._queue or len(self._counts)) and loop.time() < deadline:
            wrote_counts = await self.write_counts() if len(self._counts) else True
            wrote_rows = await self.write_once() if self._queue else True
            if not (wrote_counts and wrote_rows):
                await asyncio.sleep(0.2)
        self._failures.flush()
        if self._queue or len(self._counts):
            log.warning(
                "%d audit entries and %d groups of counted denials not written at shutdown",
                len(self._queue),
                len(self._counts),
            )

"""Reading the usage history (hour and day buckets, migration 0011) and an organisation's audit log: what the
management API's UsageHistoryService and the CLI's `usage history`, `keys usage` and `audit list` show.

The buckets are written by authz's meter flush, in the statement that moves the usage counters, so what is read
here adds up to what `usage` shows for a period (less what replicas have counted and not flushed yet, a second's
worth). Times are UTC; a bucket's `start` is the start of its hour or day.
"""

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from driftlock_kernel import db

NIL_KEY = uuid.UUID(int=0)  # units no key made (reported by the backend)
MAX_BUCKETS = 100_000
DENIAL_COLUMNS = ("denied_access", "denied_payment", "denied_quota", "denied_rate", "denied_unavailable")
DEFAULT_AUDIT_PAGE = 100
MAX_AUDIT_PAGE = 1000
# Request rows of the audit log (a check's denial or sampled allow) have no management action: they are listed
# under this one.
REQUEST_ACTION = "request"


class Granularity(StrEnum):
    HOUR = "hour"
    DAY = "day"


class GroupBy(StrEnum):
    PRODUCT = "product"
    KEY = "key"


class HistoryError(ValueError):
    """A request for history that cannot be answered as asked (the message says why, for the caller)."""


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    product: str | None
    key_id: str | None  # "" for units no key made
    billable_units: int
    refunded_units: int
    requests: int
    denied: dict[str, int]  # per family: access, payment, quota, rate, unavailable

    @property
    def denied_requests(self) -> int:
        return sum(self.denied.values())

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"start": self.start.isoformat().replace("+00:00", "Z")}
        if self.product is not None:
            out["product"] = self.product
        if self.key_id is not None:
            out["key_id"] = self.key_id
        out.update(
            billable_units=self.billable_units,
            refunded_units=self.refunded_units,
            requests=self.requests,
            denied_requests=self.denied_requests,
        )
        return out


def _sums() -> str:
    return ", ".join(f"sum({c})::bigint AS {c}" for c in ("units", "refunded_units", "requests", *DENIAL_COLUMNS))


# Table and column names come from these constants only; every value is a parameter.
_HISTORY_SQL = {
    (Granularity.HOUR, GroupBy.PRODUCT): ("driftlock.usage_hours", "hour", "product"),
    (Granularity.DAY, GroupBy.PRODUCT): ("driftlock.usage_days", "day", "product"),
    (Granularity.HOUR, GroupBy.KEY): ("driftlock.usage_key_hours", "hour", "key_id"),
    (Granularity.DAY, GroupBy.KEY): ("driftlock.usage_key_days", "day", "key_id"),
}


def history_sql(granularity: Granularity, group_by: GroupBy) -> str:
    table, time_column, group_column = _HISTORY_SQL[(granularity, group_by)]
    return f"""
        SELECT {time_column} AS start, {group_column}::text AS grouped, {_sums()}
        FROM {table}
        WHERE org_id = $1 AND {time_column} >= $2 AND {time_column} < $3
        GROUP BY {time_column}, {group_column}
        ORDER BY {time_column}, {group_column}
        LIMIT $4"""


def parse_time(text: str, field: str) -> datetime:
    """An RFC 3339 time with its offset (`2026-12-01T00:00:00Z`)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise HistoryError(f"{field} must be an RFC 3339 time such as 2026-12-01T00:00:00Z") from None
    if moment.tzinfo is None:
        raise HistoryError(f"{field} must have an offset (Z or +hh:mm)")
    return moment.astimezone(UTC)


def history_window(
    granularity: Granularity, start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """The buckets asked for: from the bucket holding `start` to the one holding `end` (by default the last day of
    hours or the last 30 days), `end`'s own bucket included when it is not at a bucket's start."""
    end = end or now
    start = start or end - (timedelta(days=1) if granularity is Granularity.HOUR else timedelta(days=30))
    if start >= end:
        raise HistoryError("start must be before end")
    return _floor(start, granularity), end


def _floor(moment: datetime, granularity: Granularity) -> datetime:
    moment = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0) if granularity is Granularity.DAY else moment


async def history(
    conn: db.Connection,
    org_id: uuid.UUID,
    granularity: Granularity,
    group_by: GroupBy,
    start: datetime,
    end: datetime,
) -> list[Bucket]:
    rows = await conn.fetch(history_sql(granularity, group_by), org_id, start, end, MAX_BUCKETS + 1)
    if len(rows) > MAX_BUCKETS:
        raise HistoryError(f"more than {MAX_BUCKETS} buckets: ask for a shorter range or by day")
    return [
        Bucket(
            start=row["start"].astimezone(UTC),
            product=row["grouped"] if group_by is GroupBy.PRODUCT else None,
            key_id=None if group_by is not GroupBy.KEY else ("" if row["grouped"] == str(NIL_KEY) else row["grouped"]),
            billable_units=row["units"],
            refunded_units=row["refunded_units"],
            requests=row["requests"],
            denied={c.removeprefix("denied_"): row[c] for c in DENIAL_COLUMNS},
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class KeyUsage:
    key_id: str
    org_id: str
    period_start: datetime
    period_end: datetime
    billable_units: int
    refunded_units: int
    requests: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "org_id": self.org_id,
            "period_start": self.period_start.isoformat().replace("+00:00", "Z"),
            "period_end": self.period_end.isoformat().replace("+00:00", "Z"),
            "billable_units": self.billable_units,
            "refunded_units": self.refunded_units,
            "requests": self.requests,
        }


KEY_PERIOD_SQL = """
SELECT coalesce(sum(units), 0)::bigint AS units, coalesce(sum(refunded_units), 0)::bigint AS refunded_units,
       coalesce(sum(requests), 0)::bigint AS requests
FROM driftlock.usage_key_hours WHERE key_id = $1 AND period_start = $2
"""

KEYS_PERIOD_SQL = """
SELECT key_id, sum(units)::bigint AS units
FROM driftlock.usage_key_hours WHERE key_id = ANY($1::uuid[]) AND period_start = $2
GROUP BY key_id
"""


async def key_usage(
    conn: db.Connection, key_id: uuid.UUID, org_id: uuid.UUID, period_start: datetime, period_end: datetime
) -> KeyUsage:
    row = await conn.fetchrow(KEY_PERIOD_SQL, key_id, period_start)
    return KeyUsage(
        str(key_id),
        str(org_id),
        period_start,
        period_end,
        row["units"] if row else 0,
        row["refunded_units"] if row else 0,
        row["requests"] if row else 0,
    )


async def units_of_keys(conn: db.Connection, key_ids: list[uuid.UUID], period_start: datetime) -> dict[str, int]:
    """Billable units of each key in the period (keys without any are absent)."""
    rows = await conn.fetch(KEYS_PERIOD_SQL, key_ids, period_start)
    return {str(row["key_id"]): row["units"] for row in rows}


# --- the audit log of one organisation ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    action: str
    code: str
    key_id: str
    actor_issuer: str
    actor_subject: str
    request_id: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "action": self.action,
            "code": self.code,
            "key_id": self.key_id,
            "actor_issuer": self.actor_issuer,
            "actor_subject": self.actor_subject,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class DenialCount:
    minute: datetime
    code: str
    count: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "minute": self.minute.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "code": self.code,
            "count": self.count,
        }


def audit_page_token(entry: AuditEntry) -> str:
    text = f"{entry.at.isoformat()}|{entry.id}"
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode("ascii")


def parse_audit_page_token(token: str) -> tuple[datetime, int]:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        moment, _, ident = text.partition("|")
        at = datetime.fromisoformat(moment)
        if at.tzinfo is None:
            raise ValueError("naive time")
        return at, int(ident)
    except (ValueError, UnicodeDecodeError):
        raise HistoryError("page_token is not one this API returned") from None


AUDIT_SQL = """
SELECT id, at, coalesce(action, 'request') AS action, code, coalesce(key_id::text, '') AS key_id,
       coalesce(actor_issuer, '') AS actor_issuer, coalesce(actor_subject, '') AS actor_subject,
       coalesce(request_id, '') AS request_id
FROM driftlock.audit_log
WHERE org_id = $1
  AND at >= $2
  AND ($3::text IS NULL OR coalesce(action, 'request') = $3)
  AND ($4::uuid IS NULL OR key_id = $4)
  AND ($5::timestamptz IS NULL OR (at, id) < ($5, $6::bigint))
ORDER BY at DESC, id DESC
LIMIT $7
"""

# Checks of the organisation's keys refused, per minute and code (from the one row each the audit keeps).
DENIALS_SQL = """
SELECT date_trunc('minute', at, 'UTC') AS minute, code, count(*)::bigint AS count
FROM driftlock.audit_log
WHERE org_id = $1 AND at >= $2 AND action IS NULL AND decision = 'deny'
  AND ($3::uuid IS NULL OR key_id = $3)
GROUP BY 1, 2
ORDER BY 1 DESC, 2
LIMIT $4
"""
MAX_DENIAL_MINUTES = 1440


async def audit_entries(
    conn: db.Connection,
    org_id: uuid.UUID,
    *,
    since: datetime,
    action: str | None = None,
    key_id: uuid.UUID | None = None,
    page_size: int = DEFAULT_AUDIT_PAGE,
    page_token: str = "",
) -> tuple[list[AuditEntry], str]:
    """A page of the organisation's audit entries, newest first, and the token of the next page ("" at the end)."""
    if not 0 <= page_size <= MAX_AUDIT_PAGE:
        raise HistoryError(f"page_size must be from 1 to {MAX_AUDIT_PAGE}")
    size = page_size or DEFAULT_AUDIT_PAGE
    after_at, after_id = parse_audit_page_token(page_token) if page_token else (None, None)
    rows = await conn.fetch(AUDIT_SQL, org_id, since, action or None, key_id, after_at, after_id, size + 1)
    entries = [db.from_row(AuditEntry, row) for row in rows[:size]]
    return entries, audit_page_token(entries[-1]) if len(rows) > size else ""


async def denials_per_minute(
    conn: db.Connection, org_id: uuid.UUID, *, since: datetime, key_id: uuid.UUID | None = None
) -> list[DenialCount]:
    rows = await conn.fetch(DENIALS_SQL, org_id, since, key_id, MAX_DENIAL_MINUTES)
    return [DenialCount(row["minute"], row["code"], row["count"]) for row in rows]

"""UsageHistoryService (proto/driftlock_api/management/v1/history.proto): usage history, a key's usage this
period, and an organisation's audit log.

WIRE: the admin token through AdminGate (an organisation token reads its own organisation only); the reads are
the kernel's (usage_history.py), shared with the CLI, so that both show the same figures.
"""

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from authz_service.management.admin_api import AdminGate, Call, invalid, parse_uuid, timestamp
from driftlock_api.management.v1 import history_pb2, history_pb2_grpc
from driftlock_kernel import api_keys, orgs, usage_history
from driftlock_kernel.usage_history import Granularity, GroupBy, HistoryError

AUDIT_DEFAULT_SINCE = timedelta(days=1)


def _choice(enum: type[Granularity] | type[GroupBy], text: str, field: str, default: str) -> str:
    text = text or default
    if text not in {member.value for member in enum}:
        raise invalid(f"{field} must be one of {', '.join(m.value for m in enum)}")
    return text


def _time(text: str, field: str) -> datetime | None:
    if not text:
        return None
    try:
        return usage_history.parse_time(text, field)
    except HistoryError as error:
        raise invalid(str(error)) from None


def bucket_message(bucket: usage_history.Bucket) -> history_pb2.UsageBucket:
    message = history_pb2.UsageBucket(
        start=timestamp(bucket.start),
        billable_units=bucket.billable_units,
        refunded_units=bucket.refunded_units,
        requests=bucket.requests,
        denied_requests=bucket.denied_requests,
        denied=history_pb2.DeniedRequests(**bucket.denied),
    )
    if bucket.product is not None:
        message.product = bucket.product
    if bucket.key_id is not None:
        message.key_id = bucket.key_id
    return message


class UsageHistoryServicer(history_pb2_grpc.UsageHistoryServiceServicer):
    def __init__(self, pool: asyncpg.Pool, gate: AdminGate, *, clock: Callable[[], float] = time.time):
        self._pool = pool
        self._gate = gate
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def GetUsageHistory(
        self, request: history_pb2.GetUsageHistoryRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.GetUsageHistoryResponse:
        return await self._gate.run(context, "usage.history", lambda call: self._history(call, request))

    async def _history(
        self, call: Call, request: history_pb2.GetUsageHistoryRequest
    ) -> history_pb2.GetUsageHistoryResponse:
        org_id = parse_uuid(request.org_id, "org_id")
        call.require_org(org_id)
        granularity = Granularity(_choice(Granularity, request.granularity, "granularity", "hour"))
        group_by = GroupBy(_choice(GroupBy, request.group_by, "group_by", "product"))
        try:
            start, end = usage_history.history_window(
                granularity, _time(request.start, "start"), _time(request.end, "end"), self._now()
            )
            async with self._pool.acquire() as conn:
                await orgs.get_org(conn, org_id)  # 404 for an unknown organisation
                buckets = await usage_history.history(conn, org_id, granularity, group_by, start, end)
        except HistoryError as error:
            raise invalid(str(error)) from None
        return history_pb2.GetUsageHistoryResponse(
            buckets=[bucket_message(b) for b in buckets],
            granularity=granularity.value,
            group_by=group_by.value,
            start=timestamp(start),
            end=timestamp(end),
        )

    async def GetKeyUsage(
        self, request: history_pb2.GetKeyUsageRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.KeyUsage:
        return await self._gate.run(context, "keys.usage", lambda call: self._key_usage(call, request))

    async def _key_usage(self, call: Call, request: history_pb2.GetKeyUsageRequest) -> history_pb2.KeyUsage:
        key_id = parse_uuid(request.key_id, "key_id")
        async with self._pool.acquire() as conn:
            key = await api_keys.get_key(conn, key_id)
            call.require_org(key.org_id)
            org = await orgs.get_org(conn, key.org_id)
            period = org.billing_period(self._now())
            usage = await usage_history.key_usage(conn, key_id, org.id, period.start, period.end)
        return history_pb2.KeyUsage(
            key_id=usage.key_id,
            org_id=usage.org_id,
            period_start=timestamp(period.start),
            period_end=timestamp(period.end),
            billable_units=usage.billable_units,
            requests=usage.requests,
            refunded_units=usage.refunded_units,
        )

    async def ListAuditEntries(
        self, request: history_pb2.ListAuditEntriesRequest, context: grpc.aio.ServicerContext
    ) -> history_pb2.ListAuditEntriesResponse:
        return await self._gate.run(context, "audit.list", lambda call: self._audit(call, request))

    async def _audit(
        self, call: Call, request: history_pb2.ListAuditEntriesRequest
    ) -> history_pb2.ListAuditEntriesResponse:
        org_id = parse_uuid(request.org_id, "org_id")
        call.require_org(org_id)
        key_id: uuid.UUID | None = parse_uuid(request.key_id, "key_id") if request.key_id else None
        if len(request.action) > 64:
            raise invalid("action must be at most 64 characters")
        since = _time(request.since, "since") or self._now() - AUDIT_DEFAULT_SINCE
        try:
            async with self._pool.acquire() as conn:
                await orgs.get_org(conn, org_id)
                entries, next_token = await usage_history.audit_entries(
                    conn,
                    org_id,
                    since=since,
                    action=request.action or None,
                    key_id=key_id,
                    page_size=request.page_size,
                    page_token=request.page_token,
                )
                denials = (
                    []
                    if request.page_token
                    else await usage_history.denials_per_minute(conn, org_id, since=since, key_id=key_id)
                )
        except HistoryError as error:
            raise invalid(str(error)) from None
        return history_pb2.ListAuditEntriesResponse(
            entries=[
                history_pb2.AuditEntry(
                    at=timestamp(e.at),
                    action=e.action,
                    code=e.code,
                    key_id=e.key_id,
                    actor_issuer=e.actor_issuer,
                    actor_subject=e.actor_subject,
                    request_id=e.request_id,
                )
                for e in entries
            ],
            next_page_token=next_token,
            denials_per_minute=[
                history_pb2.DenialCount(minute=timestamp(d.minute), code=d.code, count=d.count) for d in denials
            ],
        )

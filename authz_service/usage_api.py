"""The usage API for the backend (proto/driftlock_api/usage/v1/usage.proto), on the authz port.

It reads and counts through the same meter as ext_authz: a reported unit is pooled, flushed, alerted on and
enforced exactly like a unit counted at the edge.
"""

import logging
import re
import time
import uuid
from collections.abc import Callable

import asyncpg
import grpc
import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from authz_service.metering import Meter, PeriodFinder
from authz_service.plan_book import PlanBook
from authz_service.usage_ledger import Report
from driftlock_api.usage.v1 import usage_pb2, usage_pb2_grpc
from driftlock_kernel import db
from driftlock_kernel.billing_rules import DEFAULT_POLICY, BillingPolicy, effective_plan, payment_overdue
from driftlock_kernel.context_token import verify_service_token

log = logging.getLogger(__name__)

PRODUCT = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_REPORTED_UNITS = 1_000_000

_ORG_SQL = """
SELECT id::text AS org_id, plan_name, billing_status,
       extract(epoch FROM past_due_since)::float8 AS past_due_since,
       extract(epoch FROM period_start)::float8 AS period_start,
       extract(epoch FROM period_end)::float8 AS period_end
FROM driftlock.organizations WHERE id = $1
"""
_STORED_SQL = """
SELECT product, units FROM driftlock.usage_counters WHERE org_id = $1 AND period_start = $2
"""


def _timestamp(moment) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        plans: PlanBook,
        meter: Meter,
        secret: bytes,
        *,
        policy: BillingPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ):
        self._pool = pool
        self._plans = plans
        self._meter = meter
        self._secret = secret
        self._policy = policy
        self._clock = clock
        self._periods = PeriodFinder()

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required")
        try:
            verify_service_token(token.strip(), self._secret)
        except jwt.PyJWTError as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {error}")

    async def _organisation(self, org_id_text: str, context) -> asyncpg.Record:
        try:
            org_id = uuid.UUID(org_id_text)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "org_id must be a UUID")
        try:
            row = await self._pool.fetchrow(_ORG_SQL, org_id)
        except db.QUERY_ERRORS as error:
            log.warning("usage API could not read an organisation: %s", error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the database is unavailable")
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no organisation with id {org_id}")
        return row

    async def _plan_and_period(self, org: asyncpg.Record, context):
        plan_name = effective_plan(org["plan_name"], org["billing_status"], self._policy)
        plan = await self._plans.require(plan_name)
        if plan is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"plan {plan_name!r} does not exist")
        period = self._periods.period(org["period_start"], org["period_end"], self._clock())
        return plan, period

    async def GetUsage(self, request: usage_pb2.GetUsageRequest, context) -> usage_pb2.GetUsageResponse:
        await self._authenticate(context)
        org = await self._organisation(request.org_id, context)
        plan, period = await self._plan_and_period(org, context)
        used = await self._meter.used((org["org_id"], period.start))
        try:
            stored = await self._pool.fetch(_STORED_SQL, uuid.UUID(org["org_id"]), period.start)
        except db.QUERY_ERRORS:
            stored = []
        overdue = payment_overdue(org["billing_status"], org["past_due_since"], self._clock(), self._policy)
        response = usage_pb2.GetUsageResponse(
            org_id=org["org_id"],
            plan=plan.name,
            billing_status=org["billing_status"],
            period_start=_timestamp(period.start),
            period_end=_timestamp(period.end),
            used_units=used,
            stored_units_by_product={row["product"]: row["units"] for row in stored},
            included_units=plan.included_units,
            overage=plan.overage,
            ratio=used / plan.included_units if plan.included_units else 0.0,
            payment_required=overdue and self._policy.block_billable_when_overdue,
        )
        if plan.unit_cap is not None:
            response.unit_cap = int(plan.unit_cap)
        if plan.rate_limit_rps is not None:
            response.rate_limit_rps = plan.rate_limit_rps
        return response

    async def ReportUsage(self, request: usage_pb2.ReportUsageRequest, context) -> usage_pb2.ReportUsageResponse:
        await self._authenticate(context)
        if not 1 <= len(request.request_id) <= 200:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1 to 200 characters")
        if not PRODUCT.fullmatch(request.product):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "product must be a lower-case name like 'stream'")
        if not 1 <= request.units <= MAX_REPORTED_UNITS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"units must be 1 to {MAX_REPORTED_UNITS}")
        org = await self._organisation(request.org_id, context)
        plan, period = await self._plan_and_period(org, context)
        key = (org["org_id"], period.start)
        await self._meter.used(key)  # know the stored total before adding to it
        report = Report(request.request_id, org["org_id"], period.start, request.product, request.units)
        accepted = self._meter.report(report, plan, period.end)
        return usage_pb2.ReportUsageResponse(accepted=accepted, used_units=self._meter.ledger.used(key) or 0)

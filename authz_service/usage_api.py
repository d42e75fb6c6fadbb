"""The usage API for the backend (proto/driftlock_api/usage/v1/usage.proto), on the authz port.

WIRE: it reads and counts through the same meter as ext_authz (a reported unit is pooled, flushed, alerted on
and enforced exactly like a unit counted at the edge), reads organisations through the kernel's store, and
decides nothing itself: the payment rule is billing.payment_blocks_billable, the one authz enforces.
"""

import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

import asyncpg
import grpc
import jwt
from google.protobuf.timestamp_pb2 import Timestamp

from authz_service.decision import PlanLimits
from authz_service.meter_store import MeterStore
from authz_service.metering import Meter
from authz_service.plan_book import PlanBook
from authz_service.usage_ledger import Report
from driftlock_api.usage.v1 import usage_pb2, usage_pb2_grpc
from driftlock_kernel import db, orgs
from driftlock_kernel.billing import DEFAULT_POLICY, BillingPolicy, effective_plan, payment_blocks_billable
from driftlock_kernel.errors import one_line
from driftlock_kernel.periods import Period
from driftlock_kernel.tokens import verify_service_token

log = logging.getLogger(__name__)

PRODUCT = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_REPORTED_UNITS = 1_000_000


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("context.abort returns only by raising")  # for the type checker


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        plans: PlanBook,
        meter: Meter,
        meter_store: MeterStore,
        secret: bytes,
        *,
        policy: BillingPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ):
        self._pool = pool
        self._plans = plans
        self._meter = meter
        self._meter_store = meter_store
        self._secret = secret
        self._policy = policy
        self._clock = clock

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, "a bearer token is required")
        try:
            verify_service_token(token.strip(), self._secret)
        except jwt.PyJWTError as error:
            await _abort(context, grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {error}")

    async def _unavailable(self, context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
        log.warning("usage API: the database failed: %s: %s", type(error).__name__, one_line(error))
        await _abort(context, grpc.StatusCode.UNAVAILABLE, "the database is unavailable; retry shortly")

    async def _organisation(self, org_id_text: str, context: grpc.aio.ServicerContext) -> orgs.Organization:
        try:
            org_id = uuid.UUID(org_id_text)
        except ValueError:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "org_id must be a UUID")
        try:
            async with self._pool.acquire() as conn:
                return await orgs.get_org(conn, org_id)
        except orgs.NotFound:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"no organisation with id {org_id}")
        except db.DATABASE_ERRORS as error:
            await self._unavailable(context, error)

    async def _plan_and_period(
        self, org: orgs.Organization, context: grpc.aio.ServicerContext
    ) -> tuple[PlanLimits, Period]:
        plan_name = effective_plan(org.plan, org.billing_status, self._policy)
        plan = await self._plans.require(plan_name)
        if plan is None:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"plan {plan_name!r} does not exist")
        return plan, org.billing_period(datetime.fromtimestamp(self._clock(), UTC))

    async def GetUsage(
        self, request: usage_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_pb2.GetUsageResponse:
        await self._authenticate(context)
        org = await self._organisation(request.org_id, context)
        plan, period = await self._plan_and_period(org, context)
        used = await self._meter.used((str(org.id), period.start))
        try:
            stored = await self._meter_store.stored_by_product(str(org.id), period.start)
        except db.DATABASE_ERRORS as error:
            await self._unavailable(context, error)
        past_due_since = org.past_due_since.timestamp() if org.past_due_since else None
        response = usage_pb2.GetUsageResponse(
            org_id=str(org.id),
            plan=plan.name,
            billing_status=org.billing_status,
            period_start=_timestamp(period.start),
            period_end=_timestamp(period.end),
            used_units=used,
            stored_units_by_product=stored,
            included_units=plan.included_units,
            overage=plan.overage,
            ratio=used / plan.included_units if plan.included_units else 0.0,
            payment_required=payment_blocks_billable(org.billing_status, past_due_since, self._clock(), self._policy),
        )
        if plan.unit_cap is not None:
            response.unit_cap = int(plan.unit_cap)
        if plan.rate_limit_rps is not None:
            response.rate_limit_rps = plan.rate_limit_rps
        return response

    async def ReportUsage(
        self, request: usage_pb2.ReportUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_pb2.ReportUsageResponse:
        await self._authenticate(context)
        if not 1 <= len(request.request_id) <= 200:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1 to 200 characters")
        if not PRODUCT.fullmatch(request.product):
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "product must be a lower-case name like 'stream'")
        if not 1 <= request.units <= MAX_REPORTED_UNITS:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"units must be 1 to {MAX_REPORTED_UNITS}")
        org = await self._organisation(request.org_id, context)
        plan, period = await self._plan_and_period(org, context)
        key = (str(org.id), period.start)
        await self._meter.used(key)  # know the stored total before adding to it
        report = Report(request.request_id, str(org.id), period.start, request.product, request.units)
        accepted = self._meter.report(report, plan, period.end)
        return usage_pb2.ReportUsageResponse(accepted=accepted, used_units=self._meter.used_now(key))

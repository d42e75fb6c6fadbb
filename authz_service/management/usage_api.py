"""The usage API for the backend (proto/driftlock_api/usage/v1/usage.proto), on the authz port.

WIRE: calls carry the admin token (admin_api.py; one with an `org_id` claim reads that organisation's usage
only, and only an operator token may report usage). It reads and counts through the same meter as ext_authz (a
reported unit is pooled, flushed, alerted on and enforced exactly like a unit counted at the edge), reads
organisations through the kernel's store, and decides nothing itself: the payment rule is
billing.payment_blocks_billable, the one authz enforces.
"""

import time
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg
import grpc

from authz_service.check.decision import billing_cap
from authz_service.check.plan_book import PlanBook
from authz_service.management.admin_api import AdminGate, ApiError, Call, invalid, parse_uuid, timestamp
from authz_service.usage.meter_store import MeterStore
from authz_service.usage.metering import Meter
from authz_service.usage.refunds import Terms
from authz_service.usage.report_cap import cap_reached, countable_units
from authz_service.usage.usage_ledger import Report
from driftlock_api.usage.v1 import usage_pb2, usage_pb2_grpc
from driftlock_kernel import orgs
from driftlock_kernel.billing import DEFAULT_POLICY, BillingPolicy, PlanLimits, effective_plan, payment_blocks_billable
from driftlock_kernel.periods import Period
from driftlock_kernel.usage import PRODUCTS

MAX_REPORTED_UNITS = 1_000_000


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        plans: PlanBook,
        meter: Meter,
        meter_store: MeterStore,
        gate: AdminGate,
        *,
        policy: BillingPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
    ):
        self._pool = pool
        self._plans = plans
        self._meter = meter
        self._meter_store = meter_store
        self._gate = gate
        self._policy = policy
        self._clock = clock

    async def _organisation(self, call: Call, org_id_text: str) -> orgs.Organization:
        org_id = parse_uuid(org_id_text, "org_id")
        call.require_org(org_id)
        async with self._pool.acquire() as conn:
            return await orgs.get_org(conn, org_id)

    async def _plan_and_period(self, org: orgs.Organization) -> tuple[PlanLimits, Period]:
        plan_name = effective_plan(org.plan, org.billing_status, self._policy)
        plan = await self._plans.require(plan_name)
        if plan is None:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "unknown_plan", f"plan {plan_name!r} does not exist")
        return plan, org.billing_period(datetime.fromtimestamp(self._clock(), UTC))

    async def GetUsage(
        self, request: usage_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> usage_pb2.GetUsageResponse:
        return await self._gate.run(context, "usage.get", lambda call: self._get_usage(call, request))

    async def _get_usage(self, call: Call, request: usage_pb2.GetUsageRequest) -> usage_pb2.GetUsageResponse:
        org = await self._organisation(call, request.org_id)
        plan, period = await self._plan_and_period(org)
        used = await self._meter.used((str(org.id), period.start))
        stored = await self._meter_store.stored_by_product(str(org.id), period.start)
        past_due_since = org.past_due_since.timestamp() if org.past_due_since else None
        response = usage_pb2.GetUsageResponse(
            org_id=str(org.id),
            plan=plan.name,
            billing_status=org.billing_status,
            period_start=timestamp(period.start),
            period_end=timestamp(period.end),
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
        return await self._gate.run(context, "usage.report", lambda call: self._report_usage(call, request))

    async def _report_usage(self, call: Call, request: usage_pb2.ReportUsageRequest) -> usage_pb2.ReportUsageResponse:
        call.require_operator("report usage")  # the Go backend's call: a customer must not bill itself
        if not 1 <= len(request.request_id) <= 200:
            raise invalid("request_id must be 1 to 200 characters")
        # The product becomes a metric label (driftlock_usage_units_total): only the kernel's known products keep
        # its cardinality bounded, whatever a token holder sends.
        if request.product not in PRODUCTS:
            raise invalid(f"product must be one of {', '.join(PRODUCTS)}")
        if not 1 <= request.units <= MAX_REPORTED_UNITS:
            raise invalid(f"units must be 1 to {MAX_REPORTED_UNITS}")
        org = await self._organisation(call, request.org_id)
        plan, period = await self._plan_and_period(org)
        key = (str(org.id), period.start)
        await self._meter.used(key)  # know the stored total before adding to it
        # Past the organisation's cap nothing counts, as at the edge (the plan's, or its spend cap on a soft plan):
        # the answer says so, and how much did count. Read and counted with no await between, so that two reports
        # at once cannot both take the last units.
        cap, _code = billing_cap(plan, org.max_overage_units)
        counted = countable_units(cap, self._meter.used_now(key), request.units)
        accepted = True
        if counted:
            terms = Terms(plan.name, plan.stripe_meter or "", org.stripe_customer_id or "")
            report = Report(request.request_id, str(org.id), period.start, request.product, counted, terms)
            accepted = self._meter.report(report, plan, period.end)
        used_now = self._meter.used_now(key)
        response = usage_pb2.ReportUsageResponse(
            accepted=accepted,
            used_units=used_now,
            counted_units=counted if accepted else 0,
            cap_reached=cap_reached(cap, used_now),
        )
        if cap is not None:
            response.unit_cap = int(cap)
        return response

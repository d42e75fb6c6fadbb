"""Customer controls in the management API (issue 20): the plan catalogue (plans.proto), an organisation's
spend cap and erasure (org_controls.proto), and the per-key limits that CreateKey and UpdateKey take.

WIRE, as management_api.py: protobuf in, the kernel's stores, protobuf out; every change audited in its
transaction. An organisation token may read plans, set its own spend cap and its keys' limits (a rate limit at
or below its plan's only); putting plans and deleting organisations is for operators (403 operator_only).
"""

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from authz_service.management.admin_api import AdminGate, ApiError, Call, invalid, parse_uuid, timestamp
from authz_service.management.messages import organization_message
from driftlock_api.management.v1 import org_controls_pb2, org_controls_pb2_grpc, plans_pb2, plans_pb2_grpc
from driftlock_kernel import api_keys, db, orgs, plans
from driftlock_kernel.billing import Overage
from driftlock_kernel.orgs import NotFound

RATE_ABOVE_PLAN = "rate_limit_above_plan"


def require_operator(call: Call, what: str) -> None:
    """Only an operator token (no org_id claim) may do this: 403 operator_only for an organisation token."""
    call.require_operator(what)


def _given(message: Message, field: str) -> bool:
    return message.HasField(field)


def _value(value: struct_pb2.Value) -> Any:
    """A google.protobuf.Value as Python: None for null (and for a Value with nothing set)."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    if kind == "struct_value":
        raise invalid("an object is not accepted here")
    return getattr(value, kind)


def _change(message: Message, field: str, convert: Callable[[Any], Any]) -> Any:
    """plans.UNCHANGED when the field is absent; None when it is null; else the converted value."""
    if not _given(message, field):
        return plans.UNCHANGED
    value = _value(getattr(message, field))
    return None if value is None else convert(value)


def _whole(field: str, minimum: int = 0) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
            raise invalid(f"{field} must be a whole number or null")
        if int(value) < minimum:
            raise invalid(f"{field} must be {minimum} or more")
        return int(value)

    return convert


def _number(field: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"{field} must be a number or null")
        return float(value)

    return convert


def _strings(field: str) -> Callable[[Any], list[str] | None]:
    def convert(value: Any) -> list[str] | None:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise invalid(f"{field} must be a list of strings or null")
        return value or None  # [] removes, as null does

    return convert


# --- per-key limits (KeyService.CreateKey / UpdateKey) ----------------------------------------------------------


async def _rate_above_plan(conn: db.Connection, call: Call, org_id: uuid.UUID, rps: float | None) -> bool:
    """Whether `rps` is above the organisation's plan's rate limit; refused (403) for an organisation token,
    which may only lower it."""
    if rps is None:
        return False
    plan_rps = await api_keys.plan_rate_limit(conn, org_id)
    above = plan_rps is not None and rps > plan_rps
    if above and call.caller.org_id is not None:
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            RATE_ABOVE_PLAN,
            f"an organisation token may only lower the plan's rate limit ({plan_rps:g} requests per second)",
        )
    return above


def _limit_error(error: api_keys.InvalidLimit) -> ApiError:
    return invalid(str(error))


async def create_limits(conn: db.Connection, call: Call, org_id: uuid.UUID, request: Any) -> dict[str, Any]:
    """The create_key arguments of CreateKeyRequest's limits."""
    rps = request.rate_limit_rps if request.HasField("rate_limit_rps") else None
    limits: dict[str, Any] = {
        "max_units_per_period": request.max_units_per_period if request.HasField("max_units_per_period") else None,
        "rate_limit_rps": rps,
        "allowed_cidrs": list(request.allowed_cidrs) or None,
        "products": list(request.products) or None,
    }
    try:
        if rps is not None:
            api_keys.check_rate_limit(rps)
        if limits["max_units_per_period"] is not None:
            api_keys.check_max_units(limits["max_units_per_period"])
        if limits["allowed_cidrs"] is not None:
            api_keys.check_cidrs(limits["allowed_cidrs"])
        if limits["products"] is not None:
            api_keys.check_key_products(limits["products"])
    except api_keys.InvalidLimit as error:
        raise _limit_error(error) from None
    limits["rate_limit_above_plan"] = await _rate_above_plan(conn, call, org_id, rps)
    return limits


def limit_changes(request: Message) -> dict[str, Any]:
    """The update_key arguments of UpdateKeyRequest's limits (those given), checked; no database needed."""
    changes: dict[str, Any] = {}
    for field, convert in (
        ("max_units_per_period", _whole("max_units_per_period")),
        ("rate_limit_rps", _number("rate_limit_rps")),
        ("allowed_cidrs", _strings("allowed_cidrs")),
        ("products", _strings("products")),
    ):
        value = _change(request, field, convert)
        if value is not plans.UNCHANGED:
            changes[field] = value
    try:
        if changes.get("rate_limit_rps") is not None:
            api_keys.check_rate_limit(changes["rate_limit_rps"])
        if changes.get("max_units_per_period") is not None:
            api_keys.check_max_units(changes["max_units_per_period"])
        if changes.get("allowed_cidrs") is not None:
            api_keys.check_cidrs(changes["allowed_cidrs"])
        if changes.get("products") is not None:
            api_keys.check_key_products(changes["products"])
    except api_keys.InvalidLimit as error:
        raise _limit_error(error) from None
    return changes


async def check_rate_change(conn: db.Connection, call: Call, org_id: uuid.UUID, changes: dict[str, Any]) -> None:
    """Adds whether a new rate limit is above the plan's (refused for an organisation token)."""
    if "rate_limit_rps" in changes:
        changes["rate_limit_above_plan"] = await _rate_above_plan(conn, call, org_id, changes["rate_limit_rps"])


def set_limit_fields(message: Any, key: api_keys.ApiKey) -> None:
    """The key's limits on its ApiKey message."""
    if key.max_units_per_period is not None:
        message.max_units_per_period = key.max_units_per_period
    if key.rate_limit_rps is not None:
        message.rate_limit_rps = key.rate_limit_rps
    message.allowed_cidrs.extend(str(network) for network in key.allowed_cidrs or ())
    message.products.extend(key.products or ())


# --- organisations: spend cap and erasure ----------------------------------------------------------------------


class OrganizationControlServicer(org_controls_pb2_grpc.OrganizationControlServiceServicer):
    def __init__(self, pool: asyncpg.Pool, gate: AdminGate):
        self._pool = pool
        self._gate = gate

    async def UpdateOrganization(
        self, request: org_controls_pb2.UpdateOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def update(call: Call) -> Any:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            cap = _change(request, "max_overage_units", _whole("max_overage_units"))
            if cap is plans.UNCHANGED:
                raise invalid("nothing to change: give max_overage_units (a whole number, or null to remove it)")
            async with self._pool.acquire() as conn, conn.transaction():
                before = await orgs.get_org(conn, org_id)
                try:
                    org = await orgs.set_max_overage_units(conn, org_id, cap)
                except orgs.SpendCapError as error:
                    raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition", str(error)) from None
                await call.audit(
                    conn,
                    "orgs.update",
                    org_id=org_id,
                    detail={"max_overage_units": {"from": before.max_overage_units, "to": org.max_overage_units}},
                )
            # Imported here: management_api imports this module for the key limits.

            return organization_message(org, datetime.now(UTC))

        return await self._gate.run(context, "orgs.update", update)

    async def DeleteOrganization(
        self, request: org_controls_pb2.DeleteOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> org_controls_pb2.DeleteOrganizationResponse:
        async def delete(call: Call) -> org_controls_pb2.DeleteOrganizationResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            require_operator(call, "delete an organisation")
            async with self._pool.acquire() as conn, conn.transaction():
                revoked = await orgs.delete_org(conn, org_id)
                # Recorded after the erasure, with ids only, so that it stays.
                await call.audit(conn, "orgs.delete", org_id=org_id)
            return org_controls_pb2.DeleteOrganizationResponse(
                org_id=str(org_id), deleted_at=timestamp(datetime.now(UTC)), keys_revoked=revoked
            )

        return await self._gate.run(context, "orgs.delete", delete)


# --- the plan catalogue ----------------------------------------------------------------------------------------


def plan_message(plan: plans.Plan) -> plans_pb2.Plan:
    message = plans_pb2.Plan(
        name=plan.name,
        included_units=plan.included_units,
        overage=plan.overage.value,
        stripe_price_ids=list(plan.stripe_price_ids),
        stripe_meter=plan.stripe_meter or "",
        test_included_units=plan.test_included_units,
        test_rate_limit_rps=plan.test_rate_limit_rps,
        products=list(plan.products or ()),
    )
    if plan.hard_cap_percent is not None:
        message.hard_cap_percent = plan.hard_cap_percent
    if plan.rate_limit_rps is not None:
        message.rate_limit_rps = plan.rate_limit_rps
    return message


class PlanServicer(plans_pb2_grpc.PlanServiceServicer):
    def __init__(self, pool: asyncpg.Pool, gate: AdminGate):
        self._pool = pool
        self._gate = gate

    async def ListPlans(
        self, request: plans_pb2.ListPlansRequest, context: grpc.aio.ServicerContext
    ) -> plans_pb2.ListPlansResponse:
        async def list_all(call: Call) -> plans_pb2.ListPlansResponse:
            async with self._pool.acquire() as conn:
                found = await plans.list_plans(conn)
            return plans_pb2.ListPlansResponse(plans=[plan_message(plan) for plan in found])

        return await self._gate.run(context, "plans.list", list_all)

    async def GetPlan(self, request: plans_pb2.GetPlanRequest, context: grpc.aio.ServicerContext) -> plans_pb2.Plan:
        async def get(call: Call) -> plans_pb2.Plan:
            async with self._pool.acquire() as conn:
                plan = await plans.get_plan(conn, request.name)
            if plan is None:
                raise NotFound(f"no plan named {request.name!r}")
            return plan_message(plan)

        return await self._gate.run(context, "plans.get", get)

    async def PutPlan(self, request: plans_pb2.PutPlanRequest, context: grpc.aio.ServicerContext) -> plans_pb2.Plan:
        async def put(call: Call) -> plans_pb2.Plan:
            require_operator(call, "change plans")
            if not plans.PLAN_NAME.fullmatch(request.name):
                raise invalid("name must be 1 to 63 of a-z 0-9 _ -, starting with a letter or digit")
            changes: dict[str, Any] = {}
            if request.HasField("overage"):
                try:
                    changes["overage"] = Overage(request.overage)
                except ValueError:
                    raise invalid("overage must be 'soft' or 'block'") from None
            for field in ("test_included_units", "test_rate_limit_rps"):
                if request.HasField(field):
                    changes[field] = getattr(request, field)
            for field, convert in (
                ("hard_cap_percent", _whole("hard_cap_percent", 1)),
                ("rate_limit_rps", _number("rate_limit_rps")),
                ("stripe_meter", _meter),
                ("stripe_price_ids", lambda v: _strings("stripe_price_ids")(v) or []),
                ("products", _products),
            ):
                value = _change(request, field, convert)
                if value is not plans.UNCHANGED:
                    changes[field] = [] if field == "stripe_price_ids" and value is None else value
            async with self._pool.acquire() as conn, conn.transaction():
                current = await plans.get_plan(conn, request.name)
                if request.HasField("included_units"):
                    included = request.included_units
                elif current is not None:
                    included = current.included_units
                else:
                    raise invalid("included_units is required for a new plan")
                if included < 0:
                    raise invalid("included_units must be 0 or more")
                plan, created = await plans.upsert_plan(conn, request.name, included_units=included, **changes)
                await call.audit(
                    conn, "plans.put", detail={"plan": plan.name, "created": created, "changed": sorted(changes)}
                )
            return plan_message(plan)

        return await self._gate.run(context, "plans.put", put)


def _meter(value: Any) -> str:
    if not isinstance(value, str):
        raise invalid("stripe_meter must be a string or null")
    try:
        return plans.check_stripe_meter(value)
    except ValueError as error:
        raise invalid(str(error)) from None


def _products(value: Any) -> list[str] | None:
    names = _strings("products")(value)
    if names is None:
        return None  # all of them
    try:
        return list(plans.check_products(names))
    except ValueError as error:
        raise invalid(str(error)) from None

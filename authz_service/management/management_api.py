"""The management API (proto/driftlock_api/management/v1/): keys, organisations and the JWKS, on the authz port.

WIRE: protobuf in, the kernel's stores, protobuf out. Every call but GetJwks is authenticated by AdminGate
(admin_api.py), checked against the organisation its token may touch, and every change is written to the audit
log in the transaction that makes it. Revocations, scope changes, suspensions and plan changes reach every
authz replica through the tables' NOTIFY triggers, as a change made in SQL does.
"""

import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from authz_service.management import controls_api
from authz_service.management.admin_api import AdminGate, ApiError, Call, invalid, parse_uuid, timestamp
from authz_service.management.messages import organization_message
from driftlock_api.management.v1 import jwks_pb2, jwks_pb2_grpc, keys_pb2, keys_pb2_grpc, orgs_pb2, orgs_pb2_grpc
from driftlock_kernel import api_keys, db, orgs, paging, usage, usage_history
from driftlock_kernel.billing import FREE_PLAN
from driftlock_kernel.context_keys import ContextKeys
from driftlock_kernel.keys import ALL_SCOPES, Environment, Scope, parse_scopes

MAX_NAME_LENGTH = 200
MAX_EXPIRES_IN = timedelta(days=3650)


def _precondition(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition", message)


def _scopes(names: Iterable[str]) -> tuple[Scope, ...]:
    try:
        return parse_scopes(",".join(names))
    except ValueError as error:
        raise invalid(f"scopes: {error}") from None


def _name(text: str) -> str | None:
    if len(text) > MAX_NAME_LENGTH:
        raise invalid(f"name must be at most {MAX_NAME_LENGTH} characters")
    if orgs.has_control_characters(text):
        raise invalid("name must not contain control characters")
    return text or None


def _seconds(value: int, field: str, *, maximum: timedelta) -> timedelta:
    if not 0 < value <= maximum.total_seconds():
        raise invalid(f"{field} must be from 1 to {int(maximum.total_seconds())} seconds")
    return timedelta(seconds=value)


def _metadata(message: Struct) -> dict[str, Any]:
    try:
        return api_keys.check_metadata(json_format.MessageToDict(message))
    except api_keys.InvalidMetadata as error:
        raise invalid(str(error)) from None


async def _require_plan(conn: db.Connection, plan: str) -> None:
    if not await orgs.plan_exists(conn, plan):
        raise invalid(f"no plan named {plan!r}")


def _page(page_size: int, page_token: str) -> tuple[int, paging.Cursor | None]:
    try:
        return paging.page_size(page_size), paging.Cursor.from_token(page_token) if page_token else None
    except ValueError as error:
        raise invalid(str(error)) from None


async def _units_this_period(conn: db.Connection, org_id: uuid.UUID, found: list[api_keys.ApiKey]) -> dict[str, int]:
    """Each listed key's billable units this period (usage history, issue 18)."""
    if not found:
        return {}
    period = (await orgs.get_org(conn, org_id)).billing_period(datetime.now(UTC))
    return await usage_history.units_of_keys(conn, [key.id for key in found], period.start)


def api_key_message(key: api_keys.ApiKey) -> keys_pb2.ApiKey:
    message = keys_pb2.ApiKey(
        id=str(key.id),
        org_id=str(key.org_id),
        name=key.name or "",
        prefix=key.display_prefix,
        environment=key.environment.value,
        scopes=[str(scope) for scope in key.scopes],
        created_at=timestamp(key.created_at),
        rolled_to_key_id=str(key.rolled_to) if key.rolled_to else "",
    )
    for field, moment in (
        ("expires_at", key.expires_at),
        ("revoked_at", key.revoked_at),
        ("last_used_at", key.last_used_at),
        ("updated_at", key.updated_at),
    ):
        if moment is not None:
            getattr(message, field).CopyFrom(timestamp(moment))
    message.metadata.SetInParent()  # present even when empty: the JSON always has "metadata"
    message.metadata.update(key.metadata or {})
    controls_api.set_limit_fields(message, key)
    return message


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, pool: asyncpg.Pool, gate: AdminGate):
        self._pool = pool
        self._gate = gate

    async def _key_of_caller(self, conn: db.Connection, call: Call, key_id_text: str) -> api_keys.ApiKey:
        key = await api_keys.get_key(conn, parse_uuid(key_id_text, "key_id"))
        call.require_org(key.org_id)
        return key

    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.CreateKeyResponse:
        async def create(call: Call) -> keys_pb2.CreateKeyResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            scopes = _scopes(request.scopes) if request.scopes else ALL_SCOPES
            try:
                environment = Environment(request.environment or Environment.LIVE.value)
            except ValueError:
                raise invalid("environment must be 'live' or 'test'") from None
            expires_in = None
            if request.expires_in_seconds:
                expires_in = _seconds(request.expires_in_seconds, "expires_in_seconds", maximum=MAX_EXPIRES_IN)
            metadata = _metadata(request.metadata)
            async with self._pool.acquire() as conn, conn.transaction():
                await orgs.get_org(conn, org_id)
                limits = await controls_api.create_limits(conn, call, org_id, request)
                key, secret = await api_keys.create_key(
                    conn,
                    org_id,
                    name=_name(request.name),
                    scopes=scopes,
                    expires_in=expires_in,
                    environment=environment,
                    metadata=metadata,
                    **limits,
                )
                await call.audit(
                    conn,
                    "keys.create",
                    org_id=org_id,
                    key_id=key.id,
                    detail={"scopes": list(key.scopes), "environment": key.environment.value, **key.limits},
                )
            return keys_pb2.CreateKeyResponse(api_key=api_key_message(key), key=secret)

        return await self._gate.run(context, "keys.create", create)

    async def GetKey(self, request: keys_pb2.GetKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.ApiKey:
        async def get(call: Call) -> keys_pb2.ApiKey:
            async with self._pool.acquire() as conn:
                return api_key_message(await self._key_of_caller(conn, call, request.key_id))

        return await self._gate.run(context, "keys.get", get)

    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.ListKeysResponse:
        async def list_page(call: Call) -> keys_pb2.ListKeysResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            size, after = _page(request.page_size, request.page_token)
            async with self._pool.acquire() as conn:
                found, cursor = await api_keys.list_keys_page(conn, org_id, limit=size, after=after)
                units = await _units_this_period(conn, org_id, found)
            messages = [api_key_message(key) for key in found]
            for message in messages:
                message.billable_units_this_period = units.get(message.id, 0)
            return keys_pb2.ListKeysResponse(keys=messages, next_page_token=cursor.token() if cursor else "")

        return await self._gate.run(context, "keys.list", list_page)

    async def UpdateKey(self, request: keys_pb2.UpdateKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.ApiKey:
        async def update(call: Call) -> keys_pb2.ApiKey:
            changes: dict[str, Any] = {}
            if request.HasField("name"):
                changes["name"] = _name(request.name)
            if request.scopes:
                changes["scopes"] = _scopes(request.scopes)
            expiry = request.WhichOneof("expiry")
            if expiry == "expires_in_seconds":
                changes["expires_in"] = _seconds(
                    request.expires_in_seconds, "expires_in_seconds", maximum=MAX_EXPIRES_IN
                )
            elif expiry == "never_expires":
                if not request.never_expires:
                    raise invalid("never_expires can only be true")
                changes["expires_in"] = None
            if request.HasField("metadata"):
                changes["metadata"] = _metadata(request.metadata)
            changes.update(controls_api.limit_changes(request))
            if not changes:
                raise invalid(
                    "nothing to change: give name, scopes, expires_in_seconds, never_expires, metadata, "
                    "max_units_per_period, rate_limit_rps, allowed_cidrs or products"
                )
            async with self._pool.acquire() as conn, conn.transaction():
                key = await self._key_of_caller(conn, call, request.key_id)
                await controls_api.check_rate_change(conn, call, key.org_id, changes)
                try:
                    updated = await api_keys.update_key(conn, key.id, **changes)
                except api_keys.KeyStateError as error:
                    raise _precondition(str(error)) from None
                await call.audit(
                    conn, "keys.update", org_id=key.org_id, key_id=key.id, detail={"changed": sorted(changes)}
                )
            return api_key_message(updated)

        return await self._gate.run(context, "keys.update", update)

    async def RevokeKey(self, request: keys_pb2.RevokeKeyRequest, context: grpc.aio.ServicerContext) -> keys_pb2.ApiKey:
        async def revoke(call: Call) -> keys_pb2.ApiKey:
            async with self._pool.acquire() as conn, conn.transaction():
                key = await self._key_of_caller(conn, call, request.key_id)
                revoked = await api_keys.revoke_key(conn, key.id)
                await call.audit(conn, "keys.revoke", org_id=key.org_id, key_id=key.id)
            return api_key_message(revoked)

        return await self._gate.run(context, "keys.revoke", revoke)

    async def RollKey(
        self, request: keys_pb2.RollKeyRequest, context: grpc.aio.ServicerContext
    ) -> keys_pb2.RollKeyResponse:
        async def roll(call: Call) -> keys_pb2.RollKeyResponse:
            if not 0 <= request.overlap_seconds <= api_keys.MAX_ROLL_OVERLAP.total_seconds():
                raise invalid(
                    f"overlap_seconds must be from 0 to {int(api_keys.MAX_ROLL_OVERLAP.total_seconds())} (30 days)"
                )
            async with self._pool.acquire() as conn, conn.transaction():
                key = await self._key_of_caller(conn, call, request.key_id)
                try:
                    new, secret, old = await api_keys.roll_key(
                        conn, key.id, overlap=timedelta(seconds=request.overlap_seconds)
                    )
                except api_keys.KeyStateError as error:
                    raise _precondition(str(error)) from None
                await call.audit(
                    conn,
                    "keys.roll",
                    org_id=key.org_id,
                    key_id=key.id,
                    detail={"new_key_id": str(new.id), "overlap_seconds": request.overlap_seconds},
                )
            response = keys_pb2.RollKeyResponse(api_key=api_key_message(new), key=secret, old_key_id=str(old.id))
            if old.expires_at is not None:
                response.old_expires_at.CopyFrom(timestamp(old.expires_at))
            return response

        return await self._gate.run(context, "keys.roll", roll)


class OrganizationServicer(orgs_pb2_grpc.OrganizationServiceServicer):
    def __init__(self, pool: asyncpg.Pool, gate: AdminGate):
        self._pool = pool
        self._gate = gate

    async def _org_of_caller(self, conn: db.Connection, call: Call, org_id_text: str) -> orgs.Organization:
        org_id = parse_uuid(org_id_text, "org_id")
        call.require_org(org_id)
        return await orgs.get_org(conn, org_id)

    async def CreateOrganization(
        self, request: orgs_pb2.CreateOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.Organization:
        async def create(call: Call) -> orgs_pb2.Organization:
            call.require_operator("create an organisation")
            if not 1 <= len(request.name) <= MAX_NAME_LENGTH:
                raise invalid(f"name must be 1 to {MAX_NAME_LENGTH} characters")
            _name(request.name)
            async with self._pool.acquire() as conn, conn.transaction():
                await _require_plan(conn, request.plan or FREE_PLAN)
                org = await orgs.create_org(conn, request.name, plan=request.plan or FREE_PLAN)
                await call.audit(conn, "orgs.create", org_id=org.id, detail={"plan": org.plan})
            return organization_message(org, datetime.now(UTC))

        return await self._gate.run(context, "orgs.create", create)

    async def GetOrganization(
        self, request: orgs_pb2.GetOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.Organization:
        async def get(call: Call) -> orgs_pb2.Organization:
            async with self._pool.acquire() as conn:
                return organization_message(await self._org_of_caller(conn, call, request.org_id), datetime.now(UTC))

        return await self._gate.run(context, "orgs.get", get)

    async def ListOrganizations(
        self, request: orgs_pb2.ListOrganizationsRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.ListOrganizationsResponse:
        async def list_page(call: Call) -> orgs_pb2.ListOrganizationsResponse:
            call.require_operator("list organisations")
            size, after = _page(request.page_size, request.page_token)
            async with self._pool.acquire() as conn:
                found, cursor = await orgs.list_orgs_page(conn, limit=size, after=after, only=call.caller.org_id)
            now = datetime.now(UTC)
            return orgs_pb2.ListOrganizationsResponse(
                orgs=[organization_message(org, now) for org in found], next_page_token=cursor.token() if cursor else ""
            )

        return await self._gate.run(context, "orgs.list", list_page)

    async def SetPlan(
        self, request: orgs_pb2.SetPlanRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.Organization:
        async def set_plan(call: Call) -> orgs_pb2.Organization:
            call.require_operator("set an organisation's plan")
            if not request.plan:
                raise invalid("plan is required")
            async with self._pool.acquire() as conn, conn.transaction():
                org = await self._org_of_caller(conn, call, request.org_id)
                await _require_plan(conn, request.plan)
                changed = await orgs.set_plan(conn, org.id, request.plan)
                await call.audit(conn, "orgs.set_plan", org_id=org.id, detail={"from": org.plan, "to": changed.plan})
            return organization_message(changed, datetime.now(UTC))

        return await self._gate.run(context, "orgs.set_plan", set_plan)

    def _suspension(
        self, suspended: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[orgs_pb2.Organization]]:
        action = "orgs.suspend" if suspended else "orgs.resume"

        async def method(request: Any, context: grpc.aio.ServicerContext) -> orgs_pb2.Organization:
            async def change(call: Call) -> orgs_pb2.Organization:
                call.require_operator("suspend or resume an organisation")
                async with self._pool.acquire() as conn, conn.transaction():
                    org = await self._org_of_caller(conn, call, request.org_id)
                    changed = await orgs.set_suspended(conn, org.id, suspended)
                    await call.audit(conn, action, org_id=org.id)
                return organization_message(changed, datetime.now(UTC))

            return await self._gate.run(context, action, change)

        return method

    async def SuspendOrganization(
        self, request: orgs_pb2.SuspendOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.Organization:
        return await self._suspension(True)(request, context)

    async def ResumeOrganization(
        self, request: orgs_pb2.ResumeOrganizationRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.Organization:
        return await self._suspension(False)(request, context)

    async def ListAlerts(
        self, request: orgs_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> orgs_pb2.ListAlertsResponse:
        async def list_alerts(call: Call) -> orgs_pb2.ListAlertsResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            async with self._pool.acquire() as conn:
                found = await usage.list_alerts(conn, org_id)
            response = orgs_pb2.ListAlertsResponse(org_id=str(org_id))
            for alert in found:
                message = response.alerts.add(
                    id=alert.id,
                    threshold=alert.threshold,
                    period_start=timestamp(alert.period_start),
                    period_end=timestamp(alert.period_end),
                    used_units=alert.used_units,
                    included_units=alert.included_units,
                    plan=alert.plan,
                    created_at=timestamp(alert.created_at),
                )
                if alert.webhook_delivered_at is not None:
                    message.webhook_delivered_at.CopyFrom(timestamp(alert.webhook_delivered_at))
            return response

        return await self._gate.run(context, "orgs.list_alerts", list_alerts)


class PublicKeyServicer(jwks_pb2_grpc.PublicKeyServiceServicer):
    """The JWKS: public, so no token; built once, since the keys change only with a restart."""

    def __init__(self, keys: ContextKeys):
        self._jwks = json_format.ParseDict(keys.jwks(), jwks_pb2.JsonWebKeySet())

    async def GetJwks(
        self, request: jwks_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> jwks_pb2.JsonWebKeySet:
        return self._jwks

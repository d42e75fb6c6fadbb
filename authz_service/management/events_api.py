"""EventEndpointService (proto/driftlock_api/management/v1/events.proto): an organisation's event endpoints and
their deliveries. WIRE: protobuf in, driftlock_kernel.event_endpoints, protobuf out; every call goes through
AdminGate, and an organisation token touches only its own organisation's endpoints (a foreign endpoint's id is
answered 403, as a foreign key's is)."""

import uuid

import asyncpg
import grpc

from authz_service.management.admin_api import AdminGate, ApiError, Call, invalid, parse_uuid, timestamp
from driftlock_api.management.v1 import events_pb2, events_pb2_grpc
from driftlock_kernel import db, event_endpoints
from driftlock_kernel.event_endpoints import Delivery, EventEndpoint

MAX_PAGE = 1000


def endpoint_message(endpoint: EventEndpoint) -> events_pb2.EventEndpoint:
    message = events_pb2.EventEndpoint(
        id=str(endpoint.id),
        org_id=str(endpoint.org_id),
        url=endpoint.url,
        event_types=list(endpoint.event_types),
        enabled=endpoint.disabled_at is None,
        disabled_reason=endpoint.disabled_reason or "",
        created_at=timestamp(endpoint.created_at),
        updated_at=timestamp(endpoint.updated_at),
    )
    for field, moment in (("disabled_at", endpoint.disabled_at), ("failing_since", endpoint.failing_since)):
        if moment is not None:
            getattr(message, field).CopyFrom(timestamp(moment))
    return message


def delivery_message(delivery: Delivery) -> events_pb2.EventDelivery:
    message = events_pb2.EventDelivery(
        id=str(delivery.id),
        event_id=delivery.event_id,
        event_type=delivery.event_type,
        endpoint_id=str(delivery.endpoint_id) if delivery.endpoint_id else "",
        url=delivery.url or "",
        state=delivery.state,
        attempts=delivery.attempts,
        last_status=delivery.last_status or 0,
        last_error=delivery.last_error or "",
        created_at=timestamp(delivery.created_at),
    )
    for field, moment in (
        ("last_attempt_at", delivery.last_attempt_at),
        ("next_attempt_at", delivery.next_attempt_at if delivery.state == "pending" else None),
        ("delivered_at", delivery.delivered_at),
    ):
        if moment is not None:
            getattr(message, field).CopyFrom(timestamp(moment))
    return message


def _refused(error: ValueError) -> ApiError:
    return invalid(str(error))


class EventEndpointServicer(events_pb2_grpc.EventEndpointServiceServicer):
    def __init__(self, pool: asyncpg.Pool, gate: AdminGate, *, allow_private: bool):
        self._pool = pool
        self._gate = gate
        self._allow_private = allow_private

    async def _endpoint_of_caller(self, conn: db.Connection, call: Call, id_text: str) -> EventEndpoint:
        endpoint = await event_endpoints.get_endpoint(conn, parse_uuid(id_text, "id"))
        call.require_org(endpoint.org_id)
        return endpoint

    async def CreateEventEndpoint(
        self, request: events_pb2.CreateEventEndpointRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.CreateEventEndpointResponse:
        async def create(call: Call) -> events_pb2.CreateEventEndpointResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            if not request.url:
                raise invalid("url is required")
            async with self._pool.acquire() as conn, conn.transaction():
                try:
                    endpoint, secret = await event_endpoints.create_endpoint(
                        conn, org_id, request.url, list(request.event_types), allow_private=self._allow_private
                    )
                except ValueError as error:  # UrlRefused, an unknown type, too many endpoints
                    raise _refused(error) from None
                await call.audit(conn, "event_endpoint.create", org_id=org_id, detail={"endpoint_id": str(endpoint.id)})
            return events_pb2.CreateEventEndpointResponse(endpoint=endpoint_message(endpoint), secret=secret)

        return await self._gate.run(context, "CreateEventEndpoint", create)

    async def ListEventEndpoints(
        self, request: events_pb2.ListEventEndpointsRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListEventEndpointsResponse:
        async def list_(call: Call) -> events_pb2.ListEventEndpointsResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            async with self._pool.acquire() as conn:
                found = await event_endpoints.list_endpoints(conn, org_id)
            return events_pb2.ListEventEndpointsResponse(endpoints=[endpoint_message(e) for e in found])

        return await self._gate.run(context, "ListEventEndpoints", list_)

    async def UpdateEventEndpoint(
        self, request: events_pb2.UpdateEventEndpointRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.EventEndpoint:
        async def update(call: Call) -> events_pb2.EventEndpoint:
            types: list[str] | None = list(request.event_types) or None
            if types == ["*"]:
                types = []
            async with self._pool.acquire() as conn:
                endpoint = await self._endpoint_of_caller(conn, call, request.id)
                try:
                    updated = await event_endpoints.update_endpoint(
                        conn, endpoint.id, url=request.url or None, event_types=types, allow_private=self._allow_private
                    )
                except ValueError as error:
                    raise _refused(error) from None
                await call.audit(
                    conn, "event_endpoint.update", org_id=endpoint.org_id, detail={"endpoint_id": str(endpoint.id)}
                )
            return endpoint_message(updated)

        return await self._gate.run(context, "UpdateEventEndpoint", update)

    async def DeleteEventEndpoint(
        self, request: events_pb2.DeleteEventEndpointRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.EventEndpoint:
        async def delete(call: Call) -> events_pb2.EventEndpoint:
            async with self._pool.acquire() as conn, conn.transaction():
                endpoint = await self._endpoint_of_caller(conn, call, request.id)
                deleted = await event_endpoints.delete_endpoint(conn, endpoint.id)
                await call.audit(
                    conn, "event_endpoint.delete", org_id=endpoint.org_id, detail={"endpoint_id": str(endpoint.id)}
                )
            return endpoint_message(deleted)

        return await self._gate.run(context, "DeleteEventEndpoint", delete)

    async def TestEventEndpoint(
        self, request: events_pb2.TestEventEndpointRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.TestEventEndpointResponse:
        async def test(call: Call) -> events_pb2.TestEventEndpointResponse:
            async with self._pool.acquire() as conn:
                endpoint = await self._endpoint_of_caller(conn, call, request.id)
                event_id = await event_endpoints.send_test(conn, endpoint)
            return events_pb2.TestEventEndpointResponse(event_id=event_id)

        return await self._gate.run(context, "TestEventEndpoint", test)

    async def ListEventDeliveries(
        self, request: events_pb2.ListEventDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> events_pb2.ListEventDeliveriesResponse:
        async def list_(call: Call) -> events_pb2.ListEventDeliveriesResponse:
            org_id = parse_uuid(request.org_id, "org_id")
            call.require_org(org_id)
            endpoint_id: uuid.UUID | None = None
            if request.endpoint_id:
                endpoint_id = parse_uuid(request.endpoint_id, "endpoint_id")
            if not 0 <= request.page_size <= MAX_PAGE:
                raise invalid(f"page_size must be from 1 to {MAX_PAGE}")
            async with self._pool.acquire() as conn:
                try:
                    found = await event_endpoints.list_deliveries(
                        conn,
                        org_id=org_id,
                        endpoint_id=endpoint_id,
                        state=request.state or None,
                        limit=request.page_size or 100,
                    )
                except ValueError as error:
                    raise _refused(error) from None
            return events_pb2.ListEventDeliveriesResponse(deliveries=[delivery_message(d) for d in found])

        return await self._gate.run(context, "ListEventDeliveries", list_)

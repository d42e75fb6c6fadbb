"""The wire edge shared by the management API and UsageService: the admin token, the organisation it may
touch, and errors as gRPC statuses with a google.rpc.ErrorInfo detail.

Envoy's transcoder (convert_grpc_status) turns such a status into JSON with the matching HTTP status:
UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, INVALID_ARGUMENT and FAILED_PRECONDITION 400,
UNAVAILABLE 503. A method body raises ApiError (or lets a kernel NotFound or a database error through);
`AdminGate.run` turns each into its status, counts the call, and records refusals of a known caller in the
audit log. Nothing else reaches gRPC: an unexpected error is logged and answered INTERNAL.
"""

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from authz_service import metrics
from driftlock_kernel import admin_audit, db
from driftlock_kernel.errors import one_line
from driftlock_kernel.orgs import NotFound
from driftlock_kernel.tokens import AdminCaller, InvalidAdminToken, verify_admin_token

log = logging.getLogger(__name__)

DOMAIN = "driftlock-gateway"
T = TypeVar("T")


class ApiError(Exception):
    """A refusal: the gRPC status, a stable `reason` for programs (ErrorInfo.reason), a message for people."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument", message)


def parse_uuid(text: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise invalid(f"{field} must be a UUID") from None


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated call: who makes it and the id Envoy gave the request (or one made up for a direct call)."""

    caller: AdminCaller
    request_id: str
    method: str

    @property
    def actor(self) -> admin_audit.Actor:
        return admin_audit.Actor(self.caller.issuer, self.caller.subject)

    def require_org(self, org_id: uuid.UUID) -> None:
        if not self.caller.may_touch(org_id):
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "wrong_organisation",
                f"this token may touch only organisation {self.caller.org_id}",
            )

    def require_operator(self, what: str) -> None:
        """Operator-only calls (contract: "Management API"): an organisation token acts for a customer, who must
        not lift its own suspension, pick its own plan, report usage or see other organisations."""
        if self.caller.org_id is not None:
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "operator_only",
                f"only an operator token (one without an org_id claim) may {what}",
            )

    # The earlier name: every call that needs all organisations is operator-only.
    require_all_orgs = require_operator

    async def audit(
        self,
        conn: db.Connection,
        action: str,
        *,
        org_id: uuid.UUID | None = None,
        key_id: uuid.UUID | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record the change in the audit log, in the caller's transaction."""
        await admin_audit.record(
            conn,
            self.actor,
            action,
            org_id=org_id,
            key_id=key_id,
            request_id=self.request_id,
            via="grpc",
            detail={"method": self.method, **(detail or {})},
        )


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}


async def _abort(context: grpc.aio.ServicerContext, error: ApiError, request_id: str) -> None:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata={"request_id": request_id})
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    await context.abort(
        error.code, error.message, trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),)
    )


class AdminGate:
    """Authenticates every call with the admin token and answers every failure as a status."""

    def __init__(
        self,
        secret: bytes | None,
        pool: asyncpg.Pool | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ):
        self._secret = secret
        self._pool = pool  # where refusals of a known caller are audited; None: they are only counted
        self._clock = clock

    def authenticate(self, metadata: Mapping[str, str]) -> AdminCaller:
        if self._secret is None:
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "management_api_disabled",
                "the management API is off: DRIFTLOCK_ADMIN_TOKEN_SECRET is not set on this gateway",
            )
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing_token",
                "send 'authorization: Bearer <JWT>' signed with DRIFTLOCK_ADMIN_TOKEN_SECRET",
            )
        try:
            return verify_admin_token(token.strip(), self._secret, now=self._clock())
        except InvalidAdminToken as error:
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "invalid_token", str(error)) from None

    async def run(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        work: Callable[[Call], Awaitable[T]],
    ) -> T:
        metadata = _metadata(context)
        request_id = metadata.get("x-request-id") or str(uuid.uuid4())
        call: Call | None = None
        try:
            call = Call(self.authenticate(metadata), request_id, method)
            result = await work(call)
        except ApiError as error:
            failure = error
        except NotFound as error:
            failure = ApiError(grpc.StatusCode.NOT_FOUND, "not_found", str(error))
        except db.UNAVAILABLE_ERRORS as error:
            log.warning("%s: the database failed: %s: %s", method, type(error).__name__, one_line(error))
            failure = ApiError(grpc.StatusCode.UNAVAILABLE, "unavailable", "the database is unavailable; retry shortly")
        except (asyncpg.CheckViolationError, asyncpg.StringDataRightTruncationError) as error:
            failure = invalid(f"the database refused a value: {one_line(error)}")
        except Exception:
            log.exception("%s failed", method)
            failure = ApiError(grpc.StatusCode.INTERNAL, "internal", "internal error; see the gateway's log")
        else:
            metrics.MANAGEMENT_CALLS.labels(method=method, code="OK").inc()
            return result
        metrics.MANAGEMENT_CALLS.labels(method=method, code=failure.code.name).inc()
        if call is not None and failure.code is grpc.StatusCode.PERMISSION_DENIED:
            await self._audit_refusal(call, failure)
        await _abort(context, failure, request_id)
        raise AssertionError("context.abort returns only by raising")

    async def _audit_refusal(self, call: Call, failure: ApiError) -> None:
        if self._pool is None:
            return
        try:
            async with self._pool.acquire() as conn:
                await admin_audit.record(
                    conn,
                    call.actor,
                    call.method,
                    org_id=call.caller.org_id,
                    code=failure.reason,
                    request_id=call.request_id,
                    via="grpc",
                    detail={"method": call.method, "message": failure.message},
                )
        except db.DATABASE_ERRORS as error:
            log.warning("could not audit a refused %s: %s", call.method, one_line(error))

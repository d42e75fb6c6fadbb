"""The gRPC edge: Envoy's CheckRequest in, CheckResponse out. Nothing is decided here, and nothing raises.

Only Envoy may call Check: a call without the secret Envoy sends as gRPC metadata (DRIFTLOCK_EXT_AUTHZ_SECRET,
rendered into envoy.yaml's ext_authz `initial_metadata`) is refused with UNAUTHENTICATED before anything else,
so nothing else that reaches the port can have keys checked, nor have a context token signed for context
extensions of its own choosing (`billable: false`, say).

On allow the backend gets the contract's `x-driftlock-*` headers and the signed context token, and loses the
credential headers and every `x-driftlock-*` header the client sent; a counted call also carries what it was
counted as in the response's dynamic metadata, which Envoy hands its access log (refunds.py). On deny the
client gets the contract's status, JSON body and headers.
"""

import hmac
import json
import logging
import time
from collections.abc import Iterable
from functools import partial

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.rpc import code_pb2, status_pb2

from authz_service import metrics
from authz_service.check.authorizer import AccessRequest, Authorizer, CheckOutcome
from authz_service.check.context_signer import ContextSigner
from authz_service.check.controls import QuotaState
from authz_service.check.decision import DENY_UNAVAILABLE, HTTP_STATUS, MESSAGES, Decision, DenyCode
from authz_service.check.header_bytes import response_headers_to_add
from authz_service.check.quota_headers import limit_headers
from authz_service.check.rate_limit import RateVerdict
from authz_service.usage.refunds import BilledUsage
from driftlock_kernel.caches import LruCache
from driftlock_kernel.logs import bind_request
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)

# The gRPC metadata that carries the secret Envoy shows with every check (envoy.yaml, ext_authz initial_metadata).
CALLER_SECRET_METADATA = "x-driftlock-ext-authz-secret"

CONTEXT_HEADER_PREFIX = "x-driftlock-"
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
_OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
_OK_STATUS = status_pb2.Status(code=code_pb2.OK)
_DENIED_STATUS = status_pb2.Status(code=code_pb2.PERMISSION_DENIED)
_SET_BY_US = frozenset(
    CONTEXT_HEADER_PREFIX + name for name in ("org-id", "key-id", "plan", "environment", "billable", "context")
)
_STATS = metrics.CHECK_STATS
_OUTCOME_SLOT = {code: _STATS.index_of(code) for code in (None, *DenyCode)}


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def _source_address(attributes: attribute_context_pb2.AttributeContext) -> str:
    return attributes.source.address.socket_address.address


def access_request(check: external_auth_pb2.CheckRequest, time_remaining: float | None = None) -> AccessRequest:
    attributes = check.attributes
    http = attributes.request.http
    # The protobuf map itself, not a copy: a check reads three headers and scans the names once, and Envoy
    # sends only the headers authz reads (envoy.yaml, allowed_headers), so copying would cost more.
    headers = http.headers
    return AccessRequest(
        request_id=headers.get("x-request-id", ""),
        method=http.method,
        path=http.path,
        headers=headers,
        context=attributes.context_extensions,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
        read_source=partial(_source_address, attributes),
    )


def shows_secret(metadata: Iterable[tuple[str, str | bytes]] | None, secret: bytes) -> bool:
    """Whether the call's metadata carries the caller secret (compared in constant time)."""
    for key, value in metadata or ():
        if key == CALLER_SECRET_METADATA:
            presented = value.encode() if isinstance(value, str) else value
            return hmac.compare_digest(presented, secret)
    return False


def _serialized(response: external_auth_pb2.CheckResponse) -> bytes:
    return response.SerializeToString()


class AllowedResponses:
    """Serialised allow responses, one finished response per context token and billed usage.

    Every header of an allow follows from the token (grant, plan, billability), and the token is reused for up
    to a minute; the dynamic metadata follows from what the call was counted as (organisation, period, product,
    units). So the usual request is answered with bytes serialised once: building and serialising a response
    costs about a third of a whole check in Python. What differs per request (spoofed context headers to
    remove, rate-limit headers) is serialised on its own and appended: protobuf parses concatenated messages
    as one, merged (repeated fields appended), so Envoy reads the base and the additions as one response.
    """

    MAX_CACHED = 10_000
    MAX_RATE_VARIANTS = 4096

    def __init__(self, signer: ContextSigner):
        self._signer = signer
        self._cached: LruCache[tuple[str, BilledUsage | None], bytes] = LruCache(self.MAX_CACHED)
        # (limit, remaining, reset, quota) -> the serialised limit headers: a key's verdicts take few values.
        self._rate_headers: LruCache[tuple[float, int, int, tuple[int, ...] | None], bytes] = LruCache(
            self.MAX_RATE_VARIANTS
        )

    def build(self, outcome: CheckOutcome, request: AccessRequest) -> bytes:
        grant, plan = outcome.grant, outcome.plan
        if grant is None or plan is None:
            raise ValueError("an allowed outcome must carry its grant and plan")
        token = self._signer.token(grant, plan, outcome.billed)
        cache_key = (token, outcome.usage)
        base = self._cached.get(cache_key)
        if base is None:
            response = external_auth_pb2.CheckResponse(
                status=_OK_STATUS,
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[
                        _header("x-driftlock-org-id", grant.org_id),
                        _header("x-driftlock-key-id", grant.key_id),
                        _header("x-driftlock-plan", plan),
                        _header("x-driftlock-environment", grant.environment),
                        _header("x-driftlock-billable", "true" if outcome.billed else "false"),
                        _header("x-driftlock-context", token),
                    ],
                    headers_to_remove=CREDENTIAL_HEADERS,
                ),
            )
            if outcome.usage is not None:
                response.dynamic_metadata.update(outcome.usage.as_metadata())
            base = _serialized(response)
            self._cached.put(cache_key, base)
        # Ours are overwritten; any other x-driftlock-* a client sent is removed, as are the credentials.
        spoofed = [n for n in request.headers if n.startswith(CONTEXT_HEADER_PREFIX) and n not in _SET_BY_US]
        rate, quota = outcome.rate, outcome.quota
        if not spoofed and rate is None and quota is None:
            return base
        parts = [base]
        if spoofed:
            parts.append(
                _serialized(
                    external_auth_pb2.CheckResponse(
                        ok_response=external_auth_pb2.OkHttpResponse(headers_to_remove=spoofed)
                    )
                )
            )
        if rate is not None or quota is not None:
            parts.append(self._rate_limit_headers(rate, quota))
        return b"".join(parts)

    def _rate_limit_headers(self, rate: RateVerdict | None, quota: QuotaState | None) -> bytes:
        variant = (
            rate.limit if rate is not None else 0.0,
            rate.remaining if rate is not None else -1,
            rate.reset_seconds if rate is not None else -1,
            _quota_variant(quota),
        )
        serialized = self._rate_headers.get(variant)
        if serialized is None:
            # Sent to the client with the backend's response.
            serialized = response_headers_to_add(limit_headers(rate, quota))
            self._rate_headers.put(variant, serialized)
        return serialized


def _quota_variant(quota: QuotaState | None) -> tuple[int, ...] | None:
    if quota is None:
        return None
    return (quota.included, quota.remaining, quota.reset_seconds, quota.window_seconds, quota.overage_units)


def error_body(code: DenyCode, request_id: str) -> str:
    return json.dumps({"error": {"code": code.value, "message": MESSAGES[code], "request_id": request_id}})


def _denial_template(code: DenyCode) -> bytes:
    headers = [_header("content-type", "application/json"), _header("cache-control", "no-store")]
    if HTTP_STATUS[code] == 401:
        headers.append(_header("www-authenticate", f'Bearer realm="driftlock", error="{code.value}"'))
    return _serialized(
        external_auth_pb2.CheckResponse(
            status=_DENIED_STATUS,
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=HttpStatus(code=HTTP_STATUS[code]), headers=headers
            ),
        )
    )


# A denial differs from its template only by its body (the request id) and Retry-After, serialised apart and
# appended (see AllowedResponses): a flood of bad keys should cost no more than good traffic.
_DENIAL_TEMPLATES = {code: _denial_template(code) for code in DenyCode}


def denied_response(decision: Decision, request_id: str, extra_headers: dict[str, str] | None = None) -> bytes:
    code = decision.code
    if code is None:
        raise ValueError("a denied response needs a denial")
    denied = external_auth_pb2.DeniedHttpResponse(body=error_body(code, request_id))
    if decision.retry_after is not None:
        denied.headers.append(_header("retry-after", str(decision.retry_after)))
    if extra_headers:
        denied.headers.extend(_header(name, value) for name, value in extra_headers.items())
    return _DENIAL_TEMPLATES[code] + _serialized(external_auth_pb2.CheckResponse(denied_response=denied))


AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"


class AuthorizationServicer:
    """`caller_secret`: what a caller must show (see the module's docstring). `Check` is the gRPC method: the
    caller's secret, then `answer`, which in-process callers (the benchmarks) call directly. Both answer
    serialised bytes (see AllowedResponses); `add_to_server` registers `Check` so."""

    def __init__(self, authorizer: Authorizer, signer: ContextSigner, *, caller_secret: bytes):
        self._authorizer = authorizer
        self._allowed = AllowedResponses(signer)
        self._caller_secret = caller_secret
        self._refusals = RepeatedLog(log)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Serve `Check` with the request parsed by protobuf and the response passed through as the bytes it is."""
        check = grpc.unary_unary_rpc_method_handler(
            self.Check, request_deserializer=external_auth_pb2.CheckRequest.FromString, response_serializer=None
        )
        handlers = {"Check": check}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, handlers),))
        # As generated stubs do: the method is then known to gRPC's core, and found without a generic look-up.
        server.add_registered_method_handlers(AUTHORIZATION_SERVICE, handlers)  # type: ignore[attr-defined]  # (not in grpc.aio typing)

    async def Check(self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext) -> bytes:
        if not shows_secret(context.invocation_metadata(), self._caller_secret):
            metrics.UNAUTHENTICATED_CALLS.inc()
            self._refusals.warning(
                "caller", "refused a Check call without the ext_authz secret (from %s)", context.peer()
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "only the gateway's Envoy may call Check")
            raise PermissionError("Check called without the ext_authz secret")
        return await self.answer(request, context.time_remaining())

    async def answer(self, request: external_auth_pb2.CheckRequest, time_remaining: float | None = None) -> bytes:
        """The answer to a CheckRequest from a caller already let in; `time_remaining`: Envoy's deadline."""
        started = time.perf_counter()
        request_id = ""
        try:
            access = access_request(request, time_remaining)
            request_id = access.request_id
            bind_request(request_id)
            outcome = await self._authorizer.check(access)
            if outcome.decision.code is None:
                response = self._allowed.build(outcome, access)
            else:
                limits = None
                if outcome.rate is not None or outcome.quota is not None:
                    limits = limit_headers(outcome.rate, outcome.quota)
                response = denied_response(outcome.decision, request_id, limits)
            code = outcome.decision.code
        except Exception:
            log.exception("check failed; answering auth_unavailable")
            response = denied_response(DENY_UNAVAILABLE, request_id)
            code = DenyCode.AUTH_UNAVAILABLE
        _STATS.observe(_OUTCOME_SLOT[code], time.perf_counter() - started)
        return response

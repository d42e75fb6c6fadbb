"""Envoy-shaped CheckRequests, for calling authz over real gRPC without Envoy, with the secret only Envoy holds."""

import secrets
import uuid
from typing import cast

import grpc
from envoy.service.auth.v3 import external_auth_pb2

from authz_service.check.ext_authz import CALLER_SECRET_METADATA

# What the tests' gateway gives its Envoy and its authz replicas (DRIFTLOCK_EXT_AUTHZ_SECRET), so that the tests
# can call Check as Envoy does.
EXT_AUTHZ_SECRET = secrets.token_urlsafe(48)


class _ShowsSecret(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the ext_authz secret to every call, as Envoy's `initial_metadata` does."""

    def __init__(self, secret: str):
        self._metadata = (CALLER_SECRET_METADATA, secret)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), self._metadata)
        details = client_call_details._replace(metadata=metadata)
        return await continuation(details, request)


def authz_channel(target: str, secret: str = EXT_AUTHZ_SECRET, *, fresh: bool = False) -> grpc.aio.Channel:
    """A channel to an authz replica whose calls carry the ext_authz secret, as Envoy's do. gRPC shares one
    connection among channels to the same target; a `fresh` channel opens its own (so that SO_REUSEPORT may give
    it to another worker of the same port)."""
    options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
    # grpc-stubs leaves the interceptor type open on purpose ("must cast or ignore").
    interceptor = cast(grpc.aio.ClientInterceptor, _ShowsSecret(secret))
    return grpc.aio.insecure_channel(target, options=options, interceptors=[interceptor])


STREAM_DETECT = {"scope": "detect", "billable": "true", "product": "stream", "units": "1"}
MONITOR_DETECT = {"scope": "detect", "billable": "true", "product": "monitor", "units": "1"}
STREAM_INGEST = {"scope": "ingest", "billable": "false", "product": "stream"}
READ = {"scope": "read", "billable": "false"}


def check_request(
    headers: dict[str, str],
    context: dict[str, str] = STREAM_DETECT,
    *,
    path: str = "/api/v1/stream/detect",
    method: str = "POST",
    request_id: str | None = None,
    source: str = "127.0.0.1",
) -> external_auth_pb2.CheckRequest:
    """A request as Envoy sends it; each gets a fresh request id, as Envoy assigns, unless one is given."""
    request_id = request_id or str(uuid.uuid4())
    request = external_auth_pb2.CheckRequest()
    request.attributes.source.address.socket_address.address = source
    http = request.attributes.request.http
    http.method = method
    http.path = path
    http.headers.update({"x-request-id": request_id, **{k.lower(): v for k, v in headers.items()}})
    request.attributes.context_extensions.update(context)
    return request


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def response_headers(response) -> dict[str, str]:
    which = response.ok_response if response.HasField("ok_response") else response.denied_response
    return {option.header.key: option.header.value for option in which.headers}

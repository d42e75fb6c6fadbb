"""Envoy-shaped CheckRequests, for calling authz over real gRPC without Envoy."""

import uuid

from envoy.service.auth.v3 import external_auth_pb2

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
) -> external_auth_pb2.CheckRequest:
    """A request as Envoy sends it; each gets a fresh request id, as Envoy assigns, unless one is given."""
    request_id = request_id or str(uuid.uuid4())
    request = external_auth_pb2.CheckRequest()
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

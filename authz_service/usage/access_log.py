"""The gRPC edge of refunds: Envoy's access log service (`envoy.service.accesslog.v3.AccessLogService`).

Envoy streams one entry per finished request it was configured to log (envoy/envoy.yaml logs only billed calls
that failed: a 5xx or an upstream failure flag); each entry becomes a `LoggedRequest`, refunds.refund_for
decides, and a refund goes into the meter's ledger like a count with negative units, flushed with the rest.
Nothing is decided here and nothing raises into gRPC. A refund takes units back, so only Envoy may send entries:
a stream without the ext_authz secret (the same one every check carries) is refused before its first entry.

The service is lossy by design (Envoy keeps entries in a small buffer for up to its flush interval and does
not send an entry again once its stream broke), so an entry lost in transit, or in an Envoy that crashed, is a
failed call the customer is charged for.
"""

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import json_format

from authz_service import metrics
from authz_service.check.ext_authz import shows_secret
from authz_service.usage.metering import Meter
from authz_service.usage.refunds import EXT_AUTHZ_NAMESPACE, LoggedRequest, billed_from_metadata, refund_for
from driftlock_kernel.repeated_logs import RepeatedLog

log = logging.getLogger(__name__)

# ResponseFlags fields (envoy/data/accesslog/v3/accesslog.proto) by the short name Envoy prints for each.
_FLAG_NAMES = {
    "no_healthy_upstream": "UH",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_remote_reset": "UR",
    "upstream_request_timeout": "UT",
    "upstream_retry_limit_exceeded": "URX",
    "upstream_overflow": "UO",
    "upstream_protocol_error": "UPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "stream_idle_timeout": "SI",
    "rate_limited": "RL",
    "downstream_connection_termination": "DC",
    "local_reset": "LR",
}
_RESULTS = {
    result: metrics.ACCESS_LOG_ENTRIES.labels(result=result)
    for result in ("refunded", "charged", "not_billed", "duplicate", "disabled")
}


def logged_request(entry: accesslog_pb2.HTTPAccessLogEntry) -> LoggedRequest:
    common = entry.common_properties
    flags = frozenset(name for field, name in _FLAG_NAMES.items() if getattr(common.response_flags, field))
    billed = None
    if EXT_AUTHZ_NAMESPACE in common.metadata.filter_metadata:
        billed = billed_from_metadata(json_format.MessageToDict(common.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE]))
    status = entry.response.response_code.value if entry.response.HasField("response_code") else None
    return LoggedRequest(entry.request.request_id, status or None, flags, billed)


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    """`caller_secret`: what Envoy shows (DRIFTLOCK_EXT_AUTHZ_SECRET); None only in process (the tests' own
    servicers)."""

    def __init__(self, meter: Meter, *, refunds_enabled: bool = True, caller_secret: bytes | None = None):
        self._meter = meter
        self._enabled = refunds_enabled
        self._caller_secret = caller_secret
        self._refusals = RepeatedLog(log)

    def take(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
        """Refund the entry's call if it earns one; returns what became of it (a metric label)."""
        request = logged_request(entry)
        if request.billed is None:
            return "not_billed"
        if not self._enabled:
            return "disabled"
        refund = refund_for(request)
        if refund is None:
            return "charged"
        return "refunded" if self._meter.refund(refund) else "duplicate"

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        if self._caller_secret is not None and not shows_secret(context.invocation_metadata(), self._caller_secret):
            metrics.UNAUTHENTICATED_CALLS.inc()
            self._refusals.warning(
                "caller", "refused an access log stream without the ext_authz secret (from %s)", context.peer()
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "only the gateway's Envoy may send access logs")
        try:
            async for message in request_iterator:
                for entry in message.http_logs.log_entry:
                    _RESULTS[self.take(entry)].inc()
        except Exception:
            # A malformed entry must not end the stream's other entries silently: log it, and let Envoy open a
            # new stream.
            log.exception("access log stream failed")
        return als_pb2.StreamAccessLogsResponse()

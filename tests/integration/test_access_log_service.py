"""authz's access-log service (refunds) over real gRPC: only Envoy, which shows the ext_authz secret, may use it."""

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from tests.support.authz_requests import EXT_AUTHZ_SECRET


def a_refund_claim() -> als_pb2.StreamAccessLogsMessage:
    """What a forger would send: a failed call, billed to someone, to be taken back."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = "forged-request"
    entry.response.response_code.value = 503
    return als_pb2.StreamAccessLogsMessage(
        http_logs=als_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry])
    )


async def stream(target: str, metadata) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)

        async def messages():
            yield a_refund_claim()

        await stub.StreamAccessLogs(messages(), metadata=metadata, timeout=10)


@pytest.mark.parametrize("metadata", [(), ((CALLER_SECRET_METADATA, "not-the-secret"),)])
async def test_a_stream_without_the_ext_authz_secret_is_refused(gateway, metadata):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(gateway.authz_target(0), metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_envoys_stream_with_the_secret_is_taken(gateway):
    await stream(gateway.authz_target(0), ((CALLER_SECRET_METADATA, EXT_AUTHZ_SECRET),))

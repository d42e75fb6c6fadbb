"""A do-nothing ext_authz server: answers every Check with a static OK. The baseline authz is measured against."""

import argparse
import asyncio

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK), ok_response=external_auth_pb2.OkHttpResponse()
)


class NullAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):
        return OK


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1000)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NullAuthorization(), server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    for service in ("", "envoy.service.auth.v3.Authorization"):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))

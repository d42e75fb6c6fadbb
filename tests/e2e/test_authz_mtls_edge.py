"""Mutual TLS between real Envoy and authz, rendered from the same settings an operator sets: checks, the
management listener's calls and Envoy's health checks all reach authz over it, and nothing else gets in."""

import aiohttp
import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from driftlock_cli.stack import start_stack
from tests.support.authz_requests import EXT_AUTHZ_SECRET, bearer, check_request
from tests.support.mtls import mutual_tls
from tests.support.net import free_stack_ports
from tests.support.scrape import sample_sum


@pytest.fixture(scope="module")
async def mtls_stack(database_url, jwt_secret, tmp_path_factory):
    state = tmp_path_factory.mktemp("authz-mtls")
    certs = mutual_tls(state / "certs")
    stack = await start_stack(
        database_url=database_url,
        jwt_secret=jwt_secret,
        state_dir=state,
        ports=free_stack_ports(),
        log_dir=state / "logs",
        ext_authz_secret=EXT_AUTHZ_SECRET,
        authz_mtls=(certs.server, certs.client),
    )
    yield stack
    await stack.stop()


async def test_envoy_reaches_authz_over_mutual_tls_and_nothing_else_does(mtls_stack, make_org, make_key):
    _key, secret = await make_key((await make_org()).id)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{mtls_stack.envoy_url}/api/v1/stream/detect", headers=bearer(secret)) as response:
            assert response.status == 200, await response.text()
        # The management listener transcodes to authz over the same cluster.
        async with session.get(f"{mtls_stack.management_url}/.well-known/jwks.json") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["keys"]

    # The same port, without Envoy's certificate: refused before any call, secret or not.
    async with grpc.aio.insecure_channel(mtls_stack.authz_target(0)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                check_request(bearer(secret)), metadata=((CALLER_SECRET_METADATA, EXT_AUTHZ_SECRET),), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    metrics = mtls_stack.authz_metrics_url(0)
    assert await sample_sum(metrics, "driftlock_authz_checks_total", {"decision": "allow"}) == 1
    assert await sample_sum(metrics, "driftlock_authz_unauthenticated_calls_total") == 0

"""authz requiring mutual TLS (DRIFTLOCK_AUTHZ_TLS_*): a caller without a certificate from the client CA is refused
at the TLS handshake, so that no call of theirs reaches a servicer or costs a check; Envoy's certificate passes."""

import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from driftlock_cli import authz_tls
from driftlock_cli.doctor import check_authz
from driftlock_cli.supervisor import grpc_serving, start_child, wait_until
from driftlock_kernel.settings import AuthzClientTls, HostPort
from tests.support.authz_child import authz_env
from tests.support.authz_requests import EXT_AUTHZ_SECRET, bearer, check_request
from tests.support.mtls import mutual_tls
from tests.support.net import free_port
from tests.support.scrape import sample_sum

UNAUTHENTICATED = "driftlock_authz_unauthenticated_calls_total"
CHECKS = "driftlock_authz_checks_total"


@pytest.fixture
async def authz_with_mtls(database_url, jwt_secret, tmp_path):
    certs = mutual_tls(tmp_path / "certs")
    port, metrics_port = free_port(), free_port()
    child = await start_child(
        "authz",
        [sys.executable, "-m", "driftlock_cli", "authz"],
        env={**authz_env(database_url, jwt_secret, port, metrics_port), **certs.server_env()},
        log_file=tmp_path / "authz.log",
    )
    target = f"127.0.0.1:{port}"
    await wait_until(grpc_serving(target, tls=certs.client), timeout=30, what="authz to serve", child=child)
    yield target, f"http://127.0.0.1:{metrics_port}/metrics", certs
    assert await child.stop() == 0, (tmp_path / "authz.log").read_text()


async def check_with(channel: grpc.aio.Channel, key: str, *, secret: str | None = EXT_AUTHZ_SECRET):
    metadata = ((CALLER_SECRET_METADATA, secret),) if secret else ()
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    return await stub.Check(check_request(bearer(key)), metadata=metadata, timeout=5, wait_for_ready=False)


async def refused_at_the_handshake(channel: grpc.aio.Channel, key: str) -> None:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await check_with(channel, key)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()


async def test_callers_without_envoys_certificate_are_refused_before_any_call(authz_with_mtls, make_org, make_key):
    target, metrics, certs = authz_with_mtls
    _key, secret = await make_key((await make_org()).id)

    # Plain gRPC, TLS without a client certificate, a client certificate from another CA: all refused at the
    # handshake, even with the ext_authz secret and a valid key.
    await refused_at_the_handshake(grpc.aio.insecure_channel(target), secret)
    ca = Path(certs.client.ca_path).read_bytes()
    await refused_at_the_handshake(
        grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca)), secret
    )
    await refused_at_the_handshake(authz_tls.channel(target, certs.stranger), secret)
    # None of them was a call: authz counted neither a check nor a call without the secret.
    assert await sample_sum(metrics, CHECKS) == 0
    assert await sample_sum(metrics, UNAUTHENTICATED) == 0

    # Envoy's certificate passes, and the secret still guards Check behind it.
    async with authz_tls.channel(target, certs.client) as channel:
        reply = await check_with(channel, secret)
        assert reply.HasField("ok_response")
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await check_with(channel, secret, secret=None)
        assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await sample_sum(metrics, UNAUTHENTICATED) == 1


async def test_health_checks_of_the_cli_show_the_client_certificate(authz_with_mtls):
    target, _metrics, certs = authz_with_mtls
    host, port = target.rsplit(":", 1)
    assert (await check_authz(HostPort(host, int(port)), certs.client)).ok
    refused = await check_authz(HostPort(host, int(port)))
    assert not refused.ok and "UNAVAILABLE" in refused.detail


async def test_a_server_name_other_than_the_host_dialled_is_checked(authz_with_mtls):
    """In Kubernetes authz's certificate names its service, not the address dialled."""
    target, _metrics, certs = authz_with_mtls
    named = AuthzClientTls(*_paths(certs.client), server_name="authz")
    assert await grpc_serving(target, tls=named)()
    wrong = AuthzClientTls(*_paths(certs.client), server_name="someone-else")
    with pytest.raises(grpc.aio.AioRpcError):
        await grpc_serving(target, tls=wrong)()


def _paths(tls: AuthzClientTls) -> tuple[str, str, str]:
    return tls.cert_path, tls.key_path, tls.ca_path

"""With no authz to ask, Envoy fails closed with the contract's 503 and never reaches the backend."""

import pytest

from authz_service.check.decision import MESSAGES, DenyCode
from driftlock_cli import envoy_config
from driftlock_cli.supervisor import http_ok, start_child, wait_until
from driftlock_kernel.keys import Environment, generate_key
from driftlock_kernel.settings import HostPort
from tests.support.http import raw_request
from tests.support.net import free_port
from tests.support.recorder import Recorder


@pytest.fixture
async def envoy_without_authz(tmp_path):
    backend = await Recorder().start(free_port())
    port, admin = free_port(), free_port()
    config = envoy_config.render(
        envoy_config.load_shipped(),
        listen=HostPort("127.0.0.1", port),
        admin_port=admin,
        backend=HostPort("127.0.0.1", backend.port),
        authz=[HostPort("127.0.0.1", free_port())],  # nothing listens there
        webhooks=HostPort("127.0.0.1", free_port()),
    )
    child = await start_child(
        "envoy", envoy_config.command(envoy_config.write(config, tmp_path)), log_file=tmp_path / "envoy.log"
    )
    await wait_until(http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="Envoy", child=child)
    yield port, backend
    await child.stop()
    await backend.stop()


async def test_unreachable_authz_is_a_json_503_and_nothing_is_forwarded(envoy_without_authz):
    port, backend = envoy_without_authz
    # A well-formed key with a valid checksum: Envoy answers anything less itself, without asking authz.
    key = generate_key(Environment.LIVE).secret
    response = await raw_request(port, "POST", "/api/v1/stream/detect", {"Authorization": f"Bearer {key}"})
    assert response.status == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error == {
        "code": "auth_unavailable",
        "message": MESSAGES[DenyCode.AUTH_UNAVAILABLE],
        "request_id": response.request_id,
    }
    assert backend.received == []

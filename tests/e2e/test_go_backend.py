"""The Go middleware (go/) as the DriftLock backend uses it: `driftlock-echo`, built with `go build`, sits behind
real Envoy and verifies each context token with the gateway's real JWKS (EdDSA, fetched from the management
listener); a request that reaches it around Envoy with a forged token is refused.

Needs `go` on PATH (Debian's golang-go); skipped without it, unless DRIFTLOCK_REQUIRE_GO is set (CI sets it,
so CI never skips)."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import jwt
import pytest

from driftlock_cli import envoy_config
from driftlock_cli.supervisor import http_ok, start_child, wait_until
from driftlock_kernel.context_keys import Ed25519Key
from driftlock_kernel.settings import HostPort
from driftlock_kernel.tokens import AUDIENCE, ISSUER
from tests.conftest import TEST_PLAN
from tests.support.authz_requests import EXT_AUTHZ_SECRET
from tests.support.http import raw_request
from tests.support.net import free_port

GO_MODULE = Path(__file__).resolve().parents[2] / "go"
DETECT = "/api/v1/stream/detect"


def go_binary() -> str:
    found = shutil.which("go")
    if found is None:
        if os.environ.get("DRIFTLOCK_REQUIRE_GO"):
            pytest.fail("DRIFTLOCK_REQUIRE_GO is set but there is no `go` on PATH")
        pytest.skip("no `go` on PATH: install Debian's golang-go to run the Go backend end-to-end test")
    return found


@pytest.fixture(scope="module")
async def echo(gateway, tmp_path_factory):
    """driftlock-echo (EdDSA via the gateway's JWKS) and an Envoy of its own in front, sharing the session's
    authz replicas and database."""
    go = go_binary()
    work = tmp_path_factory.mktemp("go-echo")
    binary = work / "driftlock-echo"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off", "CGO_ENABLED": "0"}
    env.setdefault("GOCACHE", str(work / "gocache"))  # where $HOME is unset
    built = await asyncio.to_thread(
        subprocess.run,
        [go, "build", "-o", str(binary), "./cmd/driftlock-echo"],
        cwd=GO_MODULE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    jwks_url = f"http://127.0.0.1:{gateway.management_port}/.well-known/jwks.json"
    process = await asyncio.create_subprocess_exec(
        str(binary), "-listen", "127.0.0.1:0", "-jwks-url", jwks_url,
        stdout=asyncio.subprocess.PIPE, stderr=(work / "echo.log").open("wb"),
    )  # fmt: skip
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
    match = re.match(r"driftlock-echo listening on 127\.0\.0\.1:(\d+) \(EdDSA", line)
    assert match, line
    echo_port = int(match.group(1))

    port, admin = free_port(), free_port()
    config = envoy_config.render(
        envoy_config.load_shipped(),
        listen=HostPort("127.0.0.1", port),
        admin_port=admin,
        backend=HostPort("127.0.0.1", echo_port),
        authz=[HostPort("127.0.0.1", int(gateway.authz_target(i).rsplit(":", 1)[1])) for i in range(2)],
        webhooks=HostPort("127.0.0.1", free_port()),
        ext_authz_secret=EXT_AUTHZ_SECRET,
    )
    envoy = await start_child(
        "envoy-go", envoy_config.command(envoy_config.write(config, work)), log_file=work / "envoy.log"
    )
    try:
        await wait_until(http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="Envoy", child=envoy)
        yield port, echo_port
    finally:
        await envoy.stop()
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0, (work / "echo.log").read_text()


async def test_the_go_backend_behind_envoy_echoes_the_verified_context(echo, make_org, make_key):
    envoy_port, _ = echo
    org = await make_org()
    key, secret = await make_key(org.id, scopes=("detect", "read"))
    response = await raw_request(
        envoy_port, "POST", DETECT, {"Authorization": f"Bearer {secret}", "X-Driftlock-Org-Id": "spoofed"}, b"{}"
    )
    assert response.status == 200, response.body
    seen = response.json()
    assert {k: seen[k] for k in ("org_id", "key_id", "plan", "scopes", "environment", "billable")} == {
        "org_id": str(org.id),
        "key_id": str(key.id),
        "plan": TEST_PLAN,
        "scopes": ["detect", "read"],
        "environment": "live",
        "billable": True,
    }
    assert seen["headers"]["x-driftlock-org-id"] == str(org.id)
    assert seen["path"] == DETECT


def claims_for(org_id: str) -> dict:
    now = int(time.time())
    return {
        "iss": ISSUER, "aud": AUDIENCE, "sub": org_id, "key_id": "forged", "plan": "enterprise",
        "scopes": ["detect"], "env": "live", "billable": False, "iat": now, "exp": now + 300,
    }  # fmt: skip


async def test_a_direct_call_with_a_forged_token_is_refused(echo, jwt_secret, make_org, make_key):
    _, echo_port = echo
    forged_key = Ed25519Key.generate("tests-current")  # the gateway's kid, another key
    org = await make_org()
    tokens = {
        "missing_context_token": None,
        "invalid_context_token": jwt.encode(
            claims_for(str(org.id)), forged_key.private_key, algorithm="EdDSA", headers={"kid": forged_key.kid}
        ),
    }
    hs256 = jwt.encode(claims_for(str(org.id)), jwt_secret.encode(), algorithm="HS256")  # a shared secret leaked
    for code, token in [*tokens.items(), ("invalid_context_token", hs256)]:
        headers = {"x-driftlock-context": token} if token else {}
        response = await raw_request(echo_port, "POST", DETECT, {**headers, "x-driftlock-org-id": str(org.id)}, b"{}")
        assert response.status == 401, response.body
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["code"] == code
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_genuine_token_with_its_claims_changed_is_refused(echo, gateway, make_org, make_key):
    _, echo_port = echo
    org = await make_org()
    _key, secret = await make_key(org.id)
    sent = await raw_request(gateway.port, "POST", DETECT, {"Authorization": f"Bearer {secret}"}, b"{}")
    token = gateway.backend.by_request_id(sent.request_id).header("x-driftlock-context")
    genuine = await raw_request(echo_port, "GET", "/api/v1/models", {"x-driftlock-context": token})
    assert genuine.status == 200 and genuine.json()["org_id"] == str(org.id)
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["plan"] = "enterprise"
    tampered = ".".join([header, jwt.utils.base64url_encode(json.dumps(claims).encode()).decode(), signature])
    response = await raw_request(echo_port, "GET", "/api/v1/models", {"x-driftlock-context": tampered})
    assert response.status == 401 and response.json()["error"]["code"] == "invalid_context_token"

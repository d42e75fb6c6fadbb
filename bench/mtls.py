"""What mutual TLS between Envoy and authz (DRIFTLOCK_AUTHZ_TLS_*) costs authz: two replicas of the same build,
one with a plain port and one requiring a client certificate, driven alternately by the same Python gRPC client
with the same billable Check. The figure is authz's own CPU (user + system, /proc) per check: on connections
kept open, as Envoy keeps them (16 at once, each call after the last), and per new connection (TLS handshake
and one check, one after another), as after an Envoy restart or a stranger's refused handshake.

    python -m bench --only mtls     (needs trustme: pip install -e '.[test]')
"""

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from bench.bulk import CHECK, DETECT_CONTEXT
from bench.harness import Fixture, check_request_bytes, cpu_seconds
from driftlock_cli import authz_tls
from driftlock_cli.supervisor import Child, free_port, grpc_serving, start_child, wait_until
from driftlock_kernel.settings import AuthzClientTls, Settings

CONCURRENCY = 16
NEW_CONNECTIONS = 200


def _certificates(directory: Path) -> tuple[dict[str, str], AuthzClientTls]:
    import trustme

    server_ca, client_ca = trustme.CA(), trustme.CA()
    files = {}
    for name, issued in (("authz", server_ca.issue_cert("127.0.0.1")), ("envoy", client_ca.issue_cert("envoy"))):
        files[name] = (directory / f"{name}.crt", directory / f"{name}.key")
        files[name][0].write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(files[name][1]))
    server_ca.cert_pem.write_to_path(str(directory / "server-ca.crt"))
    client_ca.cert_pem.write_to_path(str(directory / "client-ca.crt"))
    server_env = Settings.environment_for(
        authz_tls_cert_path=files["authz"][0],
        authz_tls_key_path=files["authz"][1],
        authz_tls_client_ca_path=directory / "client-ca.crt",
    )
    client = AuthzClientTls(str(files["envoy"][0]), str(files["envoy"][1]), str(directory / "server-ca.crt"))
    return server_env, client


async def _start(fixture: Fixture, name: str, env: dict[str, str], tls: AuthzClientTls | None) -> tuple[Child, str]:
    port, metrics_port = free_port(), free_port()
    child = await start_child(
        name,
        [sys.executable, "-m", "driftlock_cli", "authz"],
        env=fixture.authz_env(port, metrics_port, **env),
        log_file=fixture.workdir / f"{name}.log",
    )
    target = f"127.0.0.1:{port}"
    await wait_until(grpc_serving(target, tls=tls), timeout=60, what=f"{name} to serve", child=child)
    return child, target


async def _kept_connections(target: str, tls: AuthzClientTls | None, request: bytes, metadata, seconds: float) -> int:
    calls = 0
    async with authz_tls.channel(target, tls) as channel:
        check = channel.unary_unary(CHECK, None, None)
        await check(request, metadata=metadata, timeout=5)  # connected (and handshaken) before the clock starts
        deadline = time.perf_counter() + seconds

        async def one_after_another() -> None:
            nonlocal calls
            while time.perf_counter() < deadline:
                await check(request, metadata=metadata, timeout=5)
                calls += 1

        await asyncio.gather(*(one_after_another() for _ in range(CONCURRENCY)))
    return calls


async def _new_connections(target: str, tls: AuthzClientTls | None, request: bytes, metadata) -> int:
    for _ in range(NEW_CONNECTIONS):
        # A channel of its own each time: gRPC would otherwise share one connection among channels.
        channel = authz_tls.channel(target, tls, options=[("grpc.use_local_subchannel_pool", 1)])
        async with channel:
            await channel.unary_unary(CHECK, None, None)(request, metadata=metadata, timeout=5)
    return NEW_CONNECTIONS


async def _stranger_calls(target: str, request: bytes, seconds: float) -> int:
    """Calls without the ext_authz secret on kept connections: what a stranger costs a plain port."""
    calls = 0
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(CHECK, None, None)
        deadline = time.perf_counter() + seconds

        async def one_after_another() -> None:
            nonlocal calls
            while time.perf_counter() < deadline:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await check(request, timeout=5)
                calls += 1

        await asyncio.gather(*(one_after_another() for _ in range(CONCURRENCY)))
    return calls


async def _stranger_handshakes(target: str, tls: AuthzClientTls, request: bytes) -> int:
    """TLS without a client certificate, one connection each: what a stranger costs a port requiring mTLS."""
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls.ca_path).read_bytes())
    for _ in range(NEW_CONNECTIONS):
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await channel.unary_unary(CHECK, None, None)(request, timeout=5)
    return NEW_CONNECTIONS


async def bench_mtls(fixture: Fixture, seconds: float, rounds: int) -> list[tuple[str, str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="bench-mtls-") as scratch:
        server_env, client = _certificates(Path(scratch))
        sides = {"plain": ({}, None), "mutual TLS": (server_env, client)}
        started = {label: await _start(fixture, f"authz-{i}", env, tls) for i, (label, (env, tls)) in enumerate(
            sides.items()
        )}  # fmt: skip
        request = check_request_bytes(fixture.secret, DETECT_CONTEXT)
        metadata = ((CALLER_SECRET_METADATA, fixture.ext_authz_secret),)
        kept: dict[str, list[float]] = {label: [] for label in sides}
        fresh: dict[str, list[float]] = {label: [] for label in sides}
        stranger: dict[str, list[float]] = {label: [] for label in sides}
        try:
            for _round in range(rounds):
                for label, (child, target) in started.items():
                    tls = sides[label][1]
                    pid = child.process.pid
                    before = cpu_seconds(pid)
                    calls = await _kept_connections(target, tls, request, metadata, seconds)
                    kept[label].append((cpu_seconds(pid) - before) / calls)
                    before = cpu_seconds(pid)
                    calls = await _new_connections(target, tls, request, metadata)
                    fresh[label].append((cpu_seconds(pid) - before) / calls)
                    before = cpu_seconds(pid)
                    if tls is None:
                        calls = await _stranger_calls(target, request, seconds / 2)
                    else:
                        calls = await _stranger_handshakes(target, tls, request)
                    stranger[label].append((cpu_seconds(pid) - before) / calls)
        finally:
            for child, _target in started.values():
                await child.stop()
    rows = []
    for label in sides:
        rows.append(
            ("mtls", f"check on a kept connection, {label}", f"{statistics.median(kept[label]) * 1e6:.0f} µs", "")
        )
    for label in sides:
        rows.append(("mtls", f"new connection + check, {label}", f"{statistics.median(fresh[label]) * 1e6:.0f} µs", ""))
    rows.append(
        (
            "mtls",
            "stranger: call without the secret, plain",
            f"{statistics.median(stranger['plain']) * 1e6:.0f} µs",
            "refused per call",
        )
    )
    rows.append(
        (
            "mtls",
            "stranger: handshake without a certificate, mutual TLS",
            f"{statistics.median(stranger['mutual TLS']) * 1e6:.0f} µs",
            "refused per connection",
        )
    )
    extra = statistics.median(kept["mutual TLS"]) - statistics.median(kept["plain"])
    rows.append(("mtls", "mutual TLS, extra authz CPU per check", f"{extra * 1e6:+.0f} µs", "authz CPU, /proc"))
    return rows

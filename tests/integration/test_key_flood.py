"""Invented keys from many addresses against a real authz process and real PostgreSQL (issue 23, item 1): no
flood makes authz refuse a real key. Every key serves right after a start, a key created during the flood serves
as soon as its notification arrives, and invented keys are refused as invalid, not as unavailable."""

import asyncio
import contextlib
import json
import sys

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driftlock_cli.supervisor import start_child, wait_until
from driftlock_kernel.keys import Environment, generate_key
from tests.support.authz_child import authz_env
from tests.support.authz_requests import authz_channel, bearer, check_request
from tests.support.net import eventually, free_port

SOURCES = [f"127.0.{n // 200}.{1 + n % 200}" for n in range(60)]


def code_of(response) -> str:
    if response.HasField("ok_response"):
        return "ok"
    return json.loads(response.denied_response.body)["error"]["code"]


async def serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_flood_of_invented_keys_from_many_addresses_never_rations_a_real_key(
    database_url, jwt_secret, tmp_path, make_org, make_key
):
    org = await make_org()
    existing = [secret for _key, secret in [await make_key(org.id) for _ in range(40)]]
    port = free_port()
    # A budget for looking up unknown keys that the flood spends at once: whatever it is, real keys must not
    # depend on it.
    env = authz_env(
        database_url,
        jwt_secret,
        port,
        free_port(),
        unknown_key_lookups_per_second=1,
        unknown_key_lookups_per_source_per_second=1,
    )
    target = f"127.0.0.1:{port}"
    child = await start_child("authz", [sys.executable, "-m", "driftlock_cli", "authz"], env=env,
                              log_file=tmp_path / "authz.log")  # fmt: skip
    flood_codes: dict[str, int] = {}
    try:
        await wait_until(lambda: serving(target), timeout=60, what="authz to serve", child=child)
        async with authz_channel(target) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)

            async def check(secret: str, source: str = "198.51.100.7") -> str:
                return code_of(await stub.Check(check_request(bearer(secret), source=source), timeout=10))

            stop = asyncio.Event()

            async def flood(worker: int) -> None:
                n = worker
                while not stop.is_set():
                    code = await check(generate_key(Environment.LIVE).secret, SOURCES[n % len(SOURCES)])
                    flood_codes[code] = flood_codes.get(code, 0) + 1
                    n += 8

            flooders = [asyncio.ensure_future(flood(worker)) for worker in range(8)]
            try:

                async def flooding() -> bool:
                    return sum(flood_codes.values()) >= 300

                await eventually(flooding, within=30, what="the flood to start")
                # Right after the start, during the flood: every key that existed serves.
                codes = await asyncio.gather(*(check(secret) for secret in existing))
                assert codes == ["ok"] * len(existing)
                # A key created during the flood serves as soon as this replica heard of it.
                _key, new = await make_key(org.id)

                async def new_key_serves() -> bool:
                    return await check(new) == "ok"

                await eventually(new_key_serves, within=10, what="the key created during the flood to serve")
            finally:
                stop.set()
                for task in flooders:
                    with contextlib.suppress(Exception):
                        await task
        assert set(flood_codes) == {"invalid_api_key"}, flood_codes
    finally:
        child.signal(15)
        await asyncio.wait_for(child.process.wait(), 60)

"""Floods from many client addresses through real Envoy (issue 23): what no number of addresses may do to real keys.

    python -m bench --only flood60 [--seconds 15]     (also run by --only flood)

Each flooding address is its own 127.0.x.y (the whole 127.0.0.0/8 is loopback), so Envoy and authz see 60
clients. A paying client sends billable calls at a steady 200/s from 127.0.0.2 throughout.

- invented keys: well-formed keys with valid checksums that no database holds, a new one each request, from 60
  addresses. Meanwhile a key is created every half second and tried every 50 ms from another address: the share
  served within 1 s of its creation; and authz is restarted: the share of keys that existed before the restart
  served on their first try once it reports SERVING.
- a refused known key (revoked) from 60 addresses: the paying client's success, and the audit rows added.
"""

import asyncio
import json
import sys
import time
from dataclasses import dataclass

import aiohttp

from bench.flood import DETECT, audit_rows, probe
from bench.harness import BENCH_PLAN, Fixture, grpc_serving, start_authz, start_backend, start_edge
from driftlock_cli.supervisor import start_child, wait_until
from driftlock_kernel import api_keys, db, orgs
from driftlock_kernel.keys import Environment, generate_key

ADDRESSES = [f"127.0.{1 + n // 200}.{1 + n % 200}" for n in range(60)]
IN_FLIGHT_PER_ADDRESS = 4
NEW_KEY_SOURCE = "127.0.9.1"
EXISTING_KEYS = 60


@dataclass
class FloodCount:
    sent: int = 0
    by_status: dict[int, int] | None = None

    def add(self, status: int) -> None:
        self.sent += 1
        self.by_status = self.by_status or {}
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def describe(self, seconds: float) -> str:
        statuses = ", ".join(f"{n:,} x {s or 'no answer'}" for s, n in sorted((self.by_status or {}).items()))
        return f"{self.sent / seconds:,.0f} req/s from {len(ADDRESSES)} addresses ({statuses})"


async def _flood(port: int, keys, stop: asyncio.Event, count: FloodCount) -> None:
    """Each address sends as fast as its few connections allow; `keys()` gives the key of each request."""
    url = f"http://127.0.0.1:{port}{DETECT}"

    async def one_address(address: str) -> None:
        connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=IN_FLIGHT_PER_ADDRESS)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def sender() -> None:
                while not stop.is_set():
                    try:
                        async with session.post(url, headers={"Authorization": f"Bearer {keys()}"}, data=b"{}") as r:
                            await r.read()
                            count.add(r.status)
                    except (aiohttp.ClientError, TimeoutError):
                        count.add(0)

            await asyncio.gather(*(sender() for _ in range(IN_FLIGHT_PER_ADDRESS)))

    await asyncio.gather(*(one_address(address) for address in ADDRESSES))


async def _served(session: aiohttp.ClientSession, port: int, secret: str) -> tuple[int, str]:
    try:
        async with session.post(
            f"http://127.0.0.1:{port}{DETECT}", headers={"Authorization": f"Bearer {secret}"}, data=b"{}"
        ) as response:
            body = await response.read()
            if response.status == 200:
                return 200, ""
            try:
                return response.status, json.loads(body)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                return response.status, "?"
    except (aiohttp.ClientError, TimeoutError):
        return 0, "no answer"


async def _new_keys_served_within_a_second(fixture: Fixture, port: int, org_id, count: int) -> list[float | None]:
    """Seconds from each new key's creation to its first 200 (None: not within 5 s)."""
    found: list[float | None] = []
    connector = aiohttp.TCPConnector(local_addr=(NEW_KEY_SOURCE, 0))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session,
        db.connection(fixture.url) as conn,
    ):
        for _ in range(count):
            _key, secret = await api_keys.create_key(conn, org_id)
            created = time.monotonic()
            took = None
            while time.monotonic() - created < 5.0:
                status, _code = await _served(session, port, secret)
                if status == 200:
                    took = time.monotonic() - created
                    break
                await asyncio.sleep(0.05)
            found.append(took)
            await asyncio.sleep(0.5)
    return found


async def bench_distributed_flood(fixture: Fixture, seconds: float) -> list[tuple[str, str, str, str]]:
    seconds = max(seconds, 8.0)
    rows: list[tuple[str, str, str, str]] = []
    async with db.connection(fixture.url) as conn:
        org = await orgs.create_org(conn, "flood60", plan=BENCH_PLAN)
        existing = [(await api_keys.create_key(conn, org.id))[1] for _ in range(EXISTING_KEYS)]
        revoked_key, revoked = await api_keys.create_key(conn, org.id)
        await api_keys.revoke_key(conn, revoked_key.id)
    backend, backend_port = await start_backend(fixture)
    authz, authz_port, metrics_port = await start_authz(fixture, "authz-flood60")
    children = [backend, authz]
    try:
        edge, port, _admin = await start_edge(fixture, "flood60", backend_port=backend_port, authz_ports=[authz_port])
        children.append(edge)

        # --- invented keys from 60 addresses ---------------------------------------------------------------
        stop, count = asyncio.Event(), FloodCount()
        flooding = asyncio.create_task(_flood(port, lambda: generate_key(Environment.LIVE).secret, stop, count))
        started = time.monotonic()
        await asyncio.sleep(1.0)
        paying = asyncio.create_task(probe(port, fixture.secret, seconds))
        new_keys = await _new_keys_served_within_a_second(fixture, port, org.id, 8)
        # A restart during the flood: the same port, so Envoy's cluster finds it again.
        env = fixture.authz_env(authz_port, metrics_port)
        stop_began = time.monotonic()
        await authz.stop()
        children.remove(authz)
        restart_began = time.monotonic()
        authz = await start_child(
            "authz-flood60-again",
            [sys.executable, "-m", "driftlock_cli", "authz"],
            env=env,
            log_file=fixture.workdir / "authz-flood60-again.log",
        )
        children.append(authz)
        await wait_until(grpc_serving(f"127.0.0.1:{authz_port}"), timeout=60, what="authz again", child=authz)
        serving_at = time.monotonic()
        serving_after = serving_at - restart_began
        connector = aiohttp.TCPConnector(local_addr=(NEW_KEY_SOURCE, 0))
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
            after_restart = await asyncio.gather(*(_served(session, port, secret) for secret in existing))
        during = await paying
        stop.set()
        await flooding
        flood_seconds = time.monotonic() - started
        within = [t for t in new_keys if t is not None and t <= 1.0]
        answered = [t for t in new_keys if t is not None]
        served_after_restart = sum(1 for status, _ in after_restart if status == 200)
        failures: dict[str, int] = {}
        for status, code in after_restart:
            if status != 200:
                failures[f"{status} {code}"] = failures.get(f"{status} {code}", 0) + 1
        rows += [
            ("flood60", "invented keys, 60 addresses", f"{count.sent:,}", count.describe(flood_seconds)),
            (
                "flood60",
                "  new keys served within 1 s",
                f"{len(within) / len(new_keys) * 100:.0f} %",
                f"{len(within)} of {len(new_keys)}"
                + (f"; slowest {max(answered) * 1000:.0f} ms, the request's own latency included" if answered else ""),
            ),
            (
                "flood60",
                "  keys served right after an authz restart",
                f"{served_after_restart / len(existing) * 100:.0f} %",
                f"{served_after_restart} of {len(existing)}, first try; SERVING {serving_after:.1f}s after the restart"
                + (f" ({failures})" if failures else ""),
            ),
        ]
        # The only replica is down from its stop until it serves again: the paying client's calls in flight then
        # measure the restart, not the flood, and are shown apart.
        in_restart, outside_restart = during.split(stop_began, serving_at)
        rows.append(
            (
                "flood60",
                "  paying client served, outside the restart",
                f"{outside_restart.success_rate * 100:.2f} %",
                outside_restart.describe(),
            )
        )
        if in_restart.statuses:
            rows.append(
                (
                    "flood60",
                    "  ... while its only replica restarted",
                    f"{in_restart.success_rate * 100:.2f} %",
                    in_restart.describe()
                    + f" in flight in the {serving_at - stop_began:.1f} s from its stop to SERVING",
                )
            )

        # --- a refused known key from 60 addresses -------------------------------------------------------
        audit_before = await audit_rows(fixture.url)
        stop, count = asyncio.Event(), FloodCount()
        flooding = asyncio.create_task(_flood(port, lambda: revoked, stop, count))
        started = time.monotonic()
        await asyncio.sleep(0.5)
        during = await probe(port, fixture.secret, seconds - 1)
        stop.set()
        await flooding
        flood_seconds = time.monotonic() - started
        await asyncio.sleep(2.5)  # a second's audit batches written
        audit = await audit_rows(fixture.url) - audit_before
        rows += [
            ("flood60", "revoked key, 60 addresses", f"{count.sent:,}", count.describe(flood_seconds)),
            ("flood60", "  paying client served meanwhile", f"{during.success_rate * 100:.2f} %", during.describe()),
            ("flood60", "  probe latency meanwhile", during.latency(), ""),
            (
                "flood60",
                "  audit rows added",
                f"{audit:,}",
                f"{audit / max(1, count.sent) * 1e4:,.1f} per 10,000 refusals over {flood_seconds:.0f}s",
            ),
        ]
    finally:
        for child in reversed(children):
            await child.stop()
    return rows

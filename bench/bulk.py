"""What the cold-path and memory parts share: many keys created at once, many Checks sent at once, the RSS of a
process, and the statements the database ran.

Keys are made with the kernel's own key functions and stored with one COPY, not one CLI call each; a key that
looks right but is in no database is one made the same way and never stored.
"""

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from authz_service.check.ext_authz import CALLER_SECRET_METADATA
from bench.harness import BENCH_PLAN, Fixture, metric_total
from driftlock_kernel import db
from driftlock_kernel.keys import ALL_SCOPES, Environment, generate_key

CHECK = "/envoy.service.auth.v3.Authorization/Check"
DETECT_CONTEXT = {"scope": "detect", "billable": "true", "product": "stream", "units": "1"}


async def create_keys(fixture: Fixture, count: int, *, keys_per_org: int) -> list[str]:
    """`count` live keys on the bench's unlimited plan, `keys_per_org` to an organisation: their secrets."""
    orgs = [uuid.uuid4() for _ in range((count + keys_per_org - 1) // keys_per_org)]
    new = [generate_key(Environment.LIVE) for _ in range(count)]
    scopes = [str(scope) for scope in ALL_SCOPES]
    async with db.connection(fixture.url) as conn, conn.transaction():
        await conn.copy_records_to_table(
            "organizations",
            schema_name="driftlock",
            columns=["id", "name", "plan_name"],
            records=[(org, f"bench-cold-{org.hex[:8]}", BENCH_PLAN) for org in orgs],
        )
        await conn.copy_records_to_table(
            "api_keys",
            schema_name="driftlock",
            columns=["org_id", "key_hash", "display_prefix", "environment", "scopes"],
            records=[
                (orgs[i // keys_per_org], key.hash, key.display_prefix, key.environment.value, scopes)
                for i, key in enumerate(new)
            ],
        )
    return [key.secret for key in new]


def unknown_keys(count: int) -> list[str]:
    """Well-formed keys with valid checksums that no database holds (as anyone can compute them)."""
    return [generate_key(Environment.LIVE).secret for _ in range(count)]


def source_address(index: int) -> str:
    """A distinct client address per index (up to 2^24): 10.x.y.z."""
    return f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"


def check_requests(
    secrets: Sequence[str], sources: Sequence[str], context: dict[str, str] = DETECT_CONTEXT
) -> list[bytes]:
    """A serialized CheckRequest per secret, as Envoy sends it for a billable call from `sources[i]`; each with a
    request id of its own, so that a key sent again is metered again."""
    from envoy.service.auth.v3 import external_auth_pb2

    out = []
    for secret, source in zip(secrets, sources, strict=True):
        request = external_auth_pb2.CheckRequest()
        attributes = request.attributes
        attributes.source.address.socket_address.address = source
        http = attributes.request.http
        http.method, http.path = "POST", "/api/v1/stream/detect"
        http.headers.update({"authorization": f"Bearer {secret}", "x-request-id": uuid.uuid4().hex, "host": "bench"})
        attributes.context_extensions.update(context)
        out.append(request.SerializeToString())
    return out


@dataclass
class Sent:
    """What a batch of Checks came to: answers by contract code ('ok' when allowed), and the time it took."""

    codes: Counter[str]
    seconds: float
    slowest: float = 0.0  # seconds, the longest single Check (a stall of authz shows here)
    latencies: list[float] = field(default_factory=list)  # seconds, each Check's, as it was answered

    @property
    def rate(self) -> float:
        return sum(self.codes.values()) / self.seconds

    def only(self, *expected: str, log: Path | None = None) -> None:
        """Refuse the run (no figure) unless every answer was one of `expected`; with the end of the server's
        `log`, which says why."""
        unexpected = {code: n for code, n in self.codes.items() if code not in expected}
        if unexpected:
            tail = ""
            if log is not None and log.exists():
                tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(
                f"expected only {', '.join(expected)}, got {dict(self.codes)}: no figure from this run{tail}"
            )


async def send_checks(fixture: Fixture, port: int, requests: Sequence[bytes], *, in_flight: int = 64) -> Sent:
    """Every request once, `in_flight` at a time, over one gRPC connection. Requests and answers stay bytes
    (no serializer in the client), so that the client costs the CPU authz shares with it as little as can be."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    codes: Counter[str] = Counter()
    metadata = ((CALLER_SECRET_METADATA, fixture.ext_authz_secret),)
    pending = iter(requests)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)

        latencies: list[float] = []

        async def worker() -> None:
            for body in pending:
                sent = time.perf_counter()
                try:
                    answer = external_auth_pb2.CheckResponse.FromString(
                        await check(body, metadata=metadata, timeout=10)
                    )
                except grpc.aio.AioRpcError as error:
                    codes[f"grpc {error.code().name}"] += 1
                    continue
                finally:
                    latencies.append(time.perf_counter() - sent)
                if answer.status.code == 0:
                    codes["ok"] += 1
                else:
                    codes[json.loads(answer.denied_response.body)["error"]["code"]] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return Sent(codes, time.perf_counter() - started, max(latencies, default=0.0), latencies)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process (VmRSS; VmHWM is its peak), in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no {field} for process {pid}")


async def key_lookups(metrics_port: int) -> float:
    """Key look-ups authz sent to the database (its cache's misses, answered or failed)."""
    results = ("miss", "stale", "error")
    return sum([await metric_total(metrics_port, "driftlock_authz_cache_events", result=r) for r in results])


# --- statements as the database counts them -----------------------------------------------------------------


class Statements:
    """Statements the database ran, from pg_stat_statements: `snapshot()` before, `since(snapshot)` after.
    Counts every session of the database but the bench's own readings, so nothing else may use it meanwhile."""

    def __init__(self, url: str):
        self._url = url

    async def snapshot(self) -> dict[int, tuple[str, int]]:
        async with db.connection(self._url) as conn:
            rows = await conn.fetch(
                """SELECT queryid, query, calls FROM pg_stat_statements
                   WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND query NOT LIKE '%pg_stat_statements%'"""
            )
        return {row["queryid"]: (row["query"], row["calls"]) for row in rows}

    async def since(self, before: dict[int, tuple[str, int]]) -> "StatementCount":
        after = await self.snapshot()
        by_query: Counter[str] = Counter()
        for queryid, (query, calls) in after.items():
            if delta := calls - before.get(queryid, ("", 0))[1]:
                by_query[" ".join(query.split())] += delta
        return StatementCount(by_query)


# Fragments of the statements the cold path is expected to send (authz_service.check.grants, meter_store).
KEY_LOOKUP = "FROM driftlock.api_keys k JOIN driftlock.organizations o"
USAGE_LOAD = "FROM driftlock.usage_totals WHERE org_id"


@dataclass(frozen=True)
class StatementCount:
    by_query: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.by_query.values())

    def matching(self, fragment: str) -> int:
        return sum(n for query, n in self.by_query.items() if fragment in query)

    def summary(self) -> str:
        """Key look-ups, usage loads, and the most frequent other statement."""
        lookups, loads = self.matching(KEY_LOOKUP), self.matching(USAGE_LOAD)
        others = Counter({q: n for q, n in self.by_query.items() if KEY_LOOKUP not in q and USAGE_LOAD not in q})
        text = f"key look-ups {lookups:,}, usage loads {loads:,}, other {others.total():,}"
        if others:
            query, n = others.most_common(1)[0]
            text += f" (most: {n:,} of {query[:40]!r})"
        return text


@contextlib.asynccontextmanager
async def statements_counted(fixture: Fixture) -> AsyncIterator[Statements | None]:
    """pg_stat_statements for the duration of a part, or None when the database cannot have it. The embedded
    server is restarted with the module loaded, and again without it afterwards, so that no other part pays for
    it; a server named by DATABASE_URL is used as it is (with the module if it has it loaded)."""
    async with db.connection(fixture.url) as conn:
        loaded = "pg_stat_statements" in await conn.fetchval("SHOW shared_preload_libraries")
        restart = not loaded and fixture.embedded is not None
        if restart:
            await conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    if restart:
        await _restart(fixture)
    try:
        statements = None
        if loaded or restart:
            try:
                async with db.connection(fixture.url) as conn:
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                statements = Statements(fixture.url)
            except db.DATABASE_ERRORS as error:  # not this user's to create: count on authz's side only
                print(f"no pg_stat_statements ({error}); statements are counted by authz's metrics only")
        yield statements
    finally:
        if restart:
            async with db.connection(fixture.url) as conn:
                await conn.execute("ALTER SYSTEM RESET shared_preload_libraries")
            await _restart(fixture)


async def _restart(fixture: Fixture) -> None:
    assert fixture.embedded is not None
    await asyncio.to_thread(fixture.embedded.stop)
    await asyncio.to_thread(fixture.embedded.start)

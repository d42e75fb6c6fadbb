"""Floods through real Envoy: what a client that pays nothing can do to paying traffic. Bounded runs, one client.

    python -m bench --only flood [--seconds 15]

A flood comes from one client (wrk, from 127.0.0.1) as fast as it can send, while a probe sends legitimate
billable calls at a steady 200/s from another address (127.0.0.2), as a paying customer elsewhere would:

- garbage:  missing, malformed and invalid-checksum credentials (a third each). Reports the probe's success rate
            and latency beside a quiet baseline, and how many of the flood's requests cost a call into authz.
- unknown:  well-formed keys with valid checksums that no database holds, each one new. Reports the database
            look-ups they caused, per 10,000 such requests, and the probe's success rate.
- amplification: audit rows and authz log lines per 10,000 denials (over both floods); log lines of the webhook
            service per 10,000 deliveries with a bad signature. (Log lines during a database outage are counted
            by tests/integration/test_authz_outage.py, which can cut the database.)
"""

import asyncio
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.harness import Fixture, metric_total, run, start_authz, start_backend, start_edge
from driftlock_cli.supervisor import free_port, http_ok, start_child, wait_until
from driftlock_kernel import db
from driftlock_kernel.keys import Environment, generate_key

PROBE_RATE = 200  # legitimate calls per second
PROBE_SOURCE = "127.0.0.2"
# Enough connections that the flood is limited by what the gateway can answer, not by wrk waiting for answers.
FLOOD_THREADS = 2
FLOOD_CONNECTIONS = int(os.environ.get("BENCH_FLOOD_CONNECTIONS", "2000"))
DETECT = "/api/v1/stream/detect"

# wrk sends the requests of a file of header lines, in turn; each thread starts at its own place in the file, so
# that no two threads send the same key at about the same time. Requests are built once, before the flood.
WRK_SCRIPT = """
local lines = {}
for line in io.lines("@LINES@") do lines[#lines + 1] = line end
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
function init(args)
  requests = {}
  for i, line in ipairs(lines) do
    local headers = {}
    if line ~= "" then
      local name, value = line:match("^([^:]+):%s*(.*)$")
      headers[name] = value
    end
    requests[i] = wrk.format("@METHOD@", "@PATH@", headers, @BODY@)
  end
  index = (id * math.floor(#requests / @THREADS@)) % #requests
end
function request()
  index = index % #requests + 1
  return requests[index]
end
"""


@dataclass
class FloodResult:
    requests: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def flood(
    fixture: Fixture,
    port: int,
    lines: list[str],
    seconds: float,
    *,
    name: str,
    path: str = DETECT,
    method: str = "POST",
    body: str = "",
) -> FloodResult:
    folder = fixture.workdir / "flood"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.lines").write_text("\n".join(lines) + "\n")
    script = (
        WRK_SCRIPT.replace("@LINES@", str(folder / f"{name}.lines"))
        .replace("@METHOD@", method)
        .replace("@PATH@", path)
        .replace("@BODY@", repr(body) if body else "nil")
        .replace("@THREADS@", str(FLOOD_THREADS))
    )
    (folder / f"{name}.lua").write_text(script)
    output = await run(
        [
            "wrk",
            "-t",
            str(FLOOD_THREADS),
            "-c",
            str(FLOOD_CONNECTIONS),
            "-d",
            f"{round(seconds)}s",
            "-s",
            str(folder / f"{name}.lua"),
            f"http://127.0.0.1:{port}{path}",
        ]
    )
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if total is None:
        raise RuntimeError(f"could not read wrk's output:\n{output}")
    elapsed = float(total.group(2)) * {"s": 1.0, "ms": 0.001, "m": 60.0}[total.group(3)]
    return FloodResult(int(total.group(1)), elapsed)


@dataclass
class ProbeResult:
    statuses: list[int]
    latencies: list[float]
    codes: list[str]  # the error code of each answer that was not a 200 ("" for a 200)
    sent_at: list[float]  # time.monotonic() when each was sent

    def split(self, start: float, end: float) -> tuple["ProbeResult", "ProbeResult"]:
        """The calls in flight at some moment of [start, end] (a restart of the only replica, say), and the rest."""
        inside: list[int] = []
        outside: list[int] = []
        for n, (sent, took) in enumerate(zip(self.sent_at, self.latencies, strict=True)):
            (inside if sent <= end and sent + took >= start else outside).append(n)

        def pick(indexes: list[int]) -> ProbeResult:
            return ProbeResult(
                [self.statuses[n] for n in indexes],
                [self.latencies[n] for n in indexes],
                [self.codes[n] for n in indexes],
                [self.sent_at[n] for n in indexes],
            )

        return pick(inside), pick(outside)

    @property
    def success_rate(self) -> float:
        return sum(1 for s in self.statuses if s == 200) / len(self.statuses)

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))]

    def describe(self) -> str:
        failures: dict[str, int] = {}
        for status, code in zip(self.statuses, self.codes, strict=True):
            if status != 200:
                what = f"{status} {code}" if status else "no answer"
                failures[what] = failures.get(what, 0) + 1
        detail = ", ".join(f"{n} {what}" for what, n in sorted(failures.items()))
        return f"{len(self.statuses) - sum(failures.values()):,} of {len(self.statuses):,}" + (
            f" ({detail})" if detail else ""
        )

    def latency(self) -> str:
        return (
            f"p50 {self.percentile(0.5) * 1000:.1f} ms, p99 {self.percentile(0.99) * 1000:.1f} ms, "
            f"max {max(self.latencies) * 1000:.0f} ms"
        )


async def probe(port: int, key: str, seconds: float, rate: int = PROBE_RATE) -> ProbeResult:
    """Legitimate billable calls at a steady rate from PROBE_SOURCE, each timed from send to last byte."""
    connector = aiohttp.TCPConnector(local_addr=(PROBE_SOURCE, 0), limit=256)
    timeout = aiohttp.ClientTimeout(total=10)
    url = f"http://127.0.0.1:{port}{DETECT}"
    headers = {"Authorization": f"Bearer {key}"}

    async def one(session: aiohttp.ClientSession) -> tuple[int, float, str, float]:
        sent_at = time.monotonic()
        started = time.perf_counter()
        code = ""
        try:
            async with session.post(url, headers=headers, data=b"{}") as response:
                body = await response.read()
                status = response.status
            if status != 200:
                try:
                    code = json.loads(body)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "?"
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        return status, time.perf_counter() - started, code, sent_at

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for n in range(int(seconds * rate)):
            await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
            tasks.append(asyncio.create_task(one(session)))
        results = await asyncio.gather(*tasks)
    return ProbeResult(
        [s for s, _, _, _ in results], [t for _, t, _, _ in results], [c for _, _, c, _ in results],
        [sent for _, _, _, sent in results],
    )  # fmt: skip


def garbage_lines(count: int) -> list[str]:
    """Missing, malformed and invalid-checksum credentials, a third each, every key different."""
    lines = []
    for n in range(count):
        kind = n % 3
        if kind == 0:
            lines.append("")
        elif kind == 1:
            lines.append(f"Authorization: Bearer dlk_live_{secrets.token_hex(6)}")
        else:
            valid = generate_key(Environment.LIVE).secret
            # The last checksum character changed: well-formed, but the checksum no longer matches.
            broken = valid[:-1] + ("A" if valid[-1] != "A" else "B")
            lines.append(f"Authorization: Bearer {broken}")
    return lines


def unknown_lines(count: int) -> list[str]:
    return [f"Authorization: Bearer {generate_key(Environment.LIVE).secret}" for _ in range(count)]


async def audit_rows(url: str) -> int:
    """Rows in the audit log, of whatever form this version writes (single entries, and aggregated denials)."""
    async with db.connection(url) as conn:
        rows = await conn.fetchval("SELECT count(*) FROM driftlock.audit_log")
        if await conn.fetchval("SELECT to_regclass('driftlock.audit_denials') IS NOT NULL"):
            rows += await conn.fetchval("SELECT count(*) FROM driftlock.audit_denials")
    return rows


def log_lines(path: Path) -> int:
    return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0


async def _key_lookups(metrics_port: int) -> float:
    """Key look-ups authz sent to the database: every fetch attempt, answered (miss) or failed (stale, error)."""
    return sum(
        [await metric_total(metrics_port, "driftlock_authz_cache_events", result=r) for r in ("miss", "stale", "error")]
    )


async def settle(seconds: float = 2.5) -> None:
    """Long enough for a second's batches (audit, meter) to be written."""
    await asyncio.sleep(seconds)


async def bench_flood(fixture: Fixture, seconds: float) -> list[tuple[str, str, str, str]]:
    seconds = max(seconds, 5.0)
    rows: list[tuple[str, str, str, str]] = []
    backend, backend_port = await start_backend(fixture)
    authz, authz_port, metrics_port = await start_authz(fixture, "authz-flood", DRIFTLOCK_LOG_LEVEL="INFO")
    children = [backend, authz]
    try:
        edge, port, _admin = await start_edge(fixture, "flood", backend_port=backend_port, authz_ports=[authz_port])
        children.append(edge)
        authz_log = fixture.workdir / "authz-flood.log"

        quiet = await probe(port, fixture.secret, 3)
        rows.append(("flood", "quiet: legitimate calls served", quiet.describe(), quiet.latency()))

        checks_before = await metric_total(metrics_port, "driftlock_authz_checks")
        denials_before = await metric_total(metrics_port, "driftlock_authz_checks", decision="deny")
        audit_before, lines_before = await audit_rows(fixture.url), log_lines(authz_log)
        flooding = asyncio.create_task(flood(fixture, port, garbage_lines(30_000), seconds, name="garbage"))
        await asyncio.sleep(0.5)  # the flood at full rate before the probe starts
        during = await probe(port, fixture.secret, seconds - 1)
        garbage = await flooding
        checks = await metric_total(metrics_port, "driftlock_authz_checks") - checks_before - len(during.statuses)
        rows += [
            ("flood", "garbage credentials sent", f"{garbage.requests:,}", f"{garbage.rate:,.0f} req/s, one client"),
            (
                "flood",
                "  of which reached authz",
                f"{checks:,.0f}",
                f"{checks / max(1, garbage.requests) * 100:.1f} % (each a gRPC call)",
            ),
            (
                "flood",
                "  legitimate calls served meanwhile",
                f"{during.success_rate * 100:.2f} %",
                during.describe(),
            ),
            ("flood", "  probe latency meanwhile", during.latency(), ""),
        ]

        lookups = ("miss", "stale", "error")
        queries_before = sum(
            [await metric_total(metrics_port, "driftlock_authz_cache_events", result=r) for r in lookups]
        )
        flooding = asyncio.create_task(flood(fixture, port, unknown_lines(150_000), seconds, name="unknown"))
        await asyncio.sleep(0.5)
        during = await probe(port, fixture.secret, seconds - 1)
        unknown = await flooding
        queries = await _key_lookups(metrics_port) - queries_before
        rows += [
            ("flood", "unknown valid-checksum keys sent", f"{unknown.requests:,}", f"{unknown.rate:,.0f} req/s"),
            (
                "flood",
                "  key look-ups in the database",
                f"{queries:,.0f}",
                f"{queries / max(1, unknown.requests) * 10_000:,.0f} per 10,000 unknown keys, "
                f"{queries / unknown.seconds:,.0f}/s",
            ),
            ("flood", "  legitimate calls served meanwhile", f"{during.success_rate * 100:.2f} %", during.describe()),
            ("flood", "  probe latency meanwhile", during.latency(), ""),
        ]

        await settle()
        denials = await metric_total(metrics_port, "driftlock_authz_checks", decision="deny") - denials_before
        refused = garbage.requests + unknown.requests
        audit = await audit_rows(fixture.url) - audit_before
        lines = log_lines(authz_log) - lines_before
        rows += [
            ("amplification", "denials the two floods received", f"{refused:,}", f"{denials:,.0f} of them by authz"),
            (
                "amplification",
                "  audit rows written",
                f"{audit:,}",
                f"{audit / refused * 1e4:,.1f} per 10,000 denials "
                f"({audit / max(1, denials) * 1e4:,.1f} per 10,000 made by authz)",
            ),
            ("amplification", "  authz log lines", f"{lines:,}", f"{lines / refused * 10_000:,.1f} per 10,000 denials"),
        ]
        rows += await _webhook_signatures(fixture, backend_port, authz_port, seconds / 2, children)
    finally:
        for child in reversed(children):
            await child.stop()
    return rows


async def _webhook_signatures(
    fixture: Fixture, backend_port: int, authz_port: int, seconds: float, children: list
) -> list[tuple[str, str, str, str]]:
    port = free_port()
    secret = "whsec_" + secrets.token_urlsafe(32)
    webhooks = await start_child(
        "webhooks-flood",
        [sys.executable, "-m", "driftlock_cli", "webhooks"],
        env={
            "DATABASE_URL": fixture.url,
            "STRIPE_WEBHOOK_SECRET": secret,
            "DRIFTLOCK_WEBHOOKS_HOST": "127.0.0.1",
            "DRIFTLOCK_WEBHOOKS_PORT": str(port),
        },
        log_file=fixture.workdir / "webhooks-flood.log",
    )
    children.append(webhooks)
    await wait_until(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=60, what="webhooks", child=webhooks)
    edge, edge_port, _admin = await start_edge(
        fixture, "webhooks", backend_port=backend_port, authz_ports=[authz_port], webhooks_port=port
    )
    children.append(edge)
    log = fixture.workdir / "webhooks-flood.log"
    before = log_lines(log)
    forged = f"Stripe-Signature: t={int(time.time())},v1={secrets.token_hex(32)}"
    result = await flood(
        fixture, edge_port, [forged], seconds, name="webhooks", path="/stripe/webhook", body='{"id": "evt_forged"}'
    )
    await settle(1.0)
    lines = log_lines(log) - before
    return [
        ("amplification", "deliveries with a bad signature", f"{result.requests:,}", f"{result.rate:,.0f} req/s"),
        ("amplification", "  webhook log lines", f"{lines:,}", f"{lines / result.requests * 10_000:,.1f} per 10,000"),
    ]

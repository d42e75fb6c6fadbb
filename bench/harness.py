"""What every benchmark part stands on: a database with a key, the real processes, and reading their metrics."""

import asyncio
import os
import re
import secrets
import statistics
import struct
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from driftlock_cli import envoy_config
from driftlock_cli.embedded_db import EmbeddedDatabase
from driftlock_cli.supervisor import Child, free_port, grpc_serving, http_ok, start_child, tcp_open, wait_until
from driftlock_kernel import api_keys, context_keys, db, migrate, orgs, plans
from driftlock_kernel.billing import Overage
from driftlock_kernel.settings import HostPort, Settings

HERE = Path(__file__).resolve().parent
BENCH_PLAN = "bench-unlimited"
# A rate limit no benchmark reaches: every check runs the limiter and answers its headers, none is refused.
RATE_LIMITED_PLAN = "bench-rate-limited"
# The client address every benchmark Check names (the network a controlled key allows).
BENCH_SOURCE = "127.0.0.1"
BENCH_SOURCE_NETWORK = "127.0.0.0/8"
DEFAULT_REQUESTS_PER_SOURCE = Settings().edge_requests_per_source


class Fixture:
    """A database with a plan without limits, an organisation and a live key."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.embedded: EmbeddedDatabase | None = None
        self.url = os.environ.get("DATABASE_URL", "")
        self.jwt_secret = secrets.token_urlsafe(48)
        self.ext_authz_secret = secrets.token_urlsafe(48)
        # Context tokens as production signs them by default (EdDSA).
        self.signing_key = context_keys.Ed25519Key.generate()
        self.secret = ""  # a live key on BENCH_PLAN
        self.rate_limited_secret = ""  # a live key on RATE_LIMITED_PLAN
        self.controlled_secret = ""  # a live key on RATE_LIMITED_PLAN with every customer control set

    async def __aenter__(self) -> "Fixture":
        if not self.url:
            self.embedded = await asyncio.to_thread(EmbeddedDatabase, self.workdir / "pgdata")
            self.url = self.embedded.url
        async with db.connection(self.url) as conn:
            await migrate.migrate(conn)
            await plans.upsert_plan(conn, BENCH_PLAN, included_units=10**12, overage=Overage.SOFT, rate_limit_rps=None)
            org = await orgs.create_org(conn, f"bench-{uuid.uuid4().hex[:6]}", plan=BENCH_PLAN)
            _key, self.secret = await api_keys.create_key(conn, org.id)
            await plans.upsert_plan(
                conn, RATE_LIMITED_PLAN, included_units=10**12, overage=Overage.SOFT, rate_limit_rps=1e9
            )
            limited = await orgs.create_org(conn, f"bench-limited-{uuid.uuid4().hex[:6]}", plan=RATE_LIMITED_PLAN)
            _key, self.rate_limited_secret = await api_keys.create_key(conn, limited.id)
            # Every customer control configured, none of them reached: what issue 22 holds the check to.
            controlled = await orgs.create_org(conn, f"bench-controlled-{uuid.uuid4().hex[:6]}", plan=RATE_LIMITED_PLAN)
            await orgs.set_max_overage_units(conn, controlled.id, 10**12)
            _key, self.controlled_secret = await api_keys.create_key(
                conn,
                controlled.id,
                max_units_per_period=10**15,
                rate_limit_rps=1e6,
                allowed_cidrs=["10.0.0.0/8", "2001:db8::/32", BENCH_SOURCE_NETWORK],
                products=["stream"],
            )
        return self

    async def __aexit__(self, *exc) -> None:
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    def authz_env(self, port: int, metrics_port: int, **overrides: str) -> dict[str, str]:
        return {
            "DATABASE_URL": self.url,
            "DRIFTLOCK_JWT_SECRET": self.jwt_secret,
            "DRIFTLOCK_EXT_AUTHZ_SECRET": self.ext_authz_secret,
            "DRIFTLOCK_CONTEXT_SIGNING_KEYS": self.signing_key.entry(),
            "DRIFTLOCK_AUTHZ_HOST": "127.0.0.1",
            "DRIFTLOCK_AUTHZ_PORT": str(port),
            "DRIFTLOCK_AUTHZ_METRICS_PORT": str(metrics_port),
            "DRIFTLOCK_LOG_LEVEL": "WARNING",
            **overrides,
        }


async def start_authz(fixture: Fixture, name: str, *, null: bool = False, **env_overrides: str):
    """authz (or the do-nothing server) on free ports: (child, port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    if null:
        argv = [sys.executable, "-m", "bench.null_authz", "--port", str(port)]
        env: dict[str, str] = {}
        metrics_port = 0
    else:
        argv = [sys.executable, "-m", "driftlock_cli", "authz"]
        env = fixture.authz_env(port, metrics_port, **env_overrides)
    child = await start_child(name, argv, env=env, log_file=fixture.workdir / f"{name}.log")
    await wait_until(grpc_serving(f"127.0.0.1:{port}"), timeout=60, what=f"{name} to serve", child=child)
    return child, port, metrics_port


async def start_backend(fixture: Fixture) -> tuple[Child, int]:
    """A backend that costs next to nothing: an Envoy answering 200 itself (backend_envoy.yaml)."""
    port = free_port()
    config = fixture.workdir / f"backend-{port}.yaml"
    config.write_text((HERE / "backend_envoy.yaml").read_text().replace("PORT", str(port)))
    child = await start_child(f"backend-{port}", envoy_config.command(config), log_file=fixture.workdir / "backend.log")
    await wait_until(tcp_open("127.0.0.1", port), timeout=30, what="the backend", child=child)
    return child, port


async def start_edge(
    fixture: Fixture,
    label: str,
    *,
    backend_port: int,
    authz_ports: Sequence[int],
    webhooks_port: int | None = None,
    concurrency: int = 1,
    requests_per_source: int = DEFAULT_REQUESTS_PER_SOURCE,
) -> tuple[Child, int, int]:
    """Envoy with the shipped configuration, rendered for these ports: (child, port, admin port). A throughput
    run sends everything from one address, so it passes `requests_per_source=0`; a flood keeps the limit."""
    port, admin = free_port(), free_port()
    folder = fixture.workdir / f"edge-{label}"
    folder.mkdir()
    config = envoy_config.render(
        envoy_config.load_shipped(),
        listen=HostPort("127.0.0.1", port),
        admin_port=admin,
        backend=HostPort("127.0.0.1", backend_port),
        authz=[HostPort("127.0.0.1", p) for p in authz_ports],
        webhooks=HostPort("127.0.0.1", webhooks_port or free_port()),
        ext_authz_secret=fixture.ext_authz_secret,
        requests_per_source=requests_per_source,
    )
    child = await start_child(
        f"edge-{label}",
        envoy_config.command(envoy_config.write(config, folder), concurrency=concurrency),
        log_file=folder / "envoy.log",
    )
    await wait_until(http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="Envoy", child=child)
    return child, port, admin


async def run(argv: list[str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return out.decode(errors="replace")


async def scrape(port: int) -> list:
    """The metric families a Prometheus endpoint serves."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return list(text_string_to_metric_families(text))


async def metric_samples(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every `<name>_total` sample a Prometheus endpoint serves, by its labels."""
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in await scrape(port)
        if f.name == name
        for s in f.samples
        if s.name.endswith("_total")
    }


async def gauge_samples(port: int, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of a gauge a Prometheus endpoint serves, by its labels."""
    return {tuple(sorted(s.labels.items())): s.value for f in await scrape(port) if f.name == name for s in f.samples}


def check_request_bytes(secret: str, context: dict[str, str], source: str = BENCH_SOURCE) -> bytes:
    """One Check as Envoy sends it for a POST to the stream detection route from `source`, serialised."""
    from envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", "/api/v1/stream/detect"
    http.headers.update({"authorization": f"Bearer {secret}", "x-request-id": "bench", "host": "bench"})
    request.attributes.context_extensions.update(context)
    request.attributes.source.address.socket_address.address = source
    return request.SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    """A message framed as gRPC sends it (what h2load sends, over and over): not compressed, length, bytes."""
    return struct.pack(">?I", False, len(message)) + message


def h2load_rps(output: str) -> float:
    """Requests a second from h2load's output; an error when any request failed. h2load counts a gRPC error
    as a success (HTTP 200, the status is in the trailers): callers check the server's own counters."""
    match = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", output)
    failed = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", output)
    if match is None or failed is None:
        raise RuntimeError(f"could not read h2load's output:\n{output}")
    if int(failed.group(2)):
        raise RuntimeError(f"h2load saw failures:\n{output}")
    return float(match.group(1))


async def metric_total(port: int, name: str, **labels: str) -> float:
    """The sum of a counter's samples whose labels include `labels`."""
    samples = await metric_samples(port, name)
    return sum(value for key, value in samples.items() if set(labels.items()) <= set(key))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


# What the do-nothing baseline usually does on this kind of machine (2 cores), from shared/FACTS.md: h2load 8x16
# straight to it, and wrk through Envoy. A run whose baseline falls far below this shared the machine with
# something else, and its ratio says more about the neighbour than about authz. BENCH_USUAL_<PART>_RPS overrides.
USUAL_BASELINE_RPS = {"grpc": 5500.0, "edge": 3000.0}
# Below this share of the usual rate a baseline is "far below" it.
FAR_BELOW_USUAL = 0.6
# Rounds whose ratios differ by more than this were not measured on a steady machine.
MAX_SPREAD = 0.05


@dataclass(frozen=True)
class SideBySide:
    """One side's rates and the baseline's, measured in interleaved rounds: ours[i] ran right beside base[i],
    so each round gives one ratio, and the spread of those ratios says how steady the machine was."""

    part: str
    label: str
    ours: Sequence[float]
    base: Sequence[float]

    @property
    def ratios(self) -> list[float]:
        return [o / b for o, b in zip(self.ours, self.base, strict=True) if b > 0]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        return max(self.ratios) - min(self.ratios)

    @property
    def base_rps(self) -> float:
        return statistics.median(self.base)

    def disturbance(self) -> str | None:
        """Why this run's ratio should not be quoted, or None when it was measured cleanly."""
        reasons = []
        if len(self.ratios) > 1 and self.spread > MAX_SPREAD:
            reasons.append(f"rounds spread {self.spread:.2f} > {MAX_SPREAD}")
        usual = float(os.environ.get(f"BENCH_USUAL_{self.part.upper()}_RPS", USUAL_BASELINE_RPS.get(self.part, 0)))
        if usual and self.base_rps < FAR_BELOW_USUAL * usual:
            reasons.append(f"baseline {self.base_rps:,.0f}/s, far below its usual {usual:,.0f}/s")
        return "; ".join(reasons) or None

    def ratio_cell(self) -> str:
        """The ratio with the baseline's own rate and the rounds' spread beside it, and a warning when disturbed."""
        low, high = min(self.ratios), max(self.ratios)
        cell = f"{self.ratio:.2f}x do-nothing ({self.base_rps:,.0f}/s), rounds {low:.2f}-{high:.2f}"
        why = self.disturbance()
        return f"{cell}  DISTURBED: {why}" if why else cell


# Every ratio measured in this process, in order: `--runs N` prints the median of the runs from them.
MEASURED: list[SideBySide] = []


def side_by_side(part: str, label: str, ours: Sequence[float], base: Sequence[float]) -> SideBySide:
    measured = SideBySide(part, label, tuple(ours), tuple(base))
    MEASURED.append(measured)
    return measured


def runs_summary(measured: Sequence[SideBySide]) -> list[tuple[str, str, str, str]]:
    """Per ratio: the median over runs of each run's median ratio, every run's figure, and which were disturbed.
    The figure to publish is the median of clean runs; with fewer than two clean runs there is none."""
    rows = []
    by_label: dict[tuple[str, str], list[SideBySide]] = {}
    for m in measured:
        by_label.setdefault((m.part, m.label), []).append(m)
    for (part, label), runs in by_label.items():
        clean = [r for r in runs if r.disturbance() is None]
        each = ", ".join(f"{r.ratio:.2f}{'*' if r.disturbance() else ''} ({r.base_rps:,.0f}/s)" for r in runs)
        if len(clean) >= max(2, (len(runs) + 1) // 2):
            figure = f"{statistics.median(r.ratio for r in clean):.2f}x"
        else:
            figure = "no clean figure"
        rows.append((part, f"{label}: median of {len(runs)} runs", figure, f"runs: {each}"))
    return rows

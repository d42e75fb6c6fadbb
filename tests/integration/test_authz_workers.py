"""`authz --workers 2` over real gRPC and real PostgreSQL: both workers serve one port, metering stays exact
through a SIGTERM, a revocation reaches both within the contract's 1 s, the contract's metrics port serves the
union with a `worker` label, spilled units survive a change of the number of workers, a worker that dies is
started again, and a worker that cannot start stops the parent with its one-line error."""

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authz_service.usage.meter_store import spill
from authz_service.usage.refunds import NO_TERMS
from authz_service.usage.spill_dirs import worker_dir
from authz_service.usage.usage_ledger import Batch
from driftlock_cli.supervisor import Child, start_child, wait_until
from driftlock_kernel import api_keys
from driftlock_kernel.periods import calendar_month
from tests.support.authz_child import authz_env
from tests.support.authz_requests import authz_channel, bearer, check_request
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.net import eventually, free_port
from tests.support.observability import metric_list
from tests.support.scrape import family_names, scrape_text
from tests.support.usage import stored_usage, wait_for_usage

WORKERS = 2


def code_of(response) -> str:
    if response.HasField("ok_response"):
        return "ok"
    return json.loads(response.denied_response.body)["error"]["code"]


class Workers:
    """A running `driftlock-gateway authz --workers N` and what a test reads from it."""

    def __init__(self, child: Child, port: int, metrics_port: int, log: Path):
        self.child, self.port, self.metrics_port, self.log = child, port, metrics_port, log

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def per_worker(self, name: str, **labels: str) -> dict[str, float]:
        """The sum of `name`'s samples whose labels include `labels`, by worker, from the contract's port."""
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(await scrape_text(self.metrics_url)):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    worker = sample.labels["worker"]
                    found[worker] = found.get(worker, 0.0) + sample.value
        return found

    async def workers_up(self) -> int:
        return round(sum((await self.per_worker("driftlock_authz_worker_up")).values()))

    async def check_fresh(self, secret: str) -> str:
        """One billable check on a connection of its own (so any worker may get it)."""
        async with authz_channel(self.target, fresh=True) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            return code_of(await stub.Check(check_request(bearer(secret)), timeout=5))

    async def served_by_both(self, secret: str) -> int:
        """Allowed checks on fresh connections until every worker has answered one; returns how many were sent."""
        sent = 0

        async def both() -> bool:
            nonlocal sent
            sent += 1
            assert await self.check_fresh(secret) == "ok"
            answered = await self.per_worker("driftlock_authz_checks_total", decision="allow")
            return all(answered.get(str(i), 0) > 0 for i in range(WORKERS))

        await eventually(both, within=30, what="both workers to allow a check", interval=0)
        return sent

    def worker_pids(self) -> list[int]:
        """The parent's children (its workers), from /proc."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.child.process.pid:
                    found.append(int(entry.name))
        return found

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """A signal to the parent alone (as docker or Kubernetes send it) and its exit code."""
        self.child.signal(signum)
        return await asyncio.wait_for(self.child.process.wait(), 60)


async def start_workers(env: dict[str, str], log: Path, *args: str, count: int = WORKERS) -> Workers:
    port, metrics_port = int(env["DRIFTLOCK_AUTHZ_PORT"]), int(env["DRIFTLOCK_AUTHZ_METRICS_PORT"])
    argv = [sys.executable, "-m", "driftlock_cli", "authz", *args]
    child = await start_child("authz-workers", argv, env=env, log_file=log)
    workers = Workers(child, port, metrics_port, log)
    if count > 1:

        async def all_up() -> bool:
            return await workers.workers_up() == count

        await wait_until(all_up, timeout=60, what=f"{count} workers to serve", child=child)
    return workers


@pytest.fixture
async def workers(database_url, jwt_secret, tmp_path):
    env = authz_env(database_url, jwt_secret, free_port(), free_port())
    started = await start_workers(env, tmp_path / "authz.log", "--workers", str(WORKERS))
    yield started
    if started.child.running:
        assert await started.stop() == 0, started.log.read_text()


async def test_both_workers_serve_and_metering_is_exact_through_a_sigterm(workers, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    warm_up = await workers.served_by_both(secret)
    before = await workers.per_worker("driftlock_authz_checks_total", decision="allow")

    # Many concurrent billable checks over several connections, each its own worker's by SO_REUSEPORT (which
    # hashes connections: with 16, all on one worker has a chance of 2^-15).
    channels = [authz_channel(workers.target, fresh=True) for _ in range(16)]
    try:
        stubs = [external_auth_pb2_grpc.AuthorizationStub(channel) for channel in channels]

        async def one(stub) -> str:
            return code_of(await stub.Check(check_request(bearer(secret)), timeout=10))

        codes = []
        for _ in range(5):
            codes += await asyncio.gather(*(one(stub) for stub in stubs for _ in range(25)))
    finally:
        for channel in channels:
            await channel.close(grace=None)
    allowed = codes.count("ok")
    assert allowed == len(codes) == 2000, {code: codes.count(code) for code in set(codes)}

    after = await workers.per_worker("driftlock_authz_checks_total", decision="allow")
    served = {worker: after[worker] - before.get(worker, 0) for worker in after}
    assert set(served) == {"0", "1"} and all(n > 0 for n in served.values()), served
    assert sum(served.values()) == allowed  # the union sums to what was answered

    assert await workers.stop() == 0, workers.log.read_text()
    # Everything either worker counted is stored, once: the warm-up's checks and the load's, all allowed.
    assert await stored_usage(pool, org.id) == {"stream": warm_up + allowed}
    log = workers.log.read_text()
    assert "Traceback" not in log


async def test_a_revocation_reaches_both_workers_within_one_second(workers, make_org, make_key, pool):
    org = await make_org()
    key, secret = await make_key(org.id)
    await workers.served_by_both(secret)  # both have the key cached as valid
    async with pool.acquire() as conn:
        await api_keys.revoke_key(conn, key.id)

    async def refused_by_both() -> bool:
        codes = [await workers.check_fresh(secret) for _ in range(8)]
        if any(code != "revoked_api_key" for code in codes):
            return False
        refused = await workers.per_worker("driftlock_authz_checks_total", code="revoked_api_key")
        return all(refused.get(str(i), 0) > 0 for i in range(WORKERS))

    await eventually(refused_by_both, within=1.0, what="the revocation on both workers", interval=0)


async def test_the_metrics_port_serves_every_family_once_with_a_worker_label(workers, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    await workers.served_by_both(secret)
    text = await scrape_text(workers.metrics_url)
    # What the alert rules and the dashboard read, as from one authz.
    assert set(metric_list()["exported"]["authz"]) - family_names(text) == set()
    for family in ("driftlock_authz_checks_total", "driftlock_authz_check_duration_seconds"):
        assert text.count(f"# TYPE {family} ") == 1 and text.count(f"# HELP {family} ") == 1
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if metric.name in ("driftlock_authz_workers",):
                assert sample.value == WORKERS
            else:
                assert sample.labels.get("worker") in {"0", "1"}, sample
    durations = await workers.per_worker("driftlock_authz_check_duration_seconds_count")
    checks = await workers.per_worker("driftlock_authz_checks_total")
    assert durations == checks and set(checks) == {"0", "1"}
    assert await workers.per_worker("driftlock_authz_invalidation_listener_up") == {"0": 1.0, "1": 1.0}


async def test_a_worker_that_dies_is_started_again(workers, make_org, make_key):
    org = await make_org()
    _key, secret = await make_key(org.id)
    pids = workers.worker_pids()
    assert len(pids) == WORKERS
    os.kill(pids[0], signal.SIGKILL)

    async def restarted() -> bool:
        restarts = await workers.per_worker("driftlock_authz_worker_restarts_total")
        return sum(restarts.values()) == 1 and await workers.workers_up() == WORKERS

    await eventually(restarted, within=30, what="the killed worker to be started again")
    assert len(set(workers.worker_pids()) - set(pids)) == 1
    lines = [line for line in workers.log.read_text().splitlines() if "restarting it in" in line]
    assert len(lines) == 1 and "exited (exit code -9)" in lines[0], lines
    await workers.served_by_both(secret)


async def test_workers_of_a_killed_parent_drain_and_lose_nothing(workers, make_org, make_key, pool):
    org = await make_org()
    _key, secret = await make_key(org.id)
    sent = await workers.served_by_both(secret)
    pids = workers.worker_pids()
    os.kill(workers.child.process.pid, signal.SIGKILL)  # no forwarding: each worker's parent-death signal

    def alive(pid: int) -> bool:  # a zombie (exited, not yet reaped by whoever adopted it) is gone too
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    async def gone() -> bool:
        return not any(alive(pid) for pid in pids)

    await eventually(gone, within=30, what="the workers to stop after their parent")
    assert await stored_usage(pool, org.id) == {"stream": sent}
    log = workers.log.read_text()
    assert "authz worker 0 stopped" in log and "authz worker 1 stopped" in log and "Traceback" not in log


def batch_for(org_id, units: int) -> Batch:
    period = calendar_month(datetime.now(UTC)).start
    return Batch(uuid.uuid4(), {(str(org_id), period, "stream", NO_TERMS): units})


async def test_spilled_units_are_replayed_when_the_number_of_workers_changes(
    database_url, jwt_secret, tmp_path, make_org, pool
):
    org = await make_org()
    root = tmp_path / "spill"
    # What a run of one process and a run of three workers left behind.
    spill([batch_for(org.id, 3)], worker_dir(root, None))
    spill([batch_for(org.id, 5)], worker_dir(root, 2))
    env = authz_env(database_url, jwt_secret, free_port(), free_port(), meter_spill_dir=root)
    two = await start_workers(env, tmp_path / "two.log", "--workers", "2")
    await wait_for_usage(pool, org.id, {"stream": 8})
    assert await two.stop(signal.SIGINT) == 0, two.log.read_text()  # Ctrl-C is forwarded as SIGTERM is
    assert sorted(root.rglob("meter-*.json")) == []

    # And back: what worker 1 of a run of two left, replayed by one process.
    spill([batch_for(org.id, 7)], worker_dir(root, 1))
    env = authz_env(database_url, jwt_secret, free_port(), free_port(), meter_spill_dir=root)
    one = await start_workers(env, tmp_path / "one.log", count=1)
    await wait_for_usage(pool, org.id, {"stream": 15})
    assert await one.stop() == 0, one.log.read_text()
    assert sorted(root.rglob("meter-*.json")) == []


async def test_workers_that_cannot_start_stop_the_parent_with_their_error(database_url, jwt_secret):
    with socket.socket() as holder:  # without SO_REUSEPORT: no worker can share it
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = authz_env(database_url, jwt_secret, taken, free_port(), log_level="error")
        result = await asyncio.to_thread(run_cli, "authz", "--workers", "2", database_url=database_url, env=env)
    assert result.code == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("driftlock-gateway: error:")]
    assert len(errors) == 1, result.stderr
    assert "failed 3 times before serving" in errors[0] and f"cannot listen on 127.0.0.1:{taken}" in errors[0]


@pytest.mark.parametrize("value", ["0", "65", "two", "-1"])
def test_an_invalid_number_of_workers_is_one_line(value):
    result = run_cli("authz", "--workers", value, database_url=None)
    assert_one_line_error(result, "--workers", "1 to 64")
    result = run_cli("authz", database_url=None, env={"DRIFTLOCK_AUTHZ_WORKERS": value})
    assert_one_line_error(result, "DRIFTLOCK_AUTHZ_WORKERS")

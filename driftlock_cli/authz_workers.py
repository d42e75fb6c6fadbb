"""`driftlock-gateway authz --workers N`: N authz processes on one gRPC port, and the parent that keeps them.

Python serves one core per process; workers let one host (or one pod with several CPUs) use more. Each worker is
a whole authz (`serve` with a `WorkerRole`): it binds DRIFTLOCK_AUTHZ_PORT with SO_REUSEPORT, so the kernel
spreads new connections over the workers, and it has its own key cache, meter, LISTEN connection (every worker
hears every invalidation), replica name and spill folder. The parent serves no check. It

- moves spill files a run with another number of workers left into this run's folders, before any worker starts
  (authz_service/usage/spill_dirs.py);
- serves DRIFTLOCK_AUTHZ_METRICS_PORT: the union of every worker's metrics (each scraped from its private
  loopback endpoint when Prometheus scrapes the parent), with a `worker` label on every sample;
- forwards SIGTERM/SIGINT to every worker, which drains as one authz does, and exits 0 once all exited 0;
- restarts a worker that dies, after a backoff, saying so in one line; a worker that fails 3 times in a row
  before it serves (the port is taken, a setting only the worker checks) stops the parent with that worker's
  one-line error instead.

A worker tells the parent what it knows through a pipe (--report-fd): {"ready": true, "metrics_port": P} once it
serves, {"error": "..."} before it exits on an error (then printed by the parent, not by the worker).
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from authz_service.server import WORKER_METRICS_HOST, WorkerRole, check_settings, serve
from authz_service.usage import spill_dirs
from driftlock_cli.supervisor import Child, start_child
from driftlock_kernel.background import wait_set
from driftlock_kernel.errors import OperatorError, one_line
from driftlock_kernel.logs import configure_logging
from driftlock_kernel.settings import Settings

log = logging.getLogger(__name__)

WORKER_LABEL = "worker"
# A worker that exits this many times in a row before it serves is not going to: stop, saying why.
MAX_START_FAILURES = 3
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
# A worker that served this long before it died is restarted after the first backoff again.
STEADY_SECONDS = 60.0
# Each worker's metrics are read while Prometheus waits for the parent's (its default timeout is 10 s).
SCRAPE_TIMEOUT_SECONDS = 2.0


class WorkersFailed(OperatorError):
    """A worker could not be started; the message is the worker's own one-line error."""


# --- the worker's side ----------------------------------------------------------------------------------------


def _reporter(fd: int) -> Callable[[dict[str, object]], None]:
    def report(message: dict[str, object]) -> None:
        # One write of less than PIPE_BUF bytes: never interleaved, never half a line.
        with contextlib.suppress(OSError):  # the parent is gone (and its death signal is on the way)
            os.write(fd, json.dumps(message).encode()[:4000] + b"\n")

    return report


async def serve_as_worker(settings: Settings, index: int, report_fd: int) -> int:
    """Run worker `index`; returns the exit code. An error goes to the parent (which prints it), not to stderr."""
    report = _reporter(report_fd)
    try:
        await serve(settings, WorkerRole(index, report))
    except OperatorError as error:
        report({"error": str(error)})
        return 1
    except Exception as error:  # a bug: still one line for the parent; the traceback only on request
        if settings.debug:
            import traceback

            traceback.print_exc()
        report({"error": f"internal error ({type(error).__name__}: {one_line(error)})"})
        return 70
    return 0


def worker_argv(index: int, report_fd: int) -> list[str]:
    return [sys.executable, "-m", "driftlock_cli", "authz", "--worker-index", str(index), "--report-fd", str(report_fd)]


# --- metrics: the union of the workers' ---------------------------------------------------------------------


def _scrape(port: int) -> str:
    with urllib.request.urlopen(
        f"http://{WORKER_METRICS_HOST}:{port}/metrics", timeout=SCRAPE_TIMEOUT_SECONDS
    ) as response:
        return response.read().decode()


def union_of(scrapes: Iterable[tuple[int, str]]) -> list[Metric]:
    """Families of several workers' scrapes merged by name (HELP and TYPE once), each sample labelled with its
    worker. A family whose type differs from the first worker's (never, with one build) is skipped for that
    worker rather than exported wrong."""
    families: dict[str, Metric] = {}
    for index, text in scrapes:
        worker = str(index)
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            elif merged.type != family.type:
                continue
            merged.samples.extend(s._replace(labels={**s.labels, WORKER_LABEL: worker}) for s in family.samples)
    return list(families.values())


class WorkerMetrics(Collector):
    """What the parent serves on the metrics port: every worker's families, scraped now, side by side."""

    def __init__(self, workers: "Workers"):
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers.count, thread_name_prefix="scrape-worker")

    def describe(self) -> list[Metric]:
        return []  # nothing to register up front: the families are the workers'

    def collect(self) -> Iterable[Metric]:
        ports = dict(self._workers.metrics_ports)  # a snapshot: the event loop changes it as workers come and go
        texts = dict(zip(ports, self._pool.map(self._scrape_or_none, ports.values()), strict=True))
        up = GaugeMetricFamily(
            "driftlock_authz_worker_up",
            "1 while the authz worker serves and its metrics could be read for this scrape.",
            labels=[WORKER_LABEL],
        )
        restarts = CounterMetricFamily(
            "driftlock_authz_worker_restarts",
            "Times the parent started an authz worker again after it exited.",
            labels=[WORKER_LABEL],
        )
        for index in range(self._workers.count):
            up.add_metric([str(index)], 1.0 if texts.get(index) is not None else 0.0)
            restarts.add_metric([str(index)], float(self._workers.restarts[index]))
        yield GaugeMetricFamily(
            "driftlock_authz_workers", "authz worker processes configured (--workers).", value=self._workers.count
        )
        yield up
        yield restarts
        yield from union_of((index, text) for index, text in sorted(texts.items()) if text is not None)

    @staticmethod
    def _scrape_or_none(port: int) -> str | None:
        try:
            return _scrape(port)
        except OSError:
            return None  # a worker on its way down or up: its samples are missing from this scrape, up says so

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- the parent -------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One start of a worker: its process and what it reported."""

    child: Child
    ready: bool = False
    error: str | None = None
    reader: asyncio.Task | None = None


@dataclass
class Workers:
    settings: Settings
    count: int
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_ports: dict[int, int] = field(default_factory=dict)
    restarts: list[int] = field(default_factory=list)
    runs: dict[int, _Run] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.restarts = [0] * self.count

    def signal_all(self, signum: int) -> None:
        for run in self.runs.values():
            run.child.signal(signum)

    def on_signal(self, signum: int) -> None:
        if not self.stopping.is_set():
            log.info("%s: stopping %d authz workers", signal.Signals(signum).name, self.count)
        self.stopping.set()
        self.signal_all(signum)

    async def _start(self, index: int) -> _Run:
        read_end, write_end = os.pipe()
        try:
            child = await start_child(f"authz-worker-{index}", worker_argv(index, write_end), pass_fds=(write_end,))
        finally:
            os.close(write_end)  # the worker holds the only write end: end of file once it exits
        run = _Run(child)
        run.reader = asyncio.create_task(self._read_reports(index, run, read_end))
        self.runs[index] = run
        if self.stopping.is_set():  # the signal came while it was being started
            child.signal(signal.SIGTERM)
        return run

    async def _read_reports(self, index: int, run: _Run, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while line := await reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if message.get("ready"):
                    run.ready = True
                    self.metrics_ports[index] = int(message["metrics_port"])
                elif isinstance(message.get("error"), str):
                    run.error = message["error"]
        finally:
            transport.close()

    async def keep_running(self, index: int) -> int:
        """Run worker `index` until the parent stops; returns its last exit code (0 when it stopped cleanly)."""
        failures, backoff = 0, FIRST_BACKOFF_SECONDS
        while True:
            started = time.monotonic()
            run = await self._start(index)
            code = await run.child.process.wait()
            if run.reader is not None:  # the last report may still be in the pipe
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(run.reader, 1.0)
            self.metrics_ports.pop(index, None)
            if self.stopping.is_set():
                # A worker stopped by the signal before it could handle it has served nothing: a clean stop too.
                return 0 if code in (-signal.SIGTERM, -signal.SIGINT) and not run.ready else code
            reason = run.error or f"exit code {code}"
            if run.ready:
                failures = 0
                if time.monotonic() - started >= STEADY_SECONDS:
                    backoff = FIRST_BACKOFF_SECONDS
            else:
                failures += 1
                if failures >= MAX_START_FAILURES:
                    raise WorkersFailed(f"authz worker {index} failed {failures} times before serving: {reason}")
            log.warning(
                "authz worker %d %s (%s); restarting it in %.1fs",
                index,
                "exited" if run.ready else "failed to start",
                reason,
                backoff,
            )
            await wait_set(self.stopping, backoff)
            if self.stopping.is_set():
                return 0
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
            self.restarts[index] += 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)
        registry = CollectorRegistry(auto_describe=False)
        collector = WorkerMetrics(self)
        registry.register(collector)
        host, port = self.settings.authz_host, self.settings.authz_metrics_port
        try:
            metrics_server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as error:
            raise OperatorError(f"cannot serve metrics on {host}:{port}: {one_line(error)}") from None
        tasks = [asyncio.create_task(self.keep_running(index)) for index in range(self.count)]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((task.exception() for task in done if task.exception() is not None), None)
            if failed is not None:
                # Stop the others as a SIGTERM would (they drain and flush), then say what went wrong.
                self.stopping.set()
                self.signal_all(signal.SIGTERM)
                await asyncio.gather(*pending, return_exceptions=True)
                raise failed
            codes = {index: task.result() for index, task in enumerate(tasks)}
        finally:
            for task in tasks:
                task.cancel()
            for run in self.runs.values():  # an error of ours must not leave a worker behind
                if run.child.running:
                    await run.child.stop()
            metrics_server.shutdown()
            collector.close()
        unclean = {index: code for index, code in codes.items() if code != 0}
        if unclean:
            raise OperatorError(
                "authz workers exited with "
                + ", ".join(f"code {code} (worker {index})" for index, code in sorted(unclean.items()))
            )
        log.info("authz stopped (%d workers)", self.count)


async def run_workers(settings: Settings, count: int) -> None:
    """`authz --workers N` with N > 1: until SIGTERM/SIGINT, then until every worker has drained."""
    configure_logging(settings.log_level, settings.log_format)
    check_settings(settings)  # a bad setting stops here, once, rather than in every worker
    if settings.meter_spill_dir:
        root = Path(settings.meter_spill_dir)
        try:
            spill_dirs.adopt_leftovers(root, count)
        except OSError as error:
            raise OperatorError(f"cannot take over the spill files in {root}: {one_line(error)}") from None
    log.info("starting %d authz workers on %s:%d", count, settings.authz_host, settings.authz_port)
    await Workers(settings, count).run()

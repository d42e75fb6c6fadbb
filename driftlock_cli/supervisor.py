"""Child processes for `dev` and the end-to-end tests: start, wait until ready, stop, and leave none behind.

Each child gets SIGTERM if this process dies (Linux's parent-death signal), so even a `kill -9` of the
supervisor does not leave services running.
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO

from grpc_health.v1 import health_pb2, health_pb2_grpc

from driftlock_cli import authz_tls
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.settings import AuthzClientTls

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildFailed(OperatorError):
    """A child exited, or did not become ready in time."""


class Child:
    def __init__(self, name: str, process: asyncio.subprocess.Process, pump: asyncio.Task | None):
        self.name = name
        self.process = process
        self._pump = pump

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def signal(self, signum: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            self.signal(signal.SIGKILL)
            await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        return await self.process.wait()


async def _pump_lines(name: str, stream: asyncio.StreamReader, sink: IO[str]) -> None:
    prefix = f"[{name}] "
    while line := await stream.readline():
        sink.write(prefix + line.decode(errors="replace"))
        sink.flush()


async def start_child(
    name: str,
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
    prefix_output_to: IO[str] | None = None,
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
) -> Child:
    """Start `argv`; its output goes to `log_file`, or line by line with a `[name]` prefix to a stream, or (with
    neither) where this process's goes. `pass_fds` stay open in the child, under the same numbers."""
    out: IO[bytes] | None = None
    stdout: IO[bytes] | int | None = None
    stderr: int | None = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = log_file.open("ab")
        stdout, stderr = out, asyncio.subprocess.STDOUT
    elif prefix_output_to is not None:
        stdout, stderr = asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            env={**os.environ, **(env or {})},
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            preexec_fn=_die_with_parent,
        )
    finally:
        if out is not None:
            out.close()
    pump = None
    if prefix_output_to is not None and process.stdout is not None:
        pump = asyncio.create_task(_pump_lines(name, process.stdout, prefix_output_to))
    return Child(name, process, pump)


async def wait_until(
    probe: Callable[[], Awaitable[bool]], *, timeout: float, what: str, child: Child | None = None
) -> None:
    """Poll `probe` until it says yes; fail early if `child` exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if child is not None and not child.running:
            raise ChildFailed(f"{child.name} exited with code {child.process.returncode} before {what}")
        with contextlib.suppress(Exception):
            if await probe():
                return
        if time.monotonic() >= deadline:
            raise ChildFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 0.25)


# Below Linux's ephemeral range (32768-60999), where outgoing connections take their local ports: a port picked
# there could be taken by any connection before the child binds it.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a child to bind a moment later: picked at random outside the ephemeral
    range, so that neither outgoing connections nor another test process (picking its own at random) are likely
    to take it meanwhile, and never the same one twice in this process."""
    import random
    import socket

    for _ in range(1000):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise ChildFailed(f"no free port found in {_PORT_RANGE[0]}-{_PORT_RANGE[1]}")


def tcp_open(host: str, port: int) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return True

    return probe


def grpc_serving(target: str, service: str = "", *, tls: AuthzClientTls | None = None) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        async with authz_tls.channel(target, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return probe


def http_ok(url: str) -> Callable[[], Awaitable[bool]]:
    import aiohttp

    async def probe() -> bool:
        async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
            return r.status == 200

    return probe


async def first_exit(children: Sequence[Child]) -> Child:
    """Wait until any child exits; return it."""
    waits = {asyncio.ensure_future(child.process.wait()): child for child in children}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        return waits[next(iter(done))]
    finally:
        for task in waits:
            task.cancel()

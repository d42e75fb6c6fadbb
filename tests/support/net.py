"""Ports and waiting for conditions."""

import asyncio
import time
from collections.abc import Awaitable, Callable

from driftlock_cli.stack import StackPorts
from driftlock_cli.supervisor import free_port

__all__ = ["eventually", "free_port"]


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float, what: str, interval: float = 0.02):
    """Wait until `check()` is true; fail the test with `what` after `within` seconds. Returns seconds taken."""
    started = time.monotonic()
    deadline = started + within
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within}s: {what}")
        await asyncio.sleep(interval)


def free_stack_ports(replicas: int = 1) -> StackPorts:
    """The ports of a stack a test starts for itself, each free when asked, with `replicas` authz replicas."""
    return StackPorts(
        envoy=free_port(),
        envoy_admin=free_port(),
        authz=tuple(free_port() for _ in range(replicas)),
        authz_metrics=tuple(free_port() for _ in range(replicas)),
        webhooks=free_port(),
        backend=free_port(),
    )

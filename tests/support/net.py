"""Ports and waiting for conditions."""

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

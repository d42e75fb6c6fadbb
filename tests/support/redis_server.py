"""The machine's Redis (127.0.0.1:6379, or DRIFTLOCK_TEST_REDIS_URL): tests that need it skip, saying why, when
it does not answer."""

import os
import socket
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("DRIFTLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_answers(url: str = REDIS_URL) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def require_redis() -> str:
    if not redis_answers():
        pytest.skip(f"no Redis answers at {REDIS_URL} (start redis-server, or set DRIFTLOCK_TEST_REDIS_URL)")
    return REDIS_URL

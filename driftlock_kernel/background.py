"""Background work that a component owns for as long as it lives: one way to start it, stop it, and survive a
failing step."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

# How long a stopped task's clean-up may take before the cancellation is repeated (see BackgroundTask.stop).
STOP_GRACE_SECONDS = 1.0


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
        task = self._task
        if task is None:
            return
        task.cancel()
        # On Python 3.11, asyncio.wait_for returns the awaited result instead of raising when the cancellation
        # meets that result (gh-86296, fixed in 3.12), and a loop then goes on as if never asked to stop: a
        # stop that waited once would wait forever. So the request is repeated until the task ends, giving its
        # own clean-up STOP_GRACE_SECONDS each time.
        while not task.done():
            await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if not task.done():
                task.cancel()
        if not task.cancelled():
            task.exception()  # retrieved here; _guarded logged it

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
        await wait_set(self.stopping, seconds)


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds have passed; whether it is set.

    What a loop sleeps on between rounds instead of `asyncio.wait_for(event.wait(), timeout)`, which on Python
    3.11 loses a cancellation that arrives as the event is set (see BackgroundTask.stop): the timeout here is the
    waiting task's own (`asyncio.timeout`), so a cancellation is always raised.
    """
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


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

"""Log lines for events that come in floods: the first of each kind at once, then one count per interval.

A client that costs nothing to be (bad Stripe signatures, invented keys) or an outage (every check failing the
same way) must not turn into one log line per request: the first event of a kind is logged as it happens; the
ones after it within `interval` are counted, and when the interval ends one line says how many there were,
with the last one's message. The next event after that starts a new interval and is logged at once again. So
a steady flood costs two lines per kind and interval, whatever its rate. Metrics still count every event.

Summaries are written when the interval ends (a timer on the running event loop), by the next event of any
kind, or by `flush()` at shutdown.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_INTERVAL_SECONDS = 60.0
# Kinds are closed sets (a reason, an error type); past this many at once, new ones share one.
MAX_KINDS = 64
OTHER = "other"


@dataclass(slots=True)
class _Window:
    started: float
    level: int
    message: str
    repeats: int = 0


class RepeatedLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._timer: asyncio.TimerHandle | None = None

    def warning(self, kind: Hashable, message: str, *args: object) -> None:
        self.log(logging.WARNING, kind, message, *args)

    def info(self, kind: Hashable, message: str, *args: object) -> None:
        self.log(logging.INFO, kind, message, *args)

    def log(self, level: int, kind: Hashable, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(level):
            return
        now = self._clock()
        self._summarise(now)
        if kind not in self._windows and len(self._windows) >= MAX_KINDS:
            kind = OTHER
        text = message % args if args else message
        window = self._windows.get(kind)
        if window is not None:
            window.repeats += 1
            window.level, window.message = level, text
            return
        self._logger.log(level, "%s", text)
        self._windows[kind] = _Window(now, level, text)
        self._schedule()

    def flush(self) -> None:
        """Write the counts of every interval still open (at shutdown)."""
        self._summarise(float("inf"))

    def _summarise(self, now: float) -> None:
        for kind, window in list(self._windows.items()):
            if now - window.started < self._interval:
                continue
            del self._windows[kind]
            if window.repeats:
                elapsed = min(now, window.started + self._interval) - window.started
                self._logger.log(
                    window.level,
                    "%s (and %d more like it in the last %.3g s)",
                    window.message,
                    window.repeats,
                    elapsed,
                )

    def _schedule(self) -> None:
        if self._timer is not None or not self._windows:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the next event, or flush(), writes the summary
            return
        due = min(window.started for window in self._windows.values()) + self._interval
        self._timer = loop.call_later(max(0.0, due - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._summarise(self._clock())
        self._schedule()

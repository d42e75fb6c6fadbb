"""Two building blocks of every in-process cache here: a bounded map that forgets the least recently used entry
first, and a single-flight guard so that many requests missing on one key share one look-up."""

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, ItemsView, ValuesView
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most `max_entries` entries; putting one more forgets the least recently used."""

    __slots__ = ("_entries", "_max_entries")

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError("an LRU cache holds at least one entry")
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The entry, which becomes the most recently used; None when absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        """The entry without touching its recency."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        entries = self._entries
        entries[key] = value
        entries.move_to_end(key)
        if len(entries) > self._max_entries:
            entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def items(self) -> ItemsView[K, V]:
        return self._entries.items()

    def values(self) -> ValuesView[V]:
        return self._entries.values()


class SingleFlight(Generic[K, V]):
    """At most one look-up per key at a time: a caller asking for a key whose look-up is under way joins it.

    A look-up is forgotten as soon as it finishes (before its waiters wake), so a caller arriving after that
    starts a new one rather than reading an old answer. Callers should `asyncio.shield` the future: one caller
    giving up must not cancel the look-up the others wait on.
    """

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._running)

    def running(self, key: K) -> asyncio.Future[V] | None:
        return self._running.get(key)

    def join_or_start(self, key: K, look_up: Callable[[], Awaitable[V]]) -> tuple[asyncio.Future[V], bool]:
        """The look-up of `key` under way, or a new one started with `look_up()`; and whether it was joined."""
        pending = self._running.get(key)
        if pending is not None:
            return pending, True
        pending = self._running[key] = asyncio.ensure_future(self._run(key, look_up))
        return pending, False

    async def _run(self, key: K, look_up: Callable[[], Awaitable[V]]) -> V:
        try:
            return await look_up()
        finally:
            self._running.pop(key, None)

    def cancel_all(self) -> None:
        for pending in list(self._running.values()):
            pending.cancel()

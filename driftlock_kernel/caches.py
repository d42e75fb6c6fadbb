"""The building blocks of every in-process cache here: a bounded map that forgets the least recently used entry
first, a single-flight guard so that many requests missing on one key share one look-up, and a batcher so
that misses on different keys that queue up share one look-up too."""

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, ItemsView, Mapping, Sequence, ValuesView
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

    def oldest(self) -> tuple[K, V] | None:
        """The least recently used entry (the next to be forgotten), untouched; None when empty."""
        return next(iter(self._entries.items()), None)

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


class Batcher(Generic[K, V]):
    """Look-ups of one key served by look-ups of many: `get(key)` joins the next batch, and a batch goes as soon
    as fewer than `max_in_flight` are under way, with every key waiting then (at most `max_batch`). When
    look-ups do not queue, each key goes alone and at once, so batching adds no wait; when they do (a cold
    cache under load), one statement answers many keys instead of each key waiting for a connection of its own.

    A batch is bounded by `timeout` (TimeoutError for each of its keys) and answers None for a key it did not
    return. A caller that gives up (cancels) is dropped from its batch; the batch goes on for the others.
    """

    __slots__ = ("_in_flight", "_look_up", "_max_batch", "_max_in_flight", "_sending", "_timeout", "_waiting")

    def __init__(
        self,
        look_up: Callable[[Sequence[K]], Awaitable[Mapping[K, V]]],
        *,
        max_batch: int,
        max_in_flight: int,
        timeout: float | None = None,
    ):
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("a batcher sends at least one key in at least one batch at a time")
        self._look_up = look_up
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._timeout = timeout
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._in_flight = 0
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done, so that none is collected

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def get(self, key: K) -> V | None:
        answer: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(answer)
        self._send_waiting()
        return await answer

    def _send_waiting(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            batch: dict[K, list[asyncio.Future[V | None]]] = {}
            while self._waiting and len(batch) < self._max_batch:
                key = next(iter(self._waiting))
                answers = [a for a in self._waiting.pop(key) if not a.done()]  # done: the caller gave up
                if answers:
                    batch[key] = answers
            if batch:
                self._in_flight += 1
                task = asyncio.ensure_future(self._send(batch))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)

    async def _send(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        try:
            try:
                found = await asyncio.wait_for(self._look_up(list(batch)), self._timeout)
            except Exception as error:
                for answers in batch.values():
                    for answer in answers:
                        if not answer.done():
                            answer.set_exception(error)
                return
            for key, answers in batch.items():
                value = found.get(key)
                for answer in answers:
                    if not answer.done():
                        answer.set_result(value)
        finally:
            for answers in batch.values():  # only when the batch itself was cancelled (shutdown)
                for answer in answers:
                    answer.cancel()
            self._in_flight -= 1
            self._send_waiting()

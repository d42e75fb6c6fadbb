"""Every key this gateway has ever issued, as the first 8 bytes of its hash: what lets authz tell an invented key
from a real one without asking the database, so that no flood of invented keys can ration real ones.

- Loaded whole (one statement: the prefixes sorted and concatenated by PostgreSQL, 8 bytes a key: 8 MB at a
  million keys) before authz reports SERVING, and again whenever the change listener (re)connects, since keys may
  have been created while it was down.
- Kept current by the change notifications authz already listens to: the api_keys trigger sends the new key's
  prefix with its id (migration 0009), so a key created anywhere is known here as soon as its notification is.
- `ready` only while the listener has been connected since the load began: otherwise a key created meanwhile may
  be missing, and the caller falls back on asking the database (rationed), as before the index.
- A prefix is 64 bits of a SHA-256: two keys sharing one, or an invented key matching a real prefix, are one in
  2^64 / n. A match only means "look it up in the database"; the full hash decides. Keys are never removed
  (a deleted key matching is such a look-up that finds nothing).
"""

import asyncio
import logging
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Awaitable, Callable

import asyncpg

from driftlock_kernel import db
from driftlock_kernel.caches import SingleFlight
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)

PREFIX_BYTES = 8
# Keys learnt from notifications are a set beside the sorted array; past this many, the next reload folds them in.
MAX_ADDED = 50_000

LoadPrefixes = Callable[[], Awaitable[bytes]]
_LOAD_ERRORS: tuple[type[BaseException], ...] = (*db.DATABASE_ERRORS, ValueError)


def prefix_of(key_hash: bytes) -> int:
    return int.from_bytes(key_hash[:PREFIX_BYTES], "big")


def sorted_prefixes(concatenated: bytes) -> array:
    """Big-endian 8-byte prefixes, sorted as bytes, as an array of unsigned ints in the same order."""
    if len(concatenated) % PREFIX_BYTES:
        raise ValueError("the key index load is not a whole number of prefixes")
    prefixes = array("Q")
    prefixes.frombytes(concatenated)
    if sys.byteorder == "little":
        prefixes.byteswap()
    return prefixes


class KeyIndex:
    def __init__(self, load: LoadPrefixes, *, clock: Callable[[], float] = time.monotonic):
        self._load = load
        self._clock = clock
        self._sorted = array("Q")
        self._added: set[int] = set()
        self._added_during_load: set[int] | None = None
        self._listening = False
        self._ready = False
        self._loaded = asyncio.Event()
        self._reloads: SingleFlight[None, None] = SingleFlight()
        self._again = False
        self.loaded_at: float | None = None
        self.load_seconds: float | None = None

    def __len__(self) -> int:
        return len(self._sorted) + len(self._added)

    @property
    def ready(self) -> bool:
        """Whether a key missing here does not exist (as far as this replica can know)."""
        return self._ready

    def may_contain(self, key_hash: bytes) -> bool:
        prefix = prefix_of(key_hash)
        if prefix in self._added:
            return True
        keys = self._sorted
        at = bisect_left(keys, prefix)
        return at < len(keys) and keys[at] == prefix

    # --- kept current -------------------------------------------------------------------------------------

    def add(self, prefix: int) -> None:
        self._added.add(prefix)
        if self._added_during_load is not None:
            self._added_during_load.add(prefix)
        if len(self._added) > MAX_ADDED:
            self.reload_soon()

    def add_hex(self, text: object) -> bool:
        """A prefix from a notification (16 hex digits); False when it is not one."""
        if not isinstance(text, str) or len(text) != 2 * PREFIX_BYTES:
            return False
        try:
            self.add(int(text, 16))
        except ValueError:
            return False
        return True

    def listener_connected(self) -> None:
        """The listener (re)connected: what was created while it was down is found by a reload."""
        self._listening = True
        self._ready = False
        self.reload_soon()

    def listener_lost(self) -> None:
        self._listening = False
        self._ready = False

    # --- loading ------------------------------------------------------------------------------------------

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    def stop(self) -> None:
        self._reloads.cancel_all()

    def reload_soon(self) -> None:
        """Reload now, or once more after the reload under way (which may have started before the change)."""
        if self._reloads.running(None) is not None:
            self._again = True
            return
        self._reloads.join_or_start(None, self._reload_until_current)

    async def _reload_until_current(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            await self._reload_once()

    async def _reload_once(self) -> None:
        listening_at_start = self._listening
        self._added_during_load = set()
        started = time.monotonic()
        try:
            loaded = sorted_prefixes(await self._load())
        except _LOAD_ERRORS as error:
            self._added_during_load = None
            log.warning("could not load the key index (unknown keys are looked up, rationed): %s", one_line(error))
            await asyncio.sleep(1.0)
            self._again = True
            return
        self._sorted = loaded
        # Keys notified before the load began are in it; those notified meanwhile may not be.
        self._added, self._added_during_load = self._added_during_load, None
        self.load_seconds = time.monotonic() - started
        self.loaded_at = self._clock()
        self._ready = listening_at_start and self._listening
        self._loaded.set()
        log.info("key index: %d keys loaded in %.2fs", len(loaded), self.load_seconds)


# Sorted by the prefix as bytes (unsigned, big-endian: the order of the ints too); COLLATE does not apply to
# bytea. One row, one value: no million-row result for the driver to build.
_LOAD_SQL = f"""
    SELECT coalesce(string_agg(p, ''::bytea ORDER BY p), ''::bytea)
    FROM (SELECT substring(key_hash FROM 1 FOR {PREFIX_BYTES}) AS p FROM driftlock.api_keys) AS k
"""


def database_load(pool: asyncpg.Pool, *, timeout: float = 60.0) -> LoadPrefixes:
    async def load() -> bytes:
        return bytes(await pool.fetchval(_LOAD_SQL, timeout=timeout))

    return load

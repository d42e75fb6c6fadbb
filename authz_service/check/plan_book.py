"""Every plan's limits, held in memory: there are few plans and every check needs one.

Reloaded when the database announces a plan change (the `plans` trigger), when the invalidation listener
reconnects, at least every `max_age` seconds, and at once when a check names a plan not seen yet.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from driftlock_kernel import db
from driftlock_kernel.billing import PlanLimits
from driftlock_kernel.caches import SingleFlight
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)

Load = Callable[[], Awaitable[dict[str, PlanLimits]]]


class PlanBook:
    def __init__(self, load: Load, *, max_age: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._load = load
        self._max_age = max_age
        self._clock = clock
        self._plans: dict[str, PlanLimits] = {}
        self._loaded_at = float("-inf")
        self._reloads: SingleFlight[None, None] = SingleFlight()

    def get(self, name: str) -> PlanLimits | None:
        if self._clock() - self._loaded_at > self._max_age:
            self.reload_soon()
        return self._plans.get(name)

    async def require(self, name: str) -> PlanLimits | None:
        """The plan, loading the book first when it does not know the name (a plan created a moment ago)."""
        plan = self.get(name)
        if plan is None:
            await self.reload()
            plan = self._plans.get(name)
        return plan

    def reload_soon(self) -> asyncio.Future[None]:
        """The reload under way, or a new one: one at a time, however many checks ask."""
        pending, _joined = self._reloads.join_or_start(None, self._reload)
        return pending

    async def reload(self) -> None:
        await asyncio.shield(self.reload_soon())

    async def _reload(self) -> None:
        try:
            self._plans = await self._load()
            self._loaded_at = self._clock()
        except db.DATABASE_ERRORS as error:
            # Keep what we have; the next check past max_age tries again.
            log.warning("could not reload plans: %s", one_line(error))
            self._loaded_at = self._clock() - self._max_age + 1.0


def database_load(pool: asyncpg.Pool) -> Load:
    async def load() -> dict[str, PlanLimits]:
        rows = await pool.fetch(
            """SELECT name, included_units, overage, hard_cap_percent, rate_limit_rps, test_included_units,
                      test_rate_limit_rps, stripe_meter, products
               FROM driftlock.plans"""
        )
        return {row["name"]: db.from_row(PlanLimits, row) for row in rows}

    return load

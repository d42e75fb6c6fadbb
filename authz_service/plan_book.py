"""Every plan's limits, held in memory: there are few plans and every check needs one.

Reloaded when the database announces a plan change (the `plans` trigger), when the invalidation listener
reconnects, at least every `max_age` seconds, and at once when a check names a plan not seen yet.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg

from authz_service.decision import PlanLimits
from driftlock_kernel import db

log = logging.getLogger(__name__)

Load = Callable[[], Awaitable[dict[str, PlanLimits]]]


class PlanBook:
    def __init__(self, load: Load, *, max_age: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._load = load
        self._max_age = max_age
        self._clock = clock
        self._plans: dict[str, PlanLimits] = {}
        self._loaded_at = float("-inf")
        self._reloading: asyncio.Future | None = None

    def get(self, name: str) -> PlanLimits | None:
        if self._clock() - self._loaded_at > self._max_age and self._reloading is None:
            self.reload_soon()
        return self._plans.get(name)

    async def require(self, name: str) -> PlanLimits | None:
        """The plan, loading the book first when it does not know the name (a plan created a moment ago)."""
        plan = self.get(name)
        if plan is None:
            await self.reload()
            plan = self._plans.get(name)
        return plan

    def reload_soon(self) -> None:
        if self._reloading is None:
            self._reloading = asyncio.ensure_future(self._reload())

    async def reload(self) -> None:
        self.reload_soon()
        assert self._reloading is not None
        await asyncio.shield(self._reloading)

    async def _reload(self) -> None:
        try:
            self._plans = await self._load()
            self._loaded_at = self._clock()
        except db.QUERY_ERRORS as error:
            # Keep what we have; the next check past max_age tries again.
            log.warning("could not reload plans: %s", error)
            self._loaded_at = self._clock() - self._max_age + 1.0
        finally:
            self._reloading = None


def database_load(pool: asyncpg.Pool) -> Load:
    async def load() -> dict[str, PlanLimits]:
        rows = await pool.fetch(
            "SELECT name, included_units, overage, hard_cap_percent, rate_limit_rps FROM driftlock.plans"
        )
        return {
            row["name"]: PlanLimits(
                name=row["name"],
                included_units=row["included_units"],
                overage=row["overage"],
                hard_cap_percent=row["hard_cap_percent"],
                rate_limit_rps=row["rate_limit_rps"],
            )
            for row in rows
        }

    return load

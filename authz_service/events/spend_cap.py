"""usage.spend_cap_reached from the check pipeline: the first refusal a replica makes for an organisation's spend
cap in a period is told once, off the request path (the event's dedupe key makes every replica's telling one)."""

import asyncio
import logging
import uuid
from datetime import datetime

import asyncpg

from authz_service.check.authorizer import SpendCapReached
from driftlock_kernel import db, events
from driftlock_kernel.errors import one_line

log = logging.getLogger(__name__)


def spend_cap_announcer(pool: asyncpg.Pool) -> SpendCapReached:
    """A callback for the Authorizer: schedules the event's write on `pool` and returns at once."""
    running: set[asyncio.Task[None]] = set()

    async def write(org_id: str, period_start: datetime, used: int, cap: int) -> None:
        try:
            async with pool.acquire() as conn:
                await events.emit_spend_cap_reached(conn, uuid.UUID(org_id), period_start, used=used, cap=cap)
        except db.DATABASE_ERRORS as error:
            # The cap still holds; only the event is lost, and the next replica or period to refuse tells it.
            log.warning("could not write usage.spend_cap_reached for %s: %s", org_id, one_line(error))

    def announce(org_id: str, period_start: datetime, used: int, cap: int) -> None:
        task = asyncio.get_running_loop().create_task(write(org_id, period_start, used, cap))
        running.add(task)
        task.add_done_callback(running.discard)

    return announce

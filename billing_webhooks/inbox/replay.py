"""`webhooks replay`: apply stored events again, through the same handlers as a delivery, each in its own
transaction, recording the new outcome (and counting the attempt).

What a replay is for: an event stored as `failed` whose cause was fixed (an organisation created, a price
mapped, a bug deployed away), or `deferred` ones whose organisation can now be found. The ordering rules apply
as on delivery: an event older than what its subscription already shows is `skipped_stale`, so replaying
anything is safe.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from billing_webhooks.inbox import store
from billing_webhooks.inbox.decisions import EventOutcome
from billing_webhooks.inbox.events import MalformedEvent, envelope
from billing_webhooks.inbox.handlers import Result
from billing_webhooks.inbox.webhook import apply_event
from driftlock_kernel.billing import DEFAULT_POLICY, BillingPolicy
from driftlock_kernel.orgs import NotFound


@dataclass(frozen=True, slots=True)
class Replayed:
    id: str
    type: str
    previous_outcome: str
    outcome: str
    detail: str | None
    org_id: uuid.UUID | None


async def replay_event(
    pool: asyncpg.Pool, event_id: str, policy: BillingPolicy = DEFAULT_POLICY, *, only_outcome: str | None = None
) -> Replayed | None:
    """Apply one stored event again; None when `only_outcome` is given and the event no longer has it (a
    delivery or another replay applied it meanwhile). Raises NotFound for an unknown id."""
    async with pool.acquire() as conn, conn.transaction():
        stored = await store.lock_stored_event(conn, event_id)
        if stored is None:
            raise NotFound(f"no stored Stripe event with id {event_id!r} (see `driftlock-gateway webhooks events`)")
        if only_outcome is not None and stored.outcome != only_outcome:
            return None
        try:
            event = envelope(stored.payload)
        except MalformedEvent as error:
            result = Result(EventOutcome.FAILED, f"malformed event: {error}")
        else:
            result = await apply_event(conn, event, policy)
        await store.finish_event(conn, stored.id, result.outcome, result.detail, result.org_id)
        await store.record_replay(conn, stored.id)
    return Replayed(stored.id, stored.type, stored.outcome, result.outcome.value, result.detail, result.org_id)


async def replay_events(
    pool: asyncpg.Pool,
    *,
    outcome: str,
    received_since: datetime | None = None,
    limit: int = 1000,
    policy: BillingPolicy = DEFAULT_POLICY,
) -> list[Replayed]:
    """Apply again every stored event with this outcome (received since a time), oldest first."""
    async with pool.acquire() as conn:
        ids = await store.event_ids(conn, outcome=outcome, received_since=received_since, limit=limit)
    replayed = []
    for event_id in ids:
        result = await replay_event(pool, event_id, policy, only_outcome=outcome)
        if result is not None:
            replayed.append(result)
    return replayed

"""`stripe sync`: bring stored billing state in line with Stripe's API, for when webhooks were missed.

For each linked organisation (or the one asked for): every subscription of its Stripe customer, ended ones
too, and the subscription it follows if that is not among them, are read from Stripe and applied exactly as a
`customer.subscription.updated` (or `.deleted`, for an ended one) would be: the same handler, the same ordering
and decisions, stored in the inbox with an id `sync_<subscription>_<unix time>`. What changed nothing is rolled
back, not stored, so an hourly sync keeps no rows of its own unless it repaired something.

Where a snapshot sits in a subscription's history: at the time it was read, less `CLOCK_MARGIN`. A webhook event
Stripe creates after the read comes after it (unless our clock runs ahead of Stripe's by more than the margin),
and an event from before the read, arriving late, finds itself older and is skipped: the read already includes
what it says.

The webhook service runs a sync every DRIFTLOCK_STRIPE_SYNC_INTERVAL_SECONDS on one replica at a time
(`SyncJob`: the replica that moves the job's start time in `driftlock.maintenance_runs` past the interval runs
it).
"""

import contextlib
import dataclasses
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import stripe

from billing_webhooks import metrics
from billing_webhooks.inbox import store
from billing_webhooks.inbox.decisions import EventOutcome, OrgBilling, SubscriptionState
from billing_webhooks.inbox.events import Envelope, EventType
from billing_webhooks.inbox.webhook import apply_event
from billing_webhooks.stripe_client import StripeApi
from driftlock_kernel import db
from driftlock_kernel.background import BackgroundTask
from driftlock_kernel.billing import DEFAULT_POLICY, TERMINAL_STATUSES, BillingPolicy
from driftlock_kernel.errors import one_line
from driftlock_kernel.orgs import NotFound

log = logging.getLogger(__name__)

CLOCK_MARGIN = timedelta(seconds=60)
JOB_NAME = "stripe_sync"
# How often a replica looks whether the sync is due (the job's interval decides whether it runs).
CHECK_EVERY_SECONDS = 60.0
_SUBSCRIPTION_ID = re.compile(r"sub_[A-Za-z0-9_]{1,200}")


def sync_envelope(subscription: dict[str, Any], read_at: datetime) -> Envelope | None:
    """The event a subscription read from Stripe is applied as; None when it is not a subscription object."""
    subscription_id = subscription.get("id")
    if not isinstance(subscription_id, str) or not _SUBSCRIPTION_ID.fullmatch(subscription_id):
        return None
    at = (read_at - CLOCK_MARGIN).replace(microsecond=0)
    ended = subscription.get("status") in TERMINAL_STATUSES
    return Envelope(
        id=f"sync_{subscription_id}_{int(at.timestamp())}",
        type=EventType.SUBSCRIPTION_DELETED if ended else EventType.SUBSCRIPTION_UPDATED,
        api_version=None,
        created=at,
        livemode=subscription.get("livemode") is True,
        data_object=subscription,
    )


@dataclass(frozen=True, slots=True)
class Change:
    org_id: uuid.UUID | None
    subscription_id: str
    event_id: str
    outcome: str
    detail: str | None
    changes: dict[str, list[Any]]  # organisation column -> [before, after]


@dataclass
class SyncReport:
    changed: list[Change] = field(default_factory=list)
    checked: int = 0  # subscriptions read
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"org_id", "error"}


class _Unchanged(Exception):
    """Rolls back a snapshot that changed nothing."""


def _comparable(state: SubscriptionState | None) -> SubscriptionState | None:
    # Positions always move forward with a newer read (and each read adds a report to the status history); only
    # what they guard counts as a change.
    return (
        None if state is None else dataclasses.replace(state, status_position=None, snapshot_position=None, history=())
    )


def _org_diff(before: OrgBilling | None, after: OrgBilling | None) -> dict[str, list[Any]]:
    if before is None or after is None:
        return {}
    return {
        f.name: [getattr(before, f.name), getattr(after, f.name)]
        for f in dataclasses.fields(OrgBilling)
        if getattr(before, f.name) != getattr(after, f.name)
    }


async def apply_subscription(
    pool: asyncpg.Pool,
    subscription: dict[str, Any],
    *,
    org_id: uuid.UUID | None,
    read_at: datetime,
    policy: BillingPolicy = DEFAULT_POLICY,
) -> Change | None:
    """Apply one subscription as read from Stripe; the change it made, or None when it changed nothing."""
    event = sync_envelope(subscription, read_at)
    if event is None:
        return None
    payload = {
        "id": event.id,
        "object": "event",
        "type": event.type,
        "created": int(event.created.timestamp()),
        "livemode": event.livemode,
        "data": {"object": subscription},
        "driftlock_source": "stripe sync",
    }
    try:
        async with pool.acquire() as conn, conn.transaction():
            # The customer's lock first, as every handler takes it, before any row lock.
            customer = subscription.get("customer")
            customer = customer.get("id") if isinstance(customer, dict) else customer
            if isinstance(customer, str):
                await store.lock_customer(conn, customer)
            before_org = await store.load_org(conn, org_id) if org_id else None
            before_sub = await store.load_subscription(conn, subscription["id"])
            if not await store.insert_event(conn, event, payload):
                raise _Unchanged  # this very read was applied already
            result = await apply_event(conn, event, policy)
            after_sub = await store.load_subscription(conn, subscription["id"])
            target = result.org_id or org_id
            after_org = await store.load_org(conn, target) if target else None
            if target != org_id:
                before_org = None
            diff = _org_diff(before_org, after_org)
            if (
                not diff
                and _comparable(before_sub) == _comparable(after_sub)
                and result.outcome is not EventOutcome.FAILED
            ):
                raise _Unchanged
            detail = f"stripe sync: {result.detail}" if result.detail else "stripe sync"
            await store.finish_event(conn, event.id, result.outcome, detail, result.org_id)
    except _Unchanged:
        return None
    return Change(target, subscription["id"], event.id, result.outcome.value, result.detail, diff)


async def sync(
    pool: asyncpg.Pool,
    api: StripeApi,
    *,
    org_id: uuid.UUID | None = None,
    policy: BillingPolicy = DEFAULT_POLICY,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SyncReport:
    """Pull the subscriptions of every linked organisation (or of `org_id`) and apply them. What could not be read
    is reported per organisation; raises NotFound for an unknown `org_id`."""
    async with pool.acquire() as conn:
        targets = await store.linked_orgs(conn, org_id)
    report = SyncReport()
    if org_id is not None and not targets:
        raise NotFound(f"no organisation with id {org_id}")
    for org in targets:
        try:
            subscriptions: dict[str, dict[str, Any]] = {}
            if org.stripe_customer_id:
                for sub in await api.customer_subscriptions(org.stripe_customer_id):
                    subscriptions[sub["id"]] = sub
            if org.stripe_subscription_id and org.stripe_subscription_id not in subscriptions:
                found = await api.subscription(org.stripe_subscription_id)
                if found is None:
                    report.errors.append(
                        {"org_id": org.id, "error": f"subscription {org.stripe_subscription_id} not found at Stripe"}
                    )
                else:
                    subscriptions[found["id"]] = found
            read_at = clock()
            # Oldest first, so that the organisation settles on its current subscription as a delivery would.
            for sub in sorted(subscriptions.values(), key=lambda s: (s.get("created") or 0, s["id"])):
                report.checked += 1
                change = await apply_subscription(pool, sub, org_id=org.id, read_at=read_at, policy=policy)
                if change is not None:
                    report.changed.append(change)
                    metrics.SYNC_CHANGES.inc()
        except (stripe.StripeError, TimeoutError) as error:
            metrics.SYNC_ERRORS.inc()
            report.errors.append({"org_id": org.id, "error": f"Stripe: {one_line(error)}"})
    for change in report.changed:
        log.info(
            "stripe sync: organisation %s subscription %s %s %s",
            change.org_id,
            change.subscription_id,
            change.outcome,
            ", ".join(f"{column} {old!r} -> {new!r}" for column, (old, new) in change.changes.items()) or "",
        )
    return report


class SyncJob:
    """`sync` every `interval` seconds, on one replica at a time."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        api: StripeApi,
        *,
        interval: float,
        runner: str,
        policy: BillingPolicy = DEFAULT_POLICY,
        name: str = JOB_NAME,
    ):
        self._name = name
        self._pool = pool
        self._api = api
        self._interval = interval
        self._runner = runner
        self._policy = policy
        self._task = BackgroundTask("stripe-sync", self._loop)

    async def run_if_due(self) -> SyncReport | None:
        async with self._pool.acquire() as conn:
            if not await store.claim_job(conn, self._name, self._interval, self._runner):
                return None
        try:
            report = await sync(self._pool, self._api, policy=self._policy)
        except Exception as error:
            metrics.SYNC_RUNS.labels(outcome="failed").inc()
            with contextlib.suppress(*db.DATABASE_ERRORS):
                async with self._pool.acquire() as conn:
                    await store.finish_job(conn, self._name, self._runner, {"failed": one_line(error)})
            raise
        metrics.SYNC_RUNS.labels(outcome="completed").inc()
        summary = {"read": report.checked, "changed": len(report.changed), "errors": len(report.errors)}
        async with self._pool.acquire() as conn:
            await store.finish_job(conn, self._name, self._runner, summary)
        log.info(
            "stripe sync: %d subscriptions read, %d changed, %d errors",
            report.checked,
            len(report.changed),
            len(report.errors),
        )
        return report

    def start(self) -> None:
        self._task.start()

    async def _loop(self) -> None:
        while not self._task.stopping.is_set():
            try:
                await self.run_if_due()
            except db.DATABASE_ERRORS as error:
                log.warning("stripe sync could not run: %s", one_line(error))
            except Exception:
                log.exception("stripe sync failed")
            await self._task.pause(min(self._interval, CHECK_EVERY_SECONDS))

    async def stop(self, timeout: float = 10.0) -> None:
        """Start no new run; let one in flight finish for up to `timeout` seconds."""
        await self._task.drain(timeout)

"""Organisations: the store behind `orgs create|show|suspend|resume`."""

import uuid
from dataclasses import dataclass
from datetime import datetime

from driftlock_kernel import db
from driftlock_kernel.billing import FREE_PLAN
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.periods import Period, current_period


class NotFound(OperatorError):
    """A named record does not exist; the message says which, for the operator."""


@dataclass(frozen=True, slots=True)
class Organization:
    """A row of driftlock.organizations (the billing columns are kept up to date by the webhook service)."""

    id: uuid.UUID
    name: str
    plan_name: str
    billing_status: str  # billing.NO_SUBSCRIPTION or a billing.SubscriptionStatus
    suspended_at: datetime | None
    past_due_since: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    # The Stripe subscription's current period; None: the calendar month.
    period_start: datetime | None
    period_end: datetime | None
    created_at: datetime
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False

    @property
    def plan(self) -> str:
        return self.plan_name

    def billing_period(self, now: datetime) -> Period:
        return current_period(self.period_start, self.period_end, now)

    def as_dict(self, now: datetime) -> dict:
        period = self.billing_period(now)
        return {
            "id": self.id,
            "name": self.name,
            "plan": self.plan,
            "billing_status": self.billing_status,
            "suspended": self.suspended_at is not None,
            "suspended_at": self.suspended_at,
            "past_due_since": self.past_due_since,
            "stripe_customer_id": self.stripe_customer_id,
            "stripe_subscription_id": self.stripe_subscription_id,
            "period_start": period.start,
            "period_end": period.end,
            "trial_end": self.trial_end,
            "cancel_at_period_end": self.cancel_at_period_end,
            "created_at": self.created_at,
        }


async def plan_exists(conn: db.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM driftlock.plans WHERE name = $1)", name))


async def create_org(conn: db.Connection, name: str, *, plan: str = FREE_PLAN) -> Organization:
    if not await plan_exists(conn, plan):
        raise NotFound(f"no plan named {plan!r} (see `driftlock-gateway plans list`)")
    row = await conn.fetchrow(
        "INSERT INTO driftlock.organizations (name, plan_name) VALUES ($1, $2) RETURNING *", name, plan
    )
    return db.from_row(Organization, db.returned(row))


async def get_org(conn: db.Connection, org_id: uuid.UUID) -> Organization:
    row = await conn.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org_id)
    if row is None:
        raise NotFound(f"no organisation with id {org_id}")
    return db.from_row(Organization, row)


async def set_suspended(conn: db.Connection, org_id: uuid.UUID, suspended: bool) -> Organization:
    # Suspending twice keeps the first suspension time; only an actual change touches the row (and so
    # wakes the caches).
    row = await conn.fetchrow(
        """UPDATE driftlock.organizations
           SET suspended_at = CASE WHEN $2 THEN coalesce(suspended_at, now()) END, updated_at = now()
           WHERE id = $1 AND (suspended_at IS NULL) = $2
           RETURNING *""",
        org_id,
        suspended,
    )
    return db.from_row(Organization, row) if row else await get_org(conn, org_id)

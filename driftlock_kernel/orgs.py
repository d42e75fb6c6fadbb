"""Organisations: the store behind `orgs create|show|suspend|resume`."""

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from driftlock_kernel.errors import OperatorError
from driftlock_kernel.periods import Period, current_period


class NotFound(OperatorError):
    """A named record does not exist; the message says which, for the operator."""


@dataclass(frozen=True, slots=True)
class Organization:
    id: uuid.UUID
    name: str
    plan: str
    billing_status: str
    suspended_at: datetime | None
    past_due_since: datetime | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    subscription_period: Period | None
    created_at: datetime
    trial_end: datetime | None = None
    cancel_at_period_end: bool = False

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> "Organization":
        period = None
        if row["period_start"] is not None and row["period_end"] is not None:
            period = Period(row["period_start"], row["period_end"])
        return cls(
            id=row["id"],
            name=row["name"],
            plan=row["plan_name"],
            billing_status=row["billing_status"],
            suspended_at=row["suspended_at"],
            past_due_since=row["past_due_since"],
            stripe_customer_id=row["stripe_customer_id"],
            stripe_subscription_id=row["stripe_subscription_id"],
            subscription_period=period,
            created_at=row["created_at"],
            # Kept up to date by the Stripe webhook service (migration 0003).
            trial_end=row.get("trial_end"),
            cancel_at_period_end=bool(row.get("cancel_at_period_end")),
        )

    def billing_period(self, now: datetime) -> Period:
        sub = self.subscription_period
        return current_period(sub.start if sub else None, sub.end if sub else None, now)

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


async def plan_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM driftlock.plans WHERE name = $1)", name))


async def create_org(conn: asyncpg.Connection, name: str, *, plan: str = "free") -> Organization:
    if not await plan_exists(conn, plan):
        raise NotFound(f"no plan named {plan!r} (see `driftlock-gateway plans list`)")
    row = await conn.fetchrow(
        "INSERT INTO driftlock.organizations (name, plan_name) VALUES ($1, $2) RETURNING *", name, plan
    )
    return Organization.from_row(row)


async def get_org(conn: asyncpg.Connection, org_id: uuid.UUID) -> Organization:
    row = await conn.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1", org_id)
    if row is None:
        raise NotFound(f"no organisation with id {org_id}")
    return Organization.from_row(row)


async def set_suspended(conn: asyncpg.Connection, org_id: uuid.UUID, suspended: bool) -> Organization:
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
    return Organization.from_row(row) if row else await get_org(conn, org_id)

"""Organisations: the store behind `orgs create|show|list|set-plan|suspend|resume` and the management API."""

import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime

from driftlock_kernel import db
from driftlock_kernel.billing import FREE_PLAN, BillingStatus
from driftlock_kernel.errors import OperatorError
from driftlock_kernel.paging import Cursor
from driftlock_kernel.periods import Period, current_period


class NotFound(OperatorError):
    """A named record does not exist; the message says which, for the operator."""


class InvalidName(OperatorError, ValueError):
    """A name no screen or log can show as given (the CLI prints it as its one-line error)."""


def has_control_characters(text: str) -> bool:
    """NUL, line breaks, escapes, DEL, C1: a name shown in a dashboard, a log line or a table holds none of them
    (and PostgreSQL cannot store a NUL at all, so letting one through fails later, not here)."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def check_name(name: str, *, field: str = "name") -> str:
    """A key's or organisation's name as given, or InvalidName when it holds a control character."""
    if has_control_characters(name):
        raise InvalidName(f"{field} must not contain control characters")
    return name


@dataclass(frozen=True, slots=True)
class Organization:
    """A row of driftlock.organizations (the billing columns are kept up to date by the webhook service)."""

    id: uuid.UUID
    name: str
    plan_name: str
    billing_status: BillingStatus
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
    # The customer's spend cap on a soft plan: units past the included ones; None: no cap.
    max_overage_units: int | None = None

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
            "max_overage_units": self.max_overage_units,
            "created_at": self.created_at,
        }


async def plan_exists(conn: db.Connection, name: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM driftlock.plans WHERE name = $1)", name))


async def create_org(conn: db.Connection, name: str, *, plan: str = FREE_PLAN) -> Organization:
    check_name(name)
    if not await plan_exists(conn, plan):
        raise NotFound(f"no plan named {plan!r} (see `driftlock-gateway plans list`)")
    row = await conn.fetchrow(
        "INSERT INTO driftlock.organizations (name, plan_name) VALUES ($1, $2) RETURNING *", name, plan
    )
    return db.from_row(Organization, db.returned(row))


async def get_org(conn: db.Connection, org_id: uuid.UUID) -> Organization:
    # An erased organisation (delete_org) is gone for every caller, though its row stays for the invoices.
    row = await conn.fetchrow("SELECT * FROM driftlock.organizations WHERE id = $1 AND deleted_at IS NULL", org_id)
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


async def list_orgs_page(
    conn: db.Connection, *, limit: int, after: Cursor | None = None, only: uuid.UUID | None = None
) -> tuple[list[Organization], Cursor | None]:
    """Up to `limit` organisations in creation order after `after` (only the one named by `only`, if given);
    with the cursor of the next page, None on the last."""
    rows = await conn.fetch(
        """SELECT * FROM driftlock.organizations
           WHERE ($1::timestamptz IS NULL OR (created_at, id) > ($1, $2)) AND ($3::uuid IS NULL OR id = $3)
             AND deleted_at IS NULL
           ORDER BY created_at, id LIMIT $4""",
        after.created_at if after else None,
        after.id if after else None,
        only,
        limit + 1,
    )
    found = [db.from_row(Organization, row) for row in rows[:limit]]
    more = len(rows) > limit
    return found, Cursor(found[-1].created_at, found[-1].id) if more and found else None


async def set_plan(conn: db.Connection, org_id: uuid.UUID, plan: str) -> Organization:
    """Put the organisation on `plan` (every replica serves it within a second). For an organisation billed
    through Stripe, the subscription's price sets the plan again at its next event."""
    if not await plan_exists(conn, plan):
        raise NotFound(f"no plan named {plan!r} (see `driftlock-gateway plans list`)")
    row = await conn.fetchrow(
        """UPDATE driftlock.organizations SET plan_name = $2, updated_at = now()
           WHERE id = $1 AND plan_name IS DISTINCT FROM $2 RETURNING *""",
        org_id,
        plan,
    )
    return db.from_row(Organization, row) if row else await get_org(conn, org_id)


class SpendCapError(OperatorError):
    """A spend cap cannot be set in the organisation's present state (its plan is not soft)."""


async def set_max_overage_units(conn: db.Connection, org_id: uuid.UUID, units: int | None) -> Organization:
    """Set (or, with None, remove) the organisation's spend cap: past its plan's included units plus `units`,
    billable calls answer spend_cap_reached until the period ends. Only a `soft` plan has overage to cap.
    Every replica applies it within a second (the table's trigger)."""
    if units is not None and units < 0:
        raise ValueError("max_overage_units must be 0 or more")
    org = await get_org(conn, org_id)
    if units is not None:
        overage = await conn.fetchval("SELECT overage FROM driftlock.plans WHERE name = $1", org.plan_name)
        if overage != "soft":
            raise SpendCapError(
                f"organisation {org_id} is on plan {org.plan_name!r}, whose overage is {overage!r}: "
                "a spend cap applies to a soft plan only"
            )
    row = await conn.fetchrow(
        """UPDATE driftlock.organizations SET max_overage_units = $2, updated_at = now()
           WHERE id = $1 AND deleted_at IS NULL AND max_overage_units IS DISTINCT FROM $2 RETURNING *""",
        org_id,
        units,
    )
    return db.from_row(Organization, row) if row else await get_org(conn, org_id)


# What an erased organisation's name becomes (the column cannot be empty).
ERASED_NAME = "erased"


async def delete_org(conn: db.Connection, org_id: uuid.UUID) -> int:
    """Erase the organisation (what a GDPR erasure request gets), in the caller's transaction:

    - every key is revoked (every replica refuses it within a second: the api_keys trigger) and its name and
      metadata are erased; key ids and prefixes stay, as the usage records and audit entries name them;
    - the organisation's name is erased, its spend cap removed, and it answers 404 from now on;
    - audit entries keep ids, times, actions and codes only: their detail, path and source address, and the
      subject of the token that acted, are erased;
    - usage, refunds, billing periods, Stripe exports and the Stripe ids stay: invoices need them.

    Returns how many keys were still active (and are revoked now).
    """
    org = await get_org(conn, org_id)
    active = await conn.fetchval(
        "SELECT count(*) FROM driftlock.api_keys WHERE org_id = $1 AND revoked_at IS NULL", org.id
    )
    await conn.execute(
        """UPDATE driftlock.api_keys
           SET revoked_at = coalesce(revoked_at, now()), name = NULL, metadata = '{}'::jsonb, updated_at = now()
           WHERE org_id = $1""",
        org.id,
    )
    await conn.execute(
        """UPDATE driftlock.audit_log SET detail = NULL, path = NULL, source = NULL, actor_subject = NULL
           WHERE org_id = $1""",
        org.id,
    )
    await conn.execute(
        """UPDATE driftlock.organizations
           SET name = $2, max_overage_units = NULL, deleted_at = now(), updated_at = now()
           WHERE id = $1""",
        org.id,
        ERASED_NAME,
    )
    return int(active)

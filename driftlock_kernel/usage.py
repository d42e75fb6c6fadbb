"""Usage as the CLI reports it: stored counters of a billing period (the current one or the closed one before it),
alerts, and audit retention."""

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from driftlock_kernel import db, retention
from driftlock_kernel.billing import BillingPolicy, effective_plan
from driftlock_kernel.orgs import Organization, get_org
from driftlock_kernel.periods import Period, calendar_month
from driftlock_kernel.plans import get_plan

# The products the route table bills, the one list: usage is reported per each of them, and nothing outside it
# (a client-supplied name included) is accepted as a product, which also bounds the `product` metric label.
PRODUCTS = ("stream", "monitor")


@dataclass(frozen=True, slots=True)
class OrgUsage:
    """An organisation's stored usage in one billing period, pooled over products."""

    org_id: uuid.UUID
    plan: str
    period_start: datetime
    period_end: datetime
    used: dict[str, int]  # per product, and "total"
    included: int

    @property
    def ratio(self) -> float:
        return round(self.used["total"] / self.included, 6) if self.included else 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"ratio": self.ratio}


@dataclass(frozen=True, slots=True)
class UsageAlert:
    """A usage-threshold alert as stored (raised once per organisation, period and threshold)."""

    id: int
    org_id: uuid.UUID
    threshold: int
    period_start: datetime
    period_end: datetime
    used_units: int
    included_units: int
    plan: str
    created_at: datetime
    webhook_delivered_at: datetime | None
    webhook_attempts: int = 0
    webhook_expired_at: datetime | None = None  # not acknowledged in time: no longer sent

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Which(StrEnum):
    """Which billing period a usage report is about."""

    CURRENT = "current"
    PREVIOUS = "previous"  # the closed period before the current one


async def previous_period(conn: db.Connection, org: Organization, current: Period) -> Period:
    """The closed period before `current`: the latest period Stripe reported (billing_periods) or usage was
    counted in that started before it, ending where it was recorded to end (else where `current` starts); the
    calendar month before, when there is none."""
    row = await conn.fetchrow(
        """SELECT period_start, max(period_end) AS period_end FROM (
               SELECT period_start, period_end FROM driftlock.billing_periods
               WHERE org_id = $1 AND period_start < $2
               UNION ALL
               SELECT period_start, NULL FROM driftlock.usage_counters WHERE org_id = $1 AND period_start < $2
           ) AS known
           GROUP BY period_start ORDER BY period_start DESC LIMIT 1""",
        org.id,
        current.start,
    )
    if row is None:
        return calendar_month(current.start - timedelta(microseconds=1))
    end = row["period_end"] if row["period_end"] is not None and row["period_end"] <= current.start else current.start
    return Period(row["period_start"], end)


async def org_usage(
    conn: db.Connection, org_id: uuid.UUID, now: datetime, policy: BillingPolicy, which: Which = Which.CURRENT
) -> OrgUsage:
    """Stored usage of a billing period, pooled over products. Units an authz replica counted in the last second
    (its flush interval) may not be stored yet; refunds reach the counters the same way."""
    org = await get_org(conn, org_id)
    period = org.billing_period(now)
    if which is Which.PREVIOUS:
        period = await previous_period(conn, org, period)
    rows = await conn.fetch(
        # One row per product and terms (the plan, meter and customer the units were used under): pooled here.
        """SELECT product, sum(units)::bigint AS units FROM driftlock.usage_counters
           WHERE org_id = $1 AND period_start = $2 GROUP BY product""",
        org_id,
        period.start,
    )
    used = dict.fromkeys(PRODUCTS, 0) | {row["product"]: row["units"] for row in rows}
    plan = await get_plan(conn, effective_plan(org.plan_name, org.billing_status, policy))
    return OrgUsage(
        org_id=org.id,
        plan=plan.name if plan else org.plan_name,
        period_start=period.start,
        period_end=period.end,
        used=used | {"total": sum(used.values())},
        included=plan.included_units if plan else 0,
    )


async def list_alerts(conn: db.Connection, org_id: uuid.UUID) -> list[UsageAlert]:
    await get_org(conn, org_id)
    rows = await conn.fetch(
        """SELECT id, org_id, threshold, period_start, period_end, used_units, included_units, plan_name AS plan,
                  created_at, webhook_delivered_at, webhook_attempts, webhook_expired_at
           FROM driftlock.usage_alerts WHERE org_id = $1 ORDER BY period_start, threshold""",
        org_id,
    )
    return [db.from_row(UsageAlert, row) for row in rows]


async def prune_audit(conn: db.Connection, older_than: timedelta, *, batch: int = 10_000) -> int:
    """Delete audit entries (and counted denials) older than `older_than`, in batches so that a large table is never
    locked long."""
    return sum(
        [
            await retention.prune_table(conn, retention.TABLES[name], older_than, batch=batch)
            for name in ("audit_log", "audit_denials")
        ]
    )

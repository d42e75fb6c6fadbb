"""Plans: what an organisation's subscription includes, and the store for them."""

from dataclasses import dataclass
from enum import StrEnum

import asyncpg


class Overage(StrEnum):
    SOFT = "soft"  # keep serving past the included units; the excess is billed
    BLOCK = "block"  # answer quota_exceeded past the included units


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    included_units: int
    overage: Overage
    hard_cap_percent: int | None
    rate_limit_rps: float | None
    stripe_price_ids: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> "Plan":
        return cls(
            name=row["name"],
            included_units=row["included_units"],
            overage=Overage(row["overage"]),
            hard_cap_percent=row["hard_cap_percent"],
            rate_limit_rps=row["rate_limit_rps"],
            stripe_price_ids=tuple(row["stripe_price_ids"] or ()),
        )

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "included_units": self.included_units,
            "overage": self.overage.value,
            "hard_cap_percent": self.hard_cap_percent,
            "rate_limit_rps": self.rate_limit_rps,
            "stripe_price_ids": list(self.stripe_price_ids),
        }


_SELECT = """
    SELECT p.name, p.included_units, p.overage, p.hard_cap_percent, p.rate_limit_rps,
           coalesce(array_agg(pp.stripe_price_id ORDER BY pp.stripe_price_id)
                    FILTER (WHERE pp.stripe_price_id IS NOT NULL), '{}') AS stripe_price_ids
    FROM driftlock.plans p LEFT JOIN driftlock.plan_prices pp ON pp.plan_name = p.name
"""

# Marks an option the operator did not give, so that updating a plan keeps its current value.
UNCHANGED = object()


async def get_plan(conn: asyncpg.Connection, name: str) -> Plan | None:
    row = await conn.fetchrow(_SELECT + " WHERE p.name = $1 GROUP BY p.name", name)
    return Plan.from_row(row) if row else None


async def list_plans(conn: asyncpg.Connection) -> list[Plan]:
    rows = await conn.fetch(_SELECT + " GROUP BY p.name ORDER BY p.name")
    return [Plan.from_row(row) for row in rows]


async def upsert_plan(
    conn: asyncpg.Connection,
    name: str,
    *,
    included_units: int,
    overage=UNCHANGED,
    hard_cap_percent=UNCHANGED,
    rate_limit_rps=UNCHANGED,
    stripe_price_ids=UNCHANGED,
) -> tuple[Plan, bool]:
    """Create the plan, or update it keeping every option passed as UNCHANGED; return (plan, created).

    Price ids given replace the plan's set; a price id that selected another plan now selects this one.
    """
    async with conn.transaction():
        current = await conn.fetchrow("SELECT * FROM driftlock.plans WHERE name = $1 FOR UPDATE", name)

        def pick(value, column: str, default):
            if value is not UNCHANGED:
                return value
            return current[column] if current else default

        await conn.execute(
            """INSERT INTO driftlock.plans (name, included_units, overage, hard_cap_percent, rate_limit_rps)
               VALUES ($1, $2, $3, $4, $5)
               ON CONFLICT (name) DO UPDATE SET
                   included_units = EXCLUDED.included_units, overage = EXCLUDED.overage,
                   hard_cap_percent = EXCLUDED.hard_cap_percent, rate_limit_rps = EXCLUDED.rate_limit_rps,
                   updated_at = now()""",
            name,
            included_units,
            str(pick(overage, "overage", Overage.SOFT)),
            pick(hard_cap_percent, "hard_cap_percent", None),
            pick(rate_limit_rps, "rate_limit_rps", None),
        )
        if stripe_price_ids is not UNCHANGED:
            await conn.execute(
                "DELETE FROM driftlock.plan_prices WHERE plan_name = $1 AND NOT stripe_price_id = ANY($2::text[])",
                name,
                list(stripe_price_ids),
            )
            await conn.execute(
                """INSERT INTO driftlock.plan_prices (stripe_price_id, plan_name)
                   SELECT unnest($2::text[]), $1
                   ON CONFLICT (stripe_price_id) DO UPDATE SET plan_name = EXCLUDED.plan_name""",
                name,
                list(stripe_price_ids),
            )
        plan = await get_plan(conn, name)
    assert plan is not None
    return plan, current is None

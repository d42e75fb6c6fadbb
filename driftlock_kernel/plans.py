"""Plans: what an organisation's subscription includes, and the store for them."""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from driftlock_kernel import db
from driftlock_kernel.billing import Overage, PlanLimits


@dataclass(frozen=True, slots=True)
class Plan(PlanLimits):
    """A plan as stored: its limits, and where its usage is reported at Stripe."""

    stripe_price_ids: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "included_units": self.included_units,
            "overage": self.overage.value,
            "hard_cap_percent": self.hard_cap_percent,
            "rate_limit_rps": self.rate_limit_rps,
            "stripe_price_ids": list(self.stripe_price_ids),
            "stripe_meter": self.stripe_meter,
            "test_included_units": self.test_included_units,
            "test_rate_limit_rps": self.test_rate_limit_rps,
            "products": list(self.products) if self.products is not None else None,
        }


# What the schema accepts as a plan's name.
PLAN_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

# What the schema accepts as a Stripe meter's event_name (Stripe allows at most 100 characters).
STRIPE_METER_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def check_stripe_meter(name: str) -> str:
    """A meter event name as `plans upsert --stripe-meter` takes it; ValueError with a message for the user."""
    if not STRIPE_METER_NAME.fullmatch(name):
        raise ValueError(
            f"malformed Stripe meter event name {name!r}: the meter's event_name, up to 100 letters, digits and _.:-"
        )
    return name


# The products a plan or a key can name (the route table's `product` context extension of detect routes).
PRODUCTS = ("stream", "monitor")


def check_products(names: Sequence[str]) -> tuple[str, ...]:
    """Products as a plan or a key stores them (sorted, no repeats); ValueError with a message for the user."""
    cleaned = sorted({name.strip() for name in names if name.strip()})
    unknown = [name for name in cleaned if name not in PRODUCTS]
    if unknown or not cleaned:
        raise ValueError(f"products must be one or more of {', '.join(PRODUCTS)}; got {', '.join(names) or 'none'}")
    return tuple(cleaned)


# What test keys get on a plan that does not say.
_UNSAID = PlanLimits("", 0, Overage.SOFT)
TEST_DEFAULTS: dict[str, Any] = {
    "test_included_units": _UNSAID.test_included_units,
    "test_rate_limit_rps": _UNSAID.test_rate_limit_rps,
}

_SELECT = """
    SELECT p.name, p.included_units, p.overage, p.hard_cap_percent, p.rate_limit_rps, p.stripe_meter,
           p.test_included_units, p.test_rate_limit_rps, p.products,
           coalesce(array_agg(pp.stripe_price_id ORDER BY pp.stripe_price_id)
                    FILTER (WHERE pp.stripe_price_id IS NOT NULL), '{}') AS stripe_price_ids
    FROM driftlock.plans p LEFT JOIN driftlock.plan_prices pp ON pp.plan_name = p.name
"""


class Unchanged(Enum):
    """Marks an option the operator did not give, so that updating a plan keeps its current value."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


async def get_plan(conn: db.Connection, name: str) -> Plan | None:
    row = await conn.fetchrow(_SELECT + " WHERE p.name = $1 GROUP BY p.name", name)
    return db.from_row(Plan, row) if row else None


async def list_plans(conn: db.Connection) -> list[Plan]:
    rows = await conn.fetch(_SELECT + " GROUP BY p.name ORDER BY p.name")
    return [db.from_row(Plan, row) for row in rows]


async def upsert_plan(
    conn: db.Connection,
    name: str,
    *,
    included_units: int,
    overage: Overage | Unchanged = UNCHANGED,
    hard_cap_percent: int | Unchanged | None = UNCHANGED,
    rate_limit_rps: float | Unchanged | None = UNCHANGED,
    stripe_price_ids: Sequence[str] | Unchanged = UNCHANGED,
    stripe_meter: str | Unchanged | None = UNCHANGED,
    test_included_units: int | Unchanged = UNCHANGED,
    test_rate_limit_rps: float | Unchanged = UNCHANGED,
    products: Sequence[str] | Unchanged | None = UNCHANGED,
) -> tuple[Plan, bool]:
    """Create the plan, or update it keeping every option passed as UNCHANGED; return (plan, created).

    Price ids given replace the plan's set; a price id that selected another plan now selects this one.
    """
    checked_products = products if products is UNCHANGED or products is None else list(check_products(products))
    async with conn.transaction():
        current = await conn.fetchrow("SELECT * FROM driftlock.plans WHERE name = $1 FOR UPDATE", name)

        def pick(value: Any, column: str, default: Any) -> Any:
            if value is not UNCHANGED:
                return value
            return current[column] if current else default

        await conn.execute(
            """INSERT INTO driftlock.plans (name, included_units, overage, hard_cap_percent, rate_limit_rps,
                                              stripe_meter, test_included_units, test_rate_limit_rps, products)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (name) DO UPDATE SET
                   included_units = EXCLUDED.included_units, overage = EXCLUDED.overage,
                   hard_cap_percent = EXCLUDED.hard_cap_percent, rate_limit_rps = EXCLUDED.rate_limit_rps,
                   stripe_meter = EXCLUDED.stripe_meter, test_included_units = EXCLUDED.test_included_units,
                   test_rate_limit_rps = EXCLUDED.test_rate_limit_rps, products = EXCLUDED.products,
                   updated_at = now()""",
            name,
            included_units,
            str(pick(overage, "overage", Overage.SOFT)),
            pick(hard_cap_percent, "hard_cap_percent", None),
            pick(rate_limit_rps, "rate_limit_rps", None),
            pick(stripe_meter, "stripe_meter", None),
            pick(test_included_units, "test_included_units", TEST_DEFAULTS["test_included_units"]),
            pick(test_rate_limit_rps, "test_rate_limit_rps", TEST_DEFAULTS["test_rate_limit_rps"]),
            pick(checked_products, "products", None),
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
    if plan is None:
        raise RuntimeError(f"plan {name!r} vanished inside the transaction that wrote it")
    return plan, current is None

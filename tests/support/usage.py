"""Reading what metering stored."""

from datetime import UTC, datetime

from driftlock_kernel.periods import calendar_month
from tests.support.net import eventually


async def stored_usage(pool, org_id) -> dict[str, int]:
    """Stored units per product in the organisation's current period (tests' organisations have no Stripe
    subscription, so that is the calendar month)."""
    period = calendar_month(datetime.now(UTC))
    rows = await pool.fetch(
        """SELECT product, sum(units)::bigint AS units FROM driftlock.usage_counters
           WHERE org_id = $1 AND period_start = $2 GROUP BY product""",
        org_id,
        period.start,
    )
    return {row["product"]: row["units"] for row in rows}


async def wait_for_usage(pool, org_id, expected: dict[str, int], *, within: float = 10.0) -> None:
    """Wait until exactly `expected` is stored (flushes run every second); fail with what was stored."""
    last = {}

    async def matches() -> bool:
        nonlocal last
        last = await stored_usage(pool, org_id)
        return last == expected

    try:
        await eventually(matches, within=within, what=f"stored usage {expected}", interval=0.1)
    except AssertionError:
        raise AssertionError(f"stored usage {last}, expected {expected}") from None

"""Usage history (hour and day buckets) against real PostgreSQL: written by the meter's flush with the counters,
so a period's buckets add up to its counters through refunds, lost acknowledgements, spills and restarts."""

import json
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

from authz_service.check.decision import PlanLimits
from authz_service.usage.meter_store import MeterStore
from authz_service.usage.metering import FlushOutcome, Meter, Reserved
from authz_service.usage.refunds import Refund
from authz_service.usage.rollups import hour_of
from authz_service.usage.usage_ledger import Report, UsageLedger
from driftlock_kernel.billing import Overage
from driftlock_kernel.periods import calendar_month
from tests.integration.test_meter import LostAcknowledgementStore
from tests.support.usage import stored_usage

PERIOD = calendar_month(datetime.now(UTC))
PLAN = PlanLimits("tests-unlimited", included_units=100, overage=Overage.SOFT)
# Two hours of the current period (tests' organisations are on calendar months).
HOUR_A = PERIOD.start.timestamp() + 3600 + 120
HOUR_B = HOUR_A + 3600


def new_meter(pool, store=None, **kwargs) -> Meter:
    return Meter(UsageLedger(), store or MeterStore(pool, replica="test"), **kwargs)


async def serve(meter: Meter, org_id: str, key_id: str, product: str, at: float, n: int = 1) -> list[str]:
    key = (org_id, PERIOD.start)
    await meter.used(key)
    ids = []
    for _ in range(n):
        request_id = str(uuid.uuid4())
        assert meter.record(request_id, key, product, 1, PLAN, PERIOD.end, key_id=key_id, at=at)
        ids.append(request_id)
    return ids


async def flush_all(meter: Meter) -> None:
    while meter.ledger.has_work:
        assert await meter.flush_once() is not FlushOutcome.FAILED


async def bucket_sums(pool, org_id) -> dict[str, int]:
    """The period's total in each bucket table, next to the counters' total."""
    sums = {}
    sums["counters"] = await pool.fetchval(
        "SELECT coalesce(sum(units), 0) FROM driftlock.usage_counters WHERE org_id = $1 AND period_start = $2",
        org_id,
        PERIOD.start,
    )
    sums["hours"] = await pool.fetchval(
        "SELECT coalesce(sum(units), 0) FROM driftlock.usage_hours WHERE org_id = $1 AND period_start = $2",
        org_id,
        PERIOD.start,
    )
    for table in ("usage_days", "usage_key_hours", "usage_key_days"):
        sums[table] = await pool.fetchval(
            f"SELECT coalesce(sum(units), 0) FROM driftlock.{table} WHERE org_id = $1", org_id
        )
    return sums


def all_equal(sums: dict[str, int], expected: int) -> bool:
    return set(sums.values()) == {expected}


async def key_hour(pool, org_id, key_id, at: float) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        """SELECT coalesce(sum(units), 0) AS units, coalesce(sum(refunded_units), 0) AS refunded,
                  coalesce(sum(requests), 0) AS requests
           FROM driftlock.usage_key_hours WHERE org_id = $1 AND key_id = $2 AND hour = $3""",
        org_id,
        uuid.UUID(key_id),
        datetime.fromtimestamp(hour_of(at), UTC),
    )
    return row["units"], row["refunded"], row["requests"]


async def test_buckets_add_up_to_the_counters_and_a_refund_lands_in_the_hour_of_its_call(pool, make_org):
    org = await make_org()
    org_id = str(org.id)
    key_1, key_2 = str(uuid.uuid4()), str(uuid.uuid4())
    meter = new_meter(pool)
    refunded_call = (await serve(meter, org_id, key_1, "stream", HOUR_A, 3))[0]
    await serve(meter, org_id, key_2, "monitor", HOUR_B, 2)
    await flush_all(meter)
    # The refund arrives later (the next hour): it takes its unit back from the hour and key of the call.
    refund = Refund(refunded_call, org_id, PERIOD.start, "stream", 1, "status_5xx", key_id=key_1, hour=hour_of(HOUR_A))
    assert meter.refund(refund)
    meter.report(Report("backend-1", org_id, PERIOD.start, "monitor", 4), PLAN, PERIOD.end)
    await flush_all(meter)
    # The same refund flushed again by another replica takes nothing back twice.
    other = new_meter(pool)
    assert other.refund(refund)
    await flush_all(other)

    assert await stored_usage(pool, org.id) == {"stream": 2, "monitor": 6}
    sums = await bucket_sums(pool, org.id)
    assert all_equal(sums, 8), sums
    assert await key_hour(pool, org.id, key_1, HOUR_A) == (2, 1, 3)
    assert await key_hour(pool, org.id, key_2, HOUR_B) == (2, 0, 2)


async def test_a_flush_retried_after_a_lost_acknowledgement_adds_its_buckets_once(pool, make_org):
    org = await make_org()
    meter = new_meter(pool, LostAcknowledgementStore(pool, replica="test"))
    await serve(meter, str(org.id), str(uuid.uuid4()), "stream", HOUR_A, 5)
    assert await meter.flush_once() is FlushOutcome.FAILED  # applied, but the answer was lost
    await flush_all(meter)
    assert all_equal(await bucket_sums(pool, org.id), 5)


async def test_a_spill_replayed_twice_and_a_restart_keep_the_sums(pool, make_org, tmp_path):
    org = await make_org()
    key_id = str(uuid.uuid4())
    first = new_meter(pool, spill_dir=tmp_path)
    await serve(first, str(org.id), key_id, "stream", HOUR_A, 4)
    first.denied((str(org.id), PERIOD.start), HOUR_A, "stream", key_id, "rate_limited")
    assert first.spill_now() == 4  # SIGTERM: on disk first, as if the database were away
    spilled = list(tmp_path.glob("meter-*.json"))
    (tmp_path / "meter-copy.json").write_text(spilled[0].read_text())  # the same file replayed twice
    first.ledger.drain()  # the process dies without flushing

    successor = new_meter(pool, spill_dir=tmp_path)
    assert successor.restore_spilled() == 8
    await serve(successor, str(org.id), key_id, "stream", HOUR_B, 1)
    await flush_all(successor)
    assert all_equal(await bucket_sums(pool, org.id), 5)
    denied = await pool.fetchval(
        "SELECT sum(denied_rate) FROM driftlock.usage_key_hours WHERE org_id = $1 AND key_id = $2",
        org.id,
        uuid.UUID(key_id),
    )
    assert denied == 1


async def test_a_reservation_near_the_cap_writes_its_bucket_in_its_own_statement(pool, make_org):
    org = await make_org()
    key_id = str(uuid.uuid4())
    meter = new_meter(pool)
    key = (str(org.id), PERIOD.start)
    await meter.used(key)
    reserved = await meter.reserve("r-1", key, "stream", 2, PLAN, PERIOD.end, 10, 5.0, key_id=key_id, at=HOUR_A)
    assert reserved is Reserved.COUNTED
    refused = await meter.reserve("r-2", key, "stream", 9, PLAN, PERIOD.end, 10, 5.0, key_id=key_id, at=HOUR_A)
    assert refused is Reserved.REFUSED
    assert all_equal(await bucket_sums(pool, org.id), 2)
    assert await key_hour(pool, org.id, key_id, HOUR_A) == (2, 0, 1)


async def test_denials_alone_are_flushed(pool, make_org):
    org = await make_org()
    key_id = str(uuid.uuid4())
    meter = new_meter(pool)
    for code in ("rate_limited", "quota_exceeded", "revoked_api_key", "payment_required"):
        meter.denied((str(org.id), PERIOD.start), HOUR_A, "monitor", key_id, code)
    await flush_all(meter)
    row = await pool.fetchrow(
        """SELECT denied_access, denied_payment, denied_quota, denied_rate, units FROM driftlock.usage_hours
           WHERE org_id = $1""",
        org.id,
    )
    assert dict(row) == {"denied_access": 1, "denied_payment": 1, "denied_quota": 1, "denied_rate": 1, "units": 0}


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "driftlock-usage-history.json"


def grafana_sql(sql: str, org_id: str) -> str:
    """A panel's SQL as Grafana would send it (its macros expanded) for this organisation and the last 40 days."""
    sql = sql.replace("${org_id}", org_id)
    return re.sub(r"\$__timeFilter\(([a-z_.]+)\)", r"\1 >= now() - interval '40 days'", sql)


async def test_the_grafana_panels_read_what_the_api_reads(pool, make_org):
    org = await make_org()
    org_id = str(org.id)
    meter = new_meter(pool)
    now = datetime.now(UTC).timestamp()
    ids = await serve(meter, org_id, str(uuid.uuid4()), "stream", now, 3)
    await serve(meter, org_id, str(uuid.uuid4()), "monitor", now, 2)
    meter.refund(Refund(ids[0], org_id, PERIOD.start, "stream", 1, "status_5xx"))
    await flush_all(meter)
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = dashboard["templating"]["list"]
    choices = await pool.fetch(variable["query"])
    assert org_id in {row["__value"] for row in choices}
    answers = {}
    for panel in dashboard["panels"]:
        (target,) = panel["targets"]
        answers[panel["title"]] = await pool.fetch(grafana_sql(target["rawSql"], org_id))
    # What is billed and what the hour buckets show agree, net of the refund.
    assert answers["Billable units this period (usage counters)"][0]["units"] == 4
    assert answers["Billable units this period (sum of hour buckets)"][0]["units"] == 4
    assert answers["Refunded units this period"][0]["units"] == 1
    per_product = {row["metric"]: row["value"] for row in answers["Billable units per hour, by product"]}
    assert per_product == {"stream": 2, "monitor": 2}
    assert sum(row["billable_units"] for row in answers["Keys by billable units in range"]) == 4

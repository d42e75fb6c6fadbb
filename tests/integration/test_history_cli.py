"""`usage history`, `keys usage` and `audit list` against a real database, after a real meter flush: the CSV
and the JSON show the same buckets, and both add up to the counters."""

import csv
import io
import uuid
from datetime import UTC, datetime

import pytest

from authz_service.check.decision import PlanLimits
from authz_service.usage.meter_store import MeterStore
from authz_service.usage.metering import Meter
from authz_service.usage.refunds import Refund
from authz_service.usage.rollups import hour_of
from authz_service.usage.usage_ledger import UsageLedger
from driftlock_kernel.billing import Overage
from driftlock_kernel.periods import calendar_month
from tests.support.cli import assert_one_line_error, run_cli
from tests.support.usage import stored_usage

PLAN = PlanLimits("tests-unlimited", included_units=100, overage=Overage.SOFT)


@pytest.fixture
def cli(database_url):
    def run(*args: str):
        return run_cli(*args, database_url=database_url)

    return run


async def serve_and_flush(pool, org_id: str, key_id: str) -> None:
    """5 stream calls and 2 monitor calls now, one stream call refunded."""
    period = calendar_month(datetime.now(UTC))
    meter = Meter(UsageLedger(), MeterStore(pool, replica="cli-test"))
    key = (org_id, period.start)
    await meter.used(key)
    now = datetime.now(UTC).timestamp()
    ids = [str(uuid.uuid4()) for _ in range(7)]
    for i, request_id in enumerate(ids):
        product = "stream" if i < 5 else "monitor"
        assert meter.record(request_id, key, product, 1, PLAN, period.end, key_id=key_id, at=now)
    meter.refund(Refund(ids[0], org_id, period.start, "stream", 1, "status_5xx", key_id=key_id, hour=hour_of(now)))
    while meter.ledger.has_work:
        await meter.flush_once()


async def test_usage_history_csv_and_json_agree_and_add_up_to_the_counters(cli, pool):
    org = cli("orgs", "create", "CLI history", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--json").json()
    await serve_and_flush(pool, org["id"], key["id"])
    assert await stored_usage(pool, uuid.UUID(org["id"])) == {"stream": 4, "monitor": 2}

    for by, group_column in (("product", "product"), ("key", "key_id")):
        for granularity in ("hour", "day"):
            args = ("usage", "history", org["id"], "--granularity", granularity, "--by", by, "--since", "2d")
            document = cli(*args, "--json").json()
            as_csv = cli(*args, "--csv")
            assert as_csv.code == 0, as_csv.stderr
            rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
            assert [
                (r["start"], r[group_column], int(r["billable_units"]), int(r["refunded_units"]), int(r["requests"]))
                for r in rows
            ] == [
                (b["start"], b[group_column], b["billable_units"], b["refunded_units"], b["requests"])
                for b in document["buckets"]
            ]
            assert sum(b["billable_units"] for b in document["buckets"]) == 6
    by_product = cli("usage", "history", org["id"], "--json").json()["buckets"]
    assert {b["product"]: (b["billable_units"], b["refunded_units"], b["requests"]) for b in by_product} == {
        "stream": (4, 1, 5),
        "monitor": (2, 0, 2),
    }
    table = cli("usage", "history", org["id"])
    assert table.code == 0 and "6 billable units" in table.stdout

    listed = cli("keys", "list", "--org", org["id"], "--json").json()["keys"]
    assert [(k["id"], k["billable_units_this_period"]) for k in listed] == [(key["id"], 6)]
    usage = cli("keys", "usage", key["id"], "--json").json()
    assert (usage["key_id"], usage["billable_units"], usage["refunded_units"], usage["requests"]) == (
        key["id"],
        6,
        1,
        7,
    )


def test_audit_list_shows_who_revoked_a_key(cli):
    org = cli("orgs", "create", "CLI audit", "--json").json()
    key = cli("keys", "create", "--org", org["id"], "--json").json()
    cli("keys", "revoke", key["id"], "--json")
    listed = cli("audit", "list", "--org", org["id"], "--action", "keys.revoke", "--json").json()
    (entry,) = listed["entries"]
    assert (entry["action"], entry["key_id"], entry["actor_issuer"]) == (
        "keys.revoke",
        key["id"],
        "driftlock-gateway-cli",
    )
    everything = cli("audit", "list", "--org", org["id"], "--json").json()["entries"]
    assert [e["action"] for e in everything] == ["keys.revoke", "keys.create", "orgs.create"]
    text = cli("audit", "list", "--org", org["id"])
    assert text.code == 0 and "keys.revoke" in text.stdout


def test_bad_history_arguments_are_one_line_errors(cli):
    assert_one_line_error(cli("usage", "history"))
    assert_one_line_error(cli("usage", "history", "not-a-uuid"))
    assert_one_line_error(cli("usage", "history", str(uuid.uuid4())))  # no such organisation
    assert_one_line_error(cli("usage", "history", str(uuid.uuid4()), "--since", "7x"))
    assert_one_line_error(cli("usage", str(uuid.uuid4()), str(uuid.uuid4())))
    assert_one_line_error(cli("keys", "usage", str(uuid.uuid4())))
    assert_one_line_error(cli("audit", "list", "--org", "nope"))
    assert_one_line_error(cli("audit", "list", "--org", str(uuid.uuid4()), "--limit", "0"))

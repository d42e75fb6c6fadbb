"""The meter against real PostgreSQL, in process: exactly-once flushes, reports, alerts, spilling."""

import asyncio
import json
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from authz_service.check.decision import PlanLimits
from authz_service.usage.meter_store import FlushResult, MeterStore
from authz_service.usage.metering import FlushOutcome, Meter
from authz_service.usage.refunds import NO_TERMS
from authz_service.usage.usage_ledger import Batch, Report, UsageLedger
from driftlock_kernel import db
from driftlock_kernel.billing import Overage
from driftlock_kernel.periods import calendar_month
from tests.support.net import eventually
from tests.support.tcp_proxy import FaultProxy
from tests.support.usage import stored_usage

PERIOD = calendar_month(datetime.now(UTC))
PLAN = PlanLimits("tests-unlimited", included_units=100, overage=Overage.SOFT)


class LostAcknowledgementStore(MeterStore):
    """Commits a flush, then fails as if the connection died before the reply arrived: the outcome the meter
    sees when a COMMIT's acknowledgement is lost."""

    def __init__(self, pool, **kwargs):
        super().__init__(pool, **kwargs)
        self.lose_next = True

    async def flush(self, batch: Batch) -> FlushResult:
        result = await super().flush(batch)
        if self.lose_next:
            self.lose_next = False
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost after COMMIT was sent")
        return result


def new_meter(pool, store=None, **kwargs) -> Meter:
    return Meter(UsageLedger(), store or MeterStore(pool, replica="test"), **kwargs)


async def count(meter: Meter, org_id: str, product: str, n: int) -> None:
    key = (org_id, PERIOD.start)
    await meter.used(key)
    for _ in range(n):
        meter.record(str(uuid.uuid4()), key, product, 1, PLAN, PERIOD.end)


async def test_a_flush_stores_counts_per_product_and_reads_back_the_pooled_total(pool, make_org):
    org = await make_org()
    meter = new_meter(pool)
    await count(meter, str(org.id), "stream", 3)
    await count(meter, str(org.id), "monitor", 2)
    assert await meter.flush_once() is FlushOutcome.FLUSHED
    assert await stored_usage(pool, org.id) == {"stream": 3, "monitor": 2}
    assert meter.ledger.used((str(org.id), PERIOD.start)) == 5
    assert meter.ledger.pending_units == 0
    assert await meter.flush_once() is FlushOutcome.IDLE


async def test_a_flush_retried_after_a_lost_commit_acknowledgement_counts_once(pool, make_org):
    org = await make_org()
    store = LostAcknowledgementStore(pool, replica="test")
    meter = new_meter(pool, store)
    await count(meter, str(org.id), "stream", 7)
    assert await meter.flush_once() is FlushOutcome.FAILED  # committed, but the meter cannot know
    assert await stored_usage(pool, org.id) == {"stream": 7}
    await count(meter, str(org.id), "stream", 1)  # counted meanwhile: goes into the next batch
    assert await meter.flush_once() is FlushOutcome.FLUSHED  # the same batch again: found applied
    assert await meter.flush_once() is FlushOutcome.FLUSHED
    assert await stored_usage(pool, org.id) == {"stream": 8}
    flushes = await pool.fetchval("SELECT count(*) FROM driftlock.meter_flushes WHERE units = 7")
    assert flushes >= 1
    assert meter.ledger.used((str(org.id), PERIOD.start)) == 8


async def test_the_same_batch_sent_twice_reports_a_duplicate(pool, make_org):
    org = await make_org()
    store = MeterStore(pool, replica="test")
    batch = Batch(uuid.uuid4(), {(str(org.id), PERIOD.start, "stream", NO_TERMS): 4})
    first = await store.flush(batch)
    second = await store.flush(batch)
    assert (first.applied, second.applied) == (True, False)
    assert first.totals == second.totals == {(str(org.id), PERIOD.start): 4}


async def test_reported_units_count_once_across_replicas(pool, make_org):
    org = await make_org()
    replicas = [new_meter(pool), new_meter(pool)]
    report = Report("backend-req-1", str(org.id), PERIOD.start, "monitor", 5)
    for meter in replicas:
        await meter.used((str(org.id), PERIOD.start))
        assert meter.report(report, PLAN, PERIOD.end)
        assert not meter.report(report, PLAN, PERIOD.end)  # the same replica knows it already
        await meter.flush_once()
    assert await stored_usage(pool, org.id) == {"monitor": 5}


async def test_units_of_a_deleted_organisation_do_not_block_the_flush(pool, make_org):
    kept, deleted = await make_org(), await make_org()
    meter = new_meter(pool)
    await count(meter, str(kept.id), "stream", 1)
    await count(meter, str(deleted.id), "stream", 1)
    await pool.execute("DELETE FROM driftlock.organizations WHERE id = $1", deleted.id)
    assert await meter.flush_once() is FlushOutcome.FLUSHED
    assert await stored_usage(pool, kept.id) == {"stream": 1}


async def test_two_replicas_racing_across_thresholds_raise_each_alert_once(pool, make_org):
    org = await make_org()
    replicas = [new_meter(pool, MeterStore(pool, replica=f"r{i}")) for i in range(2)]
    for step in range(12):  # 10 units a step, 5 per replica, flushed concurrently: 0 -> 120 of 100 included
        for meter in replicas:
            await count(meter, str(org.id), "stream", 5)
        results = await asyncio.gather(*(meter.flush_once() for meter in replicas))
        assert all(r is FlushOutcome.FLUSHED for r in results), step
    rows = await pool.fetch(
        "SELECT threshold, used_units, included_units FROM driftlock.usage_alerts WHERE org_id = $1 ORDER BY 1",
        org.id,
    )
    assert [row["threshold"] for row in rows] == [70, 90, 100]
    for row in rows:
        assert row["used_units"] * 100 >= row["threshold"] * row["included_units"]


async def test_alerts_are_published_with_notify(pool, make_org, listen_url):
    org = await make_org()
    received: list[dict] = []

    def on_alert(_conn, _pid, _channel, payload: object) -> None:
        assert isinstance(payload, str)  # asyncpg hands a NOTIFY's payload over as text
        message = json.loads(payload)
        if message["org_id"] == str(org.id):
            received.append(message)

    listener = await db.connect(listen_url)  # LISTEN needs a session of its own: never a transaction pooler
    await listener.add_listener("driftlock_usage_alert", on_alert)
    try:
        meter = new_meter(pool)
        await count(meter, str(org.id), "stream", 95)
        await meter.flush_once()

        async def both_published() -> bool:
            return len(received) >= 2

        await eventually(both_published, within=5, what="two alert notifications")
    finally:
        await listener.close()
    assert sorted(m["threshold"] for m in received) == [70, 90]


@pytest.fixture
async def proxied_pool(database_url):
    proxy = await FaultProxy(database_url).start()
    pool = await db.create_pool(proxy.url(), application_name="tests-proxied", max_size=2, command_timeout=2)
    yield proxy, pool
    pool.terminate()
    await proxy.stop()


async def test_a_database_outage_delays_counts_and_loses_none(proxied_pool, pool, make_org):
    proxy, proxied = proxied_pool
    org = await make_org()
    meter = new_meter(proxied, flush_timeout=2)
    await count(meter, str(org.id), "stream", 3)
    await proxy.cut()
    await count(meter, str(org.id), "stream", 4)
    assert await meter.flush_once() is FlushOutcome.FAILED
    assert meter.ledger.used((str(org.id), PERIOD.start)) == 7
    await proxy.restore()
    while meter.ledger.has_work:
        assert await meter.flush_once() is not FlushOutcome.FAILED
    assert await stored_usage(pool, org.id) == {"stream": 7}


async def test_shutdown_during_an_outage_spills_and_the_next_start_flushes_once(proxied_pool, pool, make_org, tmp_path):
    proxy, proxied = proxied_pool
    org = await make_org()
    meter = new_meter(proxied, flush_timeout=1, spill_dir=tmp_path)
    await count(meter, str(org.id), "monitor", 6)
    await proxy.cut()
    await meter.close(timeout=1.0)
    spilled = list(tmp_path.glob("meter-*.json"))
    assert len(spilled) == 1
    copy = tmp_path / "meter-copy.json"  # as if the same file were replayed twice
    copy.write_text(spilled[0].read_text())

    successor = new_meter(pool, spill_dir=tmp_path)
    assert successor.restore_spilled() == 12
    while successor.ledger.has_work:
        assert await successor.flush_once() is FlushOutcome.FLUSHED
    assert await stored_usage(pool, org.id) == {"monitor": 6}
    assert list(tmp_path.glob("meter-*.json")) == []


async def test_a_corrupt_spill_file_is_set_aside_and_the_others_replayed(pool, make_org, tmp_path, caplog):
    org = await make_org()
    spill = tmp_path / "meter-good.json"
    spill.write_text(
        json.dumps(
            [
                {
                    "flush_id": str(uuid.uuid4()),
                    "counters": [[str(org.id), PERIOD.start.isoformat(), "stream", 4]],
                    "reports": [],
                }
            ]
        )
    )
    (tmp_path / "meter-torn.json").write_text('[{"flush_id": "')
    (tmp_path / "meter-odd.json").write_text('{"not": "batches"}')

    successor = new_meter(pool, spill_dir=tmp_path)
    assert successor.restore_spilled() == 4
    assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == ["meter-odd.json.corrupt", "meter-torn.json.corrupt"]
    assert "meter-torn.json is unreadable" in caplog.text
    while successor.ledger.has_work:
        assert await successor.flush_once() is FlushOutcome.FLUSHED
    assert await stored_usage(pool, org.id) == {"stream": 4}


class BusyStore(MeterStore):
    """A store under a busy gateway: more checks are counted while each flush is on its way."""

    def __init__(self, pool, meter_ref: list, org_id: str, **kwargs):
        super().__init__(pool, **kwargs)
        self._meter_ref = meter_ref
        self._org_id = org_id
        self.statements = 0

    async def flush(self, batch: Batch) -> FlushResult:
        self.statements += 1
        await count(self._meter_ref[0], self._org_id, "stream", 10)
        return await super().flush(batch)


async def test_a_busy_meter_sends_one_statement_per_interval(pool, make_org):
    org = await make_org()
    meter_ref: list = []
    store = BusyStore(pool, meter_ref, str(org.id), replica="test")
    meter = new_meter(pool, store)
    meter_ref.append(meter)
    await count(meter, str(org.id), "stream", 10)
    for cycle in range(1, 6):
        assert await meter.flush_cycle() == 1
        assert store.statements == cycle
    assert await stored_usage(pool, org.id) == {"stream": 50}  # what each flush took; 10 more arrived during the last
    assert meter.ledger.pending_units == 10


class HangingStore(MeterStore):
    """A database that accepts the connection and never answers: the flush hangs until its timeout."""

    async def flush(self, batch: Batch) -> FlushResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def test_close_puts_every_unit_on_disk_at_once_while_the_flush_hangs(pool, make_org, tmp_path):
    """SIGTERM then SIGKILL 10 s later (docker's stop timeout) during an outage: the units must be on disk long
    before the flush gives up."""
    org = await make_org()
    meter = new_meter(pool, HangingStore(pool, replica="test"), spill_dir=tmp_path, flush_timeout=60)
    key = (str(org.id), PERIOD.start)
    meter.ledger.learn(key, 0, meter.ledger.epoch(key))
    for _ in range(7):
        meter.record(str(uuid.uuid4()), key, "stream", 1, PLAN, PERIOD.end)
    closing = asyncio.create_task(meter.close(timeout=30))

    async def on_disk() -> bool:
        return len(list(tmp_path.glob("meter-*.json"))) == 1

    await eventually(on_disk, within=1.0, what="the spill file written when close begins")
    closing.cancel()  # the SIGKILL: the process ends here
    successor = new_meter(pool, spill_dir=tmp_path)
    assert successor.restore_spilled() == 7
    while successor.ledger.has_work:
        assert await successor.flush_once() is FlushOutcome.FLUSHED
    assert await stored_usage(pool, org.id) == {"stream": 7}
    assert list(tmp_path.glob("meter-*.json")) == []


async def test_an_outage_keeps_the_spill_file_current_and_the_file_goes_once_flushed(
    proxied_pool, pool, make_org, tmp_path
):
    """A SIGKILL without SIGTERM during an outage loses at most the last interval: everything older is on
    disk. When the database returns, the file is removed once its batches are flushed."""
    proxy, proxied = proxied_pool
    org = await make_org()
    meter = new_meter(proxied, flush_timeout=1, spill_dir=tmp_path)
    await count(meter, str(org.id), "stream", 3)
    await proxy.cut()
    await count(meter, str(org.id), "stream", 4)
    assert await meter.flush_once() is FlushOutcome.FAILED
    await meter._spill_step()  # one interval of the spill loop
    await count(meter, str(org.id), "monitor", 2)
    await meter._spill_step()
    files = list(tmp_path.glob("meter-*.json"))
    assert len(files) == 1
    # What a successor would replay if this process were killed now: all 9 units, in at most two batches.
    replayed = new_meter(pool, spill_dir=tmp_path)
    assert replayed.restore_spilled() == 9
    assert len(replayed.ledger.unacknowledged()) <= 2
    await proxy.restore()
    while meter.ledger.has_work:
        assert await meter.flush_once() is not FlushOutcome.FAILED
    assert list(tmp_path.glob("meter-*.json")) == []
    assert await stored_usage(pool, org.id) == {"stream": 7, "monitor": 2}
    # The copy the successor holds is the same batches: replaying it now adds nothing.
    while replayed.ledger.has_work:
        await replayed.flush_once()
    assert await stored_usage(pool, org.id) == {"stream": 7, "monitor": 2}

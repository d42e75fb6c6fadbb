from datetime import UTC, datetime

from authz_service.usage.alerts import thresholds_reached
from authz_service.usage.meter_store import read_spilled, spill
from authz_service.usage.refunds import NO_TERMS, Refund
from authz_service.usage.usage_ledger import Batch, Report, UsageLedger

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
KEY = ("org-1", PERIOD)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def ledger(clock=None, **options) -> UsageLedger:
    return UsageLedger(clock=clock or Clock(), **options)


def next_batch(book: UsageLedger) -> Batch:
    batch = book.next_batch()
    assert batch is not None, "the ledger has nothing pending"
    return batch


def test_used_is_unknown_until_the_database_is_asked():
    book = ledger()
    assert book.used(KEY) is None
    book.learn(KEY, 40, book.epoch(KEY))
    assert book.used(KEY) == 40


def test_counted_units_add_to_the_known_total_pooled_over_products():
    book = ledger()
    book.learn(KEY, 40, 0)
    assert book.record("r1", KEY, "stream", 1)
    assert book.record("r2", KEY, "monitor", 3)
    assert book.used(KEY) == 44
    assert book.pending_units == 4


def test_a_request_id_is_counted_once():
    book = ledger()
    book.learn(KEY, 0, 0)
    assert book.record("r1", KEY, "stream", 1)
    assert not book.record("r1", KEY, "stream", 1)
    assert book.used(KEY) == 1


def test_request_ids_are_forgotten_after_the_window():
    clock = Clock()
    book = ledger(clock, dedupe_seconds=10)
    book.record("r1", KEY, "stream", 1)
    clock.now += 11
    assert book.record("r1", KEY, "stream", 1)


def test_a_batch_holds_everything_pending_and_is_retried_unchanged_until_acknowledged():
    book = ledger()
    book.learn(KEY, 10, 0)
    book.record("r1", KEY, "stream", 2)
    book.report(Report("q1", "org-1", PERIOD, "monitor", 5))
    batch = next_batch(book)
    assert batch.counters == {("org-1", PERIOD, "stream", NO_TERMS): 2}
    assert [r.request_id for r in batch.reports] == ["q1"]
    book.record("r2", KEY, "stream", 1)
    assert book.next_batch() is batch  # a failed flush is retried with the same id and content
    assert book.used(KEY) == 18
    book.acknowledged(batch, {KEY: 17})  # the database total includes the batch (and 0 from elsewhere)
    assert book.used(KEY) == 18  # 17 stored + 1 pending
    second = next_batch(book)
    assert second is not batch and second.flush_id != batch.flush_id
    assert second.counters == {("org-1", PERIOD, "stream", NO_TERMS): 1}


def test_acknowledged_totals_include_other_replicas_usage():
    book = ledger()
    book.learn(KEY, 10, 0)
    book.record("r1", KEY, "stream", 1)
    book.acknowledged(next_batch(book), {KEY: 25})  # 14 came from another replica meanwhile
    assert book.used(KEY) == 25


def test_a_read_that_raced_a_flush_is_not_trusted():
    book = ledger()
    book.learn(KEY, 10, 0)
    book.record("r1", KEY, "stream", 1)
    epoch = book.epoch(KEY)
    batch = next_batch(book)
    book.learn(KEY, 11, epoch)  # read while the batch was in flight: may or may not include it
    assert book.used(KEY) == 11  # ignored: 10 known + 1 unflushed
    book.acknowledged(batch, {KEY: 11})
    book.learn(KEY, 10, epoch)  # a read that started before the flush was acknowledged
    assert book.used(KEY) == 11


def test_staleness_follows_the_last_database_answer():
    clock = Clock()
    book = ledger(clock, stale_after=2.0)
    book.learn(KEY, 0, 0)
    assert not book.is_stale(KEY)
    clock.now += 2.5
    assert book.is_stale(KEY)


def test_assumed_totals_are_used_but_stale_at_once():
    book = ledger()
    book.assume(KEY, 0)
    assert book.used(KEY) == 0
    assert book.is_stale(KEY)


def test_drain_and_restore_keep_every_unit_and_flush_id():
    book = ledger()
    book.learn(KEY, 0, 0)
    book.record("r1", KEY, "stream", 2)
    first = next_batch(book)
    book.record("r2", KEY, "monitor", 3)
    drained = book.drain()
    assert [b.units for b in drained] == [2, 3]
    assert drained[0].flush_id == first.flush_id
    assert not book.has_work
    fresh = ledger()
    fresh.restore(drained)
    assert next_batch(fresh).flush_id == first.flush_id
    assert fresh.pending_units == 5


def refund(request_id: str = "r1", units: int = 1) -> Refund:
    return Refund(request_id, "org-1", PERIOD, "stream", units, "status_5xx")


def test_a_refund_takes_units_back_in_the_same_batches():
    book = ledger()
    book.learn(KEY, 10, 0)
    book.record("r1", KEY, "stream", 2)
    assert book.refund(refund("r1", 2))
    assert book.used(KEY) == 10
    batch = next_batch(book)
    assert (batch.counters, batch.refunds, batch.units) == (
        {("org-1", PERIOD, "stream", NO_TERMS): 2},
        [refund("r1", 2)],
        0,
    )
    assert batch.by_usage_key() == {KEY: 0}


def test_a_request_is_refunded_once_per_replica():
    book = ledger()
    book.learn(KEY, 10, 0)
    assert book.refund(refund())
    assert not book.refund(refund())
    assert book.used(KEY) == 9


def test_a_refund_flushed_before_its_count_keeps_the_pending_units_below_zero():
    """The count of the call was made by another replica: this one holds only the refund."""
    book = ledger()
    book.learn(KEY, 10, 0)
    book.refund(refund("r1"))
    first = next_batch(book)
    book.refund(refund("r2"))
    book.acknowledged(first, {KEY: 9})
    assert book.used(KEY) == 8  # 9 stored, 1 refund still pending
    assert book.pending_units == -1
    assert book.has_work


def test_spilled_refunds_come_back_and_old_spill_files_without_refunds_still_read(tmp_path):
    book = ledger()
    book.learn(KEY, 0, 0)
    book.record("r1", KEY, "stream", 3)
    book.refund(refund("r1", 3))
    path = spill(book.drain(), tmp_path)
    ((_, batches),) = read_spilled(tmp_path, on_corrupt=lambda path, error: None)
    assert batches[0].refunds == [refund("r1", 3)]
    old = '[{"flush_id": "00000000-0000-0000-0000-000000000001", "counters": [], "reports": []}]'
    path.write_text(old)
    ((_, batches),) = read_spilled(tmp_path, on_corrupt=lambda path, error: None)
    assert batches[0].refunds == []


def test_thresholds():
    assert thresholds_reached(69, 100) == ()
    assert thresholds_reached(70, 100) == (70,)
    assert thresholds_reached(95, 100) == (70, 90)
    assert thresholds_reached(250, 100) == (70, 90, 100)
    assert thresholds_reached(7, 10) == (70,)
    assert thresholds_reached(5, 0) == ()


def test_sealing_puts_refunds_with_counters_and_reports_and_grows_only_a_batch_never_sent():
    ledger = UsageLedger(clock=lambda: 0.0)
    key = ("org", datetime(2026, 1, 1, tzinfo=UTC))
    ledger.record("r1", key, "stream", 2)
    ledger.refund(Refund("r0", "org", key[1], "stream", 1, "upstream_5xx"))
    ledger.seal()
    (sealed,) = ledger.unacknowledged()
    assert sealed.counters == {("org", key[1], "stream", NO_TERMS): 2} and [f.request_id for f in sealed.refunds] == [
        "r0"
    ]
    ledger.record("r2", key, "stream", 3)
    ledger.seal()  # never sent: it grows
    assert ledger.unacknowledged() == [sealed] and sealed.units == 4
    sealed.attempted = True
    ledger.record("r3", key, "monitor", 1)
    ledger.seal()  # sent once: it is retried as it is, the rest goes into a new batch
    assert len(ledger.unacknowledged()) == 2 and sealed.units == 4
    assert ledger.used(key) is None and ledger.pending_units == 5

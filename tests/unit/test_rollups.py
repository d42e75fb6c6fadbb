"""Usage-history buckets in memory: fed beside the counters, moved into the same batch at the same moment,
spilled and read back with them."""

import json
import uuid
from datetime import UTC, datetime

from google.protobuf import json_format, struct_pb2

from authz_service.usage.meter_store import read_spilled, spill
from authz_service.usage.refunds import NO_TERMS, BilledUsage, LoggedRequest, Refund, billed_from_metadata, refund_for
from authz_service.usage.rollups import REQUESTS, UNITS, RollupBook, denial_family, hour_of
from authz_service.usage.usage_ledger import UsageLedger

PERIOD = datetime(2026, 11, 1, tzinfo=UTC)
KEY = ("org-1", PERIOD)
KEY_ID = str(uuid.uuid4())
AT = PERIOD.timestamp() + 7200 + 59  # 02:00:59 on the first


def test_buckets_are_per_hour_product_and_key():
    book = RollupBook()
    book.served("org-1", PERIOD, AT, "stream", KEY_ID, 2)
    book.served("org-1", PERIOD, AT + 1, "stream", KEY_ID, 1)
    book.served("org-1", PERIOD, AT + 3600, "stream", KEY_ID, 1)
    book.denied("org-1", PERIOD, AT, "stream", KEY_ID, "rate_limited")
    taken = book.take()
    assert not book
    first = taken[("org-1", PERIOD, hour_of(AT), "stream", KEY_ID)]
    assert (first[UNITS], first[REQUESTS], first[2:]) == (3, 2, [0, 0, 0, 1, 0])
    assert taken[("org-1", PERIOD, hour_of(AT) + 3600, "stream", KEY_ID)][:2] == [1, 1]
    assert hour_of(AT) == PERIOD.timestamp() + 7200


def test_denial_families():
    assert [denial_family(c) for c in ("revoked_api_key", "payment_required", "quota_exceeded", "spend_cap_reached",
                                       "rate_limited", "auth_unavailable", "ip_not_allowed")] == [
        "access", "payment", "quota", "quota", "rate", "unavailable", "access"]  # fmt: skip


def test_a_batch_takes_the_buckets_with_the_counters_and_a_sealed_batch_keeps_growing_with_both():
    ledger = UsageLedger()
    ledger.record("r1", KEY, "stream", 1)
    ledger.rollups.served(*KEY, AT, "stream", KEY_ID, 1)
    ledger.seal()
    ledger.record("r2", KEY, "stream", 1)
    ledger.rollups.served(*KEY, AT, "stream", KEY_ID, 1)
    ledger.seal()  # not sent yet: the same batch grows
    (batch,) = ledger.unacknowledged()
    assert batch.counters == {("org-1", PERIOD, "stream", NO_TERMS): 2}
    assert sum(c[UNITS] for c in batch.rollup.values()) == 2
    batch.attempted = True
    ledger.record("r3", KEY, "stream", 1)
    ledger.rollups.served(*KEY, AT, "stream", KEY_ID, 1)
    assert ledger.next_batch() is batch  # retried unchanged: the new unit and its bucket wait together
    assert sum(c[UNITS] for c in batch.rollup.values()) == 2
    drained = ledger.drain()
    assert [sum(c[UNITS] for c in b.rollup.values()) for b in drained] == [2, 1]


def test_denials_alone_make_work_for_the_flush():
    ledger = UsageLedger()
    before = ledger.has_work
    ledger.rollups.denied(*KEY, AT, "stream", KEY_ID, "revoked_api_key")
    assert (before, ledger.has_work) == (False, True)
    batch = ledger.next_batch()
    assert batch is not None and batch.units == 0 and batch.rollup


def test_spill_files_keep_the_buckets_and_the_refunds_key_and_hour(tmp_path):
    ledger = UsageLedger()
    ledger.record("r1", KEY, "stream", 3)
    ledger.rollups.served(*KEY, AT, "stream", KEY_ID, 3)
    ledger.refund(Refund("r0", *KEY, "stream", 1, "status_5xx", key_id=KEY_ID, hour=hour_of(AT)))
    ledger.seal()
    batches = ledger.unacknowledged()
    path = spill(batches, tmp_path)
    # A refund keeps the shape the previous version reads (six fields and its terms; a version that cannot read
    # a file sets it aside): its bucket goes beside it.
    assert [len(refund) for refund in json.loads(path.read_text())[0]["refunds"]] == [9]
    ((_path, restored),) = read_spilled(tmp_path, on_corrupt=lambda path, error: None)
    assert restored[0].rollup == batches[0].rollup
    assert restored[0].refunds == batches[0].refunds


def test_a_billed_call_carries_its_key_and_hour_to_its_refund():
    billed = BilledUsage("org-1", PERIOD, "stream", 2, key_id=KEY_ID, hour=hour_of(AT))
    struct = struct_pb2.Struct()
    struct.update(billed.as_metadata())
    moved = billed_from_metadata(json_format.MessageToDict(struct))
    assert moved == billed
    refund = refund_for(LoggedRequest("rid", 503, frozenset(), moved))
    assert refund is not None and (refund.key_id, refund.hour) == (KEY_ID, hour_of(AT))
    # A key or hour that is not one is dropped, and the refund still happens.
    odd = billed.as_metadata()
    odd["driftlock_billed"] |= {"key_id": "k", "hour": 12.5}
    assert billed_from_metadata(odd) == BilledUsage("org-1", PERIOD, "stream", 2)

"""What is reported to Stripe and when (billing_webhooks/usage_export/exports.py): rows, timestamps, periods that
close, what each answer from Stripe means, and reconciliation after Stripe's 24 h identifier window."""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from billing_webhooks.usage_export.exports import (
    MAX_RETRY_DELAY,
    AttemptResult,
    ExportRules,
    ExportState,
    Marks,
    PeriodUsage,
    Reconciled,
    StripeAnswer,
    classify,
    event_timestamp,
    identifier,
    needs_reconciliation,
    plan_export,
    reconcile,
    resolve_period,
    retry_delay,
    settle_marks,
    summary_window,
    terms_in_force,
)
from driftlock_kernel.periods import Period

ORG = uuid.UUID("6f0c0000-0000-4000-8000-000000000001")
MONTH = Period(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
# A Stripe subscription's period: anchored at the second the subscription started.
ANCHORED = Period(datetime(2026, 11, 3, 14, 7, 42, tzinfo=UTC), datetime(2026, 12, 3, 14, 7, 42, tzinfo=UTC))
RULES = ExportRules(
    settle=timedelta(minutes=3),
    finalization_grace=timedelta(hours=1),
    failed_retry_after=timedelta(hours=1),
)


def usage(period: Period = MONTH, **fields: Any) -> PeriodUsage:
    """A period whose counted units have all settled, unless `settled_units` says otherwise."""
    defaults: dict[str, Any] = {
        "org_id": ORG,
        "period": period,
        "stored_units": 0,
        "meter": "api_calls",
        "customer": "cus_1",
    }
    merged = defaults | fields
    merged.setdefault("settled_units", merged["stored_units"])
    return PeriodUsage(**merged)


def at(day: int, hour: int = 12, minute: int = 0, second: int = 0, month: int = 11) -> datetime:
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


# --- identifiers and timestamps ----------------------------------------------------------------------------------


def test_an_identifier_is_the_same_for_a_row_and_different_for_every_other():
    first = identifier(ORG, MONTH, 1)
    assert first == identifier(ORG, MONTH, 1)
    others = {identifier(ORG, MONTH, 2), identifier(ORG, ANCHORED, 1), identifier(uuid.uuid4(), MONTH, 1)}
    assert first not in others and len(others) == 3
    assert len(identifier(ORG, MONTH, 10**9)) <= 100


def test_an_open_periods_events_carry_the_time_they_were_decided():
    assert event_timestamp(MONTH, at(15, 9, 30, 12)) == at(15, 9, 30, 12)
    assert event_timestamp(MONTH, at(15, 9, 30, 12).replace(microsecond=999)) == at(15, 9, 30, 12)


def test_a_closed_periods_events_carry_its_last_second():
    assert event_timestamp(MONTH, at(2, month=12)) == datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)


def test_events_stay_inside_the_whole_minutes_of_an_anchored_period():
    window = summary_window(ANCHORED)
    assert window == (datetime(2026, 11, 3, 14, 8, tzinfo=UTC), datetime(2026, 12, 3, 14, 7, tzinfo=UTC))
    # Early in the first minute: a few seconds ahead (Stripe allows five minutes).
    early = event_timestamp(ANCHORED, datetime(2026, 11, 3, 14, 7, 50, tzinfo=UTC))
    assert early == window[0] and early - datetime(2026, 11, 3, 14, 7, 50, tzinfo=UTC) < timedelta(minutes=5)
    # After the end: before the partial last minute, still inside the period.
    assert event_timestamp(ANCHORED, at(5, month=12)) == window[1] - timedelta(seconds=1)


def test_a_period_without_a_whole_minute_keeps_its_events_inside_it():
    short = Period(datetime(2026, 11, 3, 14, 7, 10, tzinfo=UTC), datetime(2026, 11, 3, 14, 7, 50, tzinfo=UTC))
    assert summary_window(short) is None
    assert event_timestamp(short, at(4)) == datetime(2026, 11, 3, 14, 7, 49, tzinfo=UTC)
    assert event_timestamp(short, datetime(2026, 11, 3, 14, 7, 20, tzinfo=UTC)) == datetime(
        2026, 11, 3, 14, 7, 20, tzinfo=UTC
    )


# --- which period, which meter --------------------------------------------------------------------------------------


def test_a_period_ends_where_stripe_said_else_where_the_stored_period_rolls_else_with_the_month():
    assert resolve_period(ANCHORED.start, ANCHORED.end, None, None) == ANCHORED
    rolled = resolve_period(ANCHORED.end, None, ANCHORED.start, ANCHORED.end)
    assert rolled == Period(ANCHORED.end, ANCHORED.end + (ANCHORED.end - ANCHORED.start))
    assert resolve_period(MONTH.start, None, None, None) == MONTH
    assert resolve_period(datetime(2026, 11, 7, 3, tzinfo=UTC), None, None, None) is None


def test_terms_are_in_force_while_the_organisation_still_reports_to_their_meter_and_customer():
    assert terms_in_force("api_calls", "cus_1", meter_now="api_calls", customer_now="cus_1")
    assert not terms_in_force("api_calls", "cus_1", meter_now=None, customer_now="cus_1")  # downgraded, canceled
    assert not terms_in_force("api_calls", "cus_1", meter_now="pro_calls", customer_now="cus_1")  # another meter
    assert not terms_in_force("api_calls", "cus_1", meter_now="api_calls", customer_now="cus_2")  # relinked


def test_terms_a_plan_change_ended_are_reported_in_full_once_settled_timestamped_when_last_used():
    # 300 units counted until 10:00 under a metered plan, none settled yet by the open period's marks; then a
    # downgrade (or a cancellation): the counters stop growing and all they hold is owed.
    closed = usage(stored_units=300, settled_units=None, in_force=False, last_counted_at=at(15, 10))
    assert plan_export(closed, at(15, 10, 2), RULES) is None  # the refunds of the last calls may still come
    row = plan_export(closed, at(15, 10, 3), RULES)
    assert row is not None and (row.units, row.state) == (300, ExportState.PENDING)
    assert row.timestamp == at(15, 10)  # inside the period, when the old terms were last used
    # The same counters while their terms are in force wait for the settled mark.
    assert plan_export(usage(stored_units=300, settled_units=None), at(15, 10, 3), RULES) is None


# --- what to report -------------------------------------------------------------------------------------------------


def test_everything_counted_and_not_covered_is_reported_included_units_too():
    row = plan_export(usage(stored_units=12, sent_units=5, skipped_units=2, next_seq=3), at(15), RULES)
    assert row is not None
    assert (row.units, row.seq, row.identifier, row.state) == (5, 3, identifier(ORG, MONTH, 3), ExportState.PENDING)
    assert (row.event_name, row.customer, row.timestamp) == ("api_calls", "cus_1", at(15))


def test_nothing_is_reported_without_a_meter_or_a_customer_or_while_a_row_is_in_flight():
    assert plan_export(usage(stored_units=5, meter=None), at(15), RULES) is None
    assert plan_export(usage(stored_units=5, customer=None), at(15), RULES) is None
    assert plan_export(usage(stored_units=9, pending_units=5), at(15), RULES) is None


def test_a_refund_after_its_unit_was_sent_is_never_reported_negative_and_shrinks_the_next_row():
    refunded = usage(stored_units=7, sent_units=10, next_seq=2)
    assert refunded.lag == 0
    assert plan_export(refunded, at(15), RULES) is None
    later = plan_export(usage(stored_units=12, sent_units=10, next_seq=2), at(16), RULES)
    assert later is not None and later.units == 2


def test_a_closed_periods_final_report_waits_for_late_refunds_then_goes_at_its_last_second():
    closed = usage(stored_units=40, sent_units=30, next_seq=4)
    assert plan_export(closed, MONTH.end + timedelta(minutes=2), RULES) is None
    final = plan_export(closed, MONTH.end + timedelta(minutes=3), RULES)
    assert final is not None
    assert (final.units, final.state, final.timestamp) == (10, ExportState.PENDING, MONTH.end - timedelta(seconds=1))


def test_units_counted_after_stripe_finalised_the_invoice_are_skipped_visibly():
    late = plan_export(usage(stored_units=40, sent_units=30), MONTH.end + timedelta(hours=1), RULES)
    assert late is not None
    assert (late.state, late.units) == (ExportState.SKIPPED, 10)
    assert "finalised" in (late.error or "")


def test_units_older_than_stripes_35_days_are_skipped():
    row = plan_export(
        usage(stored_units=3), MONTH.end + timedelta(days=36), ExportRules(finalization_grace=timedelta(days=60))
    )
    assert row is not None and row.state is ExportState.SKIPPED


def test_units_of_a_failed_row_are_reported_again_once_the_wait_is_over():
    failed = usage(stored_units=8, sent_units=2, next_seq=3, last_failed_at=at(15, 12))
    assert plan_export(failed, at(15, 12, 30), RULES) is None
    again = plan_export(failed, at(15, 13, 1), RULES)
    assert again is not None and (again.units, again.seq) == (6, 3)
    assert plan_export(failed, at(15, 12, 30), ExportRules(failed_retry_after=timedelta(0))) is not None


# --- refunds before export ------------------------------------------------------------------------------------


def test_counted_units_wait_for_their_refunds_before_they_are_reported():
    settle = timedelta(minutes=3)
    start = at(15, 12)
    marks, reportable = settle_marks(Marks(), 10, start, "s1", settle)
    assert (marks, reportable) == (Marks(start, 10, "s1"), None)  # nothing has waited yet
    marks, reportable = settle_marks(marks, 14, start + timedelta(minutes=2), "s2", settle)
    assert (marks, reportable) == (Marks(start, 10, "s1"), None)
    # The first candidate has waited: it settles, less the refund its snapshot did not see (a call timed out).
    later = start + timedelta(minutes=3)
    marks, reportable = settle_marks(marks, 16, later, "s3", settle, refunds_since_candidate=1)
    assert (marks, reportable) == (Marks(later, 16, "s3", start, 10, "s1"), 9)
    # Refunds keep coming off the settled total until the next candidate settles.
    marks, reportable = settle_marks(marks, 15, later + timedelta(minutes=1), "s4", settle, refunds_since_settled=2)
    assert (marks, reportable) == (Marks(later, 16, "s3", start, 10, "s1"), 8)


def test_an_open_period_reports_only_what_has_settled():
    assert plan_export(usage(stored_units=10, settled_units=None), at(15), RULES) is None
    row = plan_export(usage(stored_units=10, settled_units=6, sent_units=2), at(15), RULES)
    assert row is not None and row.units == 4
    # Never more than the counters hold now.
    row = plan_export(usage(stored_units=5, settled_units=9), at(15), RULES)
    assert row is not None and row.units == 5


def test_a_closed_period_reports_everything_once_settled_whatever_its_marks():
    row = plan_export(usage(stored_units=10, settled_units=None, sent_units=4), MONTH.end + timedelta(minutes=3), RULES)
    assert row is not None and row.units == 6


# --- answers --------------------------------------------------------------------------------------------------


def test_an_accepted_event_is_sent():
    assert classify(StripeAnswer(200, "req_1"), 1).result is AttemptResult.ACCEPTED


def test_an_identifier_stripe_has_already_is_sent_not_failed():
    answer = StripeAnswer(400, None, "invalid_request_error", None, "An event already exists with identifier dl_x_1_1.")
    assert classify(answer, 3).result is AttemptResult.DUPLICATE


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (StripeAnswer(None, message="no answer from Stripe: timed out"), "no_answer"),
        (StripeAnswer(500, error_type="api_error", message="boom"), "server_error"),
        (StripeAnswer(503), "server_error"),
        (StripeAnswer(409, error_type="idempotency_error", message="in use"), "in_progress"),
        (StripeAnswer(400, message="lock", should_retry=True), "server_error"),
    ],
)
def test_an_answer_that_may_not_have_executed_is_retried_with_the_same_identifier(answer, reason):
    verdict = classify(answer, 1)
    assert (verdict.result, verdict.reason, verdict.stop_sending) == (AttemptResult.RETRY, reason, False)
    assert verdict.retry_in is not None and verdict.retry_in >= timedelta(seconds=1)


def test_a_rate_limit_stops_sending_and_waits_at_least_retry_after():
    verdict = classify(StripeAnswer(429, code="rate_limit", message="Too many", retry_after=7), 1)
    assert (verdict.result, verdict.reason, verdict.stop_sending) == (AttemptResult.RETRY, "rate_limited", True)
    assert verdict.retry_in == timedelta(seconds=7)
    # One customer's call in progress is that customer's wait only.
    assert not classify(StripeAnswer(429, code="lock_timeout"), 1).stop_sending


def test_a_key_stripe_refuses_is_retried_after_the_operator_fixes_it():
    verdict = classify(StripeAnswer(401, error_type="invalid_request_error", message="Invalid API Key"), 1)
    assert (verdict.result, verdict.reason, verdict.stop_sending) == (AttemptResult.RETRY, "unauthorized", True)


def test_a_refusal_a_retry_cannot_fix_is_recorded_with_stripes_message():
    answer = StripeAnswer(400, "req_9", "invalid_request_error", None, 'No active meter found for event name "x".')
    verdict = classify(answer, 1)
    assert verdict.result is AttemptResult.REJECTED
    assert verdict.error == '400 invalid_request_error: No active meter found for event name "x".'


def test_retries_back_off_exponentially_up_to_a_bound():
    delays = [retry_delay(attempt) for attempt in range(1, 20)]
    assert delays[:4] == [timedelta(seconds=s) for s in (1, 2, 4, 8)]
    assert max(delays) == MAX_RETRY_DELAY
    assert delays == sorted(delays)
    assert timedelta(seconds=1) < retry_delay(1, jitter=0.9) < timedelta(seconds=1.5)


# --- after Stripe's 24 hours ------------------------------------------------------------------------------------


def test_a_row_first_tried_23_hours_ago_is_reconciled_not_resent():
    now = at(15)
    assert not needs_reconciliation(None, now)
    assert not needs_reconciliation(now - timedelta(hours=22, minutes=59), now)
    assert needs_reconciliation(now - timedelta(hours=23), now)


@pytest.mark.parametrize(
    ("stripe_total", "expected"),
    [(15, Reconciled.CONFIRMED), (10, Reconciled.ABSENT), (12, Reconciled.AMBIGUOUS), (30, Reconciled.AMBIGUOUS)],
)
def test_reconciliation_compares_stripes_total_with_what_rows_marked_sent_cover(stripe_total, expected):
    assert reconcile(row_units=5, stripe_total=stripe_total, sent_units=10) is expected

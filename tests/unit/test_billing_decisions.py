"""decisions.py: ordering of Stripe events, what a payment does to a status, which subscription an organisation
follows, and what changes on the organisation. Plain values in, plain values out."""

import dataclasses
import itertools
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from billing_webhooks.inbox.decisions import (
    OrgBilling,
    Position,
    SubscriptionState,
    apply_payment,
    apply_snapshot,
    choose_current,
    is_newer,
    org_changes,
    pick_plan,
    position,
    status_after_payment,
)
from billing_webhooks.inbox.events import InvoicePayment, SubscriptionSnapshot
from driftlock_kernel.billing import SubscriptionStatus

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SUB = "sub_A"
CUS = "cus_A"


def t(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


def snap(
    event_id: str,
    at: int,
    status: str = "active",
    *,
    prices: Iterable[str] = ("price_pro",),
    ended: bool = False,
    period: tuple[int, int] | None = (0, 30 * 86400),
    sub: str = SUB,
    trial_end: int | None = None,
    cancel_at_period_end: bool = False,
) -> SubscriptionSnapshot:
    return SubscriptionSnapshot(
        event_id=event_id,
        created=t(at),
        subscription_id=sub,
        customer_id=CUS,
        status=SubscriptionStatus(status),
        price_ids=tuple(prices),
        period_start=t(period[0]) if period else None,
        period_end=t(period[1]) if period else None,
        metadata_org_id=None,
        ended=ended,
        trial_end=t(trial_end) if trial_end is not None else None,
        cancel_at_period_end=cancel_at_period_end,
    )


def pay(event_id: str, at: int, succeeded: bool, sub: str = SUB) -> InvoicePayment:
    return InvoicePayment(
        event_id=event_id,
        created=t(at),
        invoice_id="in_" + event_id,
        customer_id=CUS,
        subscription_id=sub,
        succeeded=succeeded,
        metadata_org_id=None,
    )


Event = SubscriptionSnapshot | InvoicePayment


def run(events: Iterable[Event], state: SubscriptionState | None = None) -> SubscriptionState:
    for event in events:
        if isinstance(event, SubscriptionSnapshot):
            state = apply_snapshot(state, event).state
        else:
            state = apply_payment(state, event).state
    assert state is not None, "run() needs at least one event"
    return state


def current_id(subscriptions: Iterable[SubscriptionState]) -> str | None:
    chosen = choose_current(subscriptions)
    return chosen.id if chosen else None


# --- positions -------------------------------------------------------------------------------------------------


def test_positions_order_by_time_then_status_rank_then_event_id():
    S = SubscriptionStatus
    assert position(t(1), S.INCOMPLETE, "evt_z") > position(t(0), S.CANCELED, "evt_z")
    assert position(t(0), S.ACTIVE, "evt_a") > position(t(0), S.INCOMPLETE, "evt_z")
    assert position(t(0), S.CANCELED, "evt_a") > position(t(0), S.UNPAID, "evt_z")
    assert position(t(0), S.ACTIVE, "evt_b") > position(t(0), S.ACTIVE, "evt_a")


def test_is_newer_against_nothing_applied_yet_and_against_itself():
    p = Position(t(0), 2, "evt_1")
    assert is_newer(p, None)
    assert not is_newer(p, p)


# --- subscription snapshots ------------------------------------------------------------------------------------


def test_handle_subscription_updated_older_event_is_skipped():
    state = run([snap("evt_2", 20, "past_due")])
    result = apply_snapshot(state, snap("evt_1", 10, "active"))
    assert result.stale and not result.changed
    assert dataclasses.replace(result.state, history=state.history) == state
    assert len(result.state.history) == 2  # kept: an even earlier event may still arrive


def test_newer_snapshot_replaces_prices_period_and_status():
    state = run([snap("evt_1", 10, "trialing", prices=("price_basic",))])
    result = apply_snapshot(state, snap("evt_2", 20, "active", prices=("price_pro",), period=(100, 200)))
    assert result.snapshot and result.status
    assert result.state.status == "active"
    assert result.state.price_ids == ("price_pro",)
    assert (result.state.period_start, result.state.period_end) == (t(100), t(200))


def test_same_second_created_then_updated_ends_active_in_either_order():
    created = snap("evt_zzz", 10, "incomplete")  # the larger id: the rank, not the id, decides
    updated = snap("evt_aaa", 10, "active")
    assert run([created, updated]).status == "active"
    assert run([updated, created]).status == "active"


def test_same_second_update_does_not_undo_a_deletion():
    deleted = snap("evt_a", 10, "canceled", ended=True)
    updated = snap("evt_z", 10, "active")
    for order in ([deleted, updated], [updated, deleted]):
        state = run(order)
        assert state.status == "canceled" and state.ended


def test_same_second_same_status_is_decided_by_event_id_either_way():
    a = snap("evt_a", 10, "active", prices=("price_a",))
    b = snap("evt_b", 10, "active", prices=("price_b",))
    assert run([a, b]).price_ids == run([b, a]).price_ids == ("price_b",)


def test_late_snapshot_brings_its_prices_but_not_its_older_status():
    state = run([snap("evt_1", 10, "active", prices=("price_basic",)), pay("evt_3", 30, succeeded=False)])
    result = apply_snapshot(state, snap("evt_2", 20, "active", prices=("price_pro",)))
    assert result.snapshot and not result.status
    assert result.state.price_ids == ("price_pro",)
    assert result.state.status == "past_due"


def test_snapshot_without_a_period_keeps_the_known_one():
    state = run([snap("evt_1", 10, period=(100, 200))])
    assert run([snap("evt_2", 20, period=None)], state).period_start == t(100)


def test_past_due_snapshot_starts_dunning_at_its_time_and_keeps_it():
    state = run([snap("evt_1", 10, "active"), snap("evt_2", 20, "past_due"), snap("evt_3", 30, "unpaid")])
    assert state.status == "unpaid" and state.past_due_since == t(20)
    assert run([snap("evt_4", 40, "active")], state).past_due_since is None


def test_any_delivery_order_of_the_same_events_ends_in_the_same_state():
    story: list[Event] = [
        snap("evt_created", 0, "incomplete"),
        pay("evt_paid_1", 0, succeeded=True),
        snap("evt_active", 0, "active"),
        pay("evt_failed", 100, succeeded=False),
        snap("evt_past_due", 100, "past_due"),
        pay("evt_paid_2", 200, succeeded=True),
        snap("evt_recovered", 200, "active", prices=("price_pro_plus",), period=(150, 250)),
    ]
    finals = {run(order) for order in itertools.permutations(story)}
    assert len(finals) == 1
    (final,) = finals
    assert final.status == "active" and final.past_due_since is None
    assert final.price_ids == ("price_pro_plus",)


# --- invoice payments ------------------------------------------------------------------------------------------


def test_failed_payment_opens_dunning_at_the_event_time():
    state = run([snap("evt_1", 10, "active"), pay("evt_2", 20, succeeded=False)])
    assert state.status == "past_due" and state.past_due_since == t(20)


def test_a_second_failure_keeps_the_first_failure_time():
    state = run([pay("evt_1", 20, succeeded=False), pay("evt_2", 30, succeeded=False)])
    assert state.past_due_since == t(20)


def test_old_payment_failed_does_not_reopen_dunning_after_a_newer_success():
    state = run([pay("evt_failed_1", 10, succeeded=False), pay("evt_paid", 30, succeeded=True)])
    result = apply_payment(state, pay("evt_failed_late", 20, succeeded=False))
    assert result.stale and not result.changed
    assert result.state.status == "active" and result.state.past_due_since is None


def test_payment_success_lifts_dunning():
    state = run([pay("evt_1", 10, succeeded=False), pay("evt_2", 20, succeeded=True)])
    assert state.status == "active" and state.past_due_since is None


def test_payments_do_not_touch_an_ended_subscription():
    state = run([snap("evt_1", 10, "canceled", ended=True)])
    for succeeded in (True, False):
        result = apply_payment(state, pay(f"evt_{succeeded}", 20, succeeded=succeeded))
        assert not result.changed and not result.stale
        assert result.state.status == "canceled"


@pytest.mark.parametrize(
    ("status", "succeeded", "after"),
    [
        (None, True, "active"),
        (None, False, "past_due"),
        ("incomplete", True, "active"),
        ("incomplete", False, None),
        ("trialing", True, "trialing"),
        ("trialing", False, "past_due"),
        ("active", False, "past_due"),
        ("past_due", True, "active"),
        ("unpaid", True, "active"),
        ("unpaid", False, "unpaid"),
        ("paused", True, None),
        ("canceled", True, None),
        ("incomplete_expired", False, None),
    ],
)
def test_status_after_payment(status, succeeded, after):
    assert status_after_payment(status, succeeded) == after


# --- which subscription an organisation follows ---------------------------------------------------------------


def test_an_organisation_follows_its_new_subscription_after_a_cancellation_in_any_order():
    old = run([snap("evt_1", 10, "active", sub="sub_old"), snap("evt_3", 30, "canceled", ended=True, sub="sub_old")])
    new = run([snap("evt_2", 20, "active", sub="sub_new")])
    assert current_id([old, new]) == "sub_new"
    assert current_id([new, old]) == "sub_new"


def test_a_subscription_known_only_by_id_beats_an_ended_one_but_not_a_live_one():
    stub = SubscriptionState(id="sub_stub", customer_id=CUS)
    ended = run([snap("evt_1", 10, "canceled", ended=True, sub="sub_ended")])
    live = run([snap("evt_2", 10, "active", sub="sub_live")])
    assert current_id([ended, stub]) == "sub_stub"
    assert current_id([stub, live]) == "sub_live"
    assert current_id([ended]) == "sub_ended"
    assert choose_current([]) is None


def test_pick_plan_takes_the_first_mapped_price():
    assert pick_plan(["price_addon", "price_pro"], {"price_pro": "pro", "price_team": "team"}) == "pro"
    assert pick_plan(["price_unknown"], {"price_pro": "pro"}) is None


# --- what changes on the organisation --------------------------------------------------------------------------


def org(**overrides: Any) -> OrgBilling:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "plan_name": "free",
        "billing_status": "none",
        "past_due_since": None,
        "stripe_customer_id": None,
        "stripe_subscription_id": None,
        "period_start": None,
        "period_end": None,
    }
    return OrgBilling(**(values | overrides))


def test_org_takes_status_plan_period_and_links():
    sub = run([snap("evt_1", 10, "active", period=(100, 200))])
    assert org_changes(org(), sub, "pro") == {
        "stripe_subscription_id": SUB,
        "stripe_customer_id": CUS,
        "billing_status": "active",
        "plan_name": "pro",
        "period_start": t(100),
        "period_end": t(200),
    }


def test_org_takes_trial_end_and_cancel_at_period_end_from_the_snapshot():
    sub = run([snap("evt_1", 10, "trialing", trial_end=500, cancel_at_period_end=True)])
    changes = org_changes(org(), sub, "pro")
    assert changes["trial_end"] == t(500) and changes["cancel_at_period_end"] is True
    ended = run([snap("evt_2", 20, "canceled", ended=True, trial_end=500, cancel_at_period_end=True)], sub)
    changes = org_changes(org(trial_end=t(500), cancel_at_period_end=True), ended, "pro")
    assert changes["trial_end"] is None and changes["cancel_at_period_end"] is False


def test_org_keeps_its_plan_when_no_price_is_mapped_and_its_customer_when_it_has_one():
    sub = run([snap("evt_1", 10, "past_due")])
    changes = org_changes(org(plan_name="team", stripe_customer_id="cus_other"), sub, None)
    assert "plan_name" not in changes and "stripe_customer_id" not in changes
    assert changes["billing_status"] == "past_due" and changes["past_due_since"] == t(10)


def test_ended_subscription_puts_the_org_on_free_and_the_calendar_month():
    sub = run([snap("evt_1", 10, "canceled", ended=True)])
    changes = org_changes(org(plan_name="pro", period_start=t(0), period_end=t(100)), sub, "pro")
    assert changes["plan_name"] == "free"
    assert changes["period_start"] is None and changes["period_end"] is None
    assert changes["billing_status"] == "canceled"


def test_nothing_changes_when_the_org_already_matches():
    sub = run([snap("evt_1", 10, "active", period=(100, 200))])
    matching = org(
        plan_name="pro",
        billing_status="active",
        stripe_customer_id=CUS,
        stripe_subscription_id=SUB,
        period_start=t(100),
        period_end=t(200),
    )
    assert org_changes(matching, sub, "pro") == {}
    assert org_changes(matching, None, None) == {}


def test_a_subscription_known_only_by_id_links_but_does_not_touch_billing():
    assert org_changes(org(), SubscriptionState(id=SUB, customer_id=CUS), None) == {
        "stripe_subscription_id": SUB,
        "stripe_customer_id": CUS,
    }


def test_the_overdue_episode_starts_at_its_earliest_failure_in_every_delivery_order():
    """Failures 9, 6 and 4 days ago and the past_due update of the first: latest-first used to start the
    episode 4 days ago (inside a 7-day grace, so served) instead of 9 (past it: payment_required)."""
    day = 86400
    story: list[Event] = [
        snap("evt_created", -30 * day, "active"),
        pay("evt_failed_9", -9 * day, succeeded=False),
        snap("evt_past_due", -9 * day + 1, "past_due"),
        pay("evt_failed_6", -6 * day, succeeded=False),
        pay("evt_failed_4", -4 * day, succeeded=False),
    ]
    starts = {run(order).past_due_since for order in itertools.permutations(story)}
    assert starts == {t(-9 * day)}


def test_a_late_failure_before_a_recovery_belongs_to_the_earlier_episode():
    story = [pay("evt_f1", 10, False), pay("evt_ok", 20, True), pay("evt_f2", 30, False), pay("evt_f0", 5, False)]
    for order in itertools.permutations(story):
        state = run(order)
        assert (state.status, state.past_due_since) == ("past_due", t(30))


def test_a_trial_stays_a_trial_after_a_payment_in_any_order():
    story: list[Event] = [snap("evt_trial", 10, "trialing"), pay("evt_paid", 20, succeeded=True)]
    assert {run(order).status for order in itertools.permutations(story)} == {"trialing"}

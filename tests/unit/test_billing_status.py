"""BillingStatus: an organisation's status, which is its subscription's or "none", as one type."""

import uuid
from datetime import UTC, datetime

import pytest

from billing_webhooks.inbox.decisions import OrgBilling
from driftlock_kernel import db
from driftlock_kernel.billing import (
    BILLING_STATUSES,
    BillingPolicy,
    BillingStatus,
    SubscriptionStatus,
    effective_plan,
    payment_blocks_billable,
)
from driftlock_kernel.orgs import Organization


def test_billing_status_is_every_subscription_status_and_none():
    assert {(s.name, s.value) for s in BillingStatus} == {("NONE", "none")} | {
        (s.name, s.value) for s in SubscriptionStatus
    }
    assert frozenset(BillingStatus) == BILLING_STATUSES


@pytest.mark.parametrize("status", [None, *SubscriptionStatus])
def test_of_a_subscription_status_is_the_same_status_and_of_none_is_none(status):
    billing = BillingStatus.of(status)
    assert isinstance(billing, BillingStatus)
    assert billing == (status if status is not None else "none")


def test_rows_of_organisations_read_their_status_as_a_billing_status():
    columns = {
        "id": uuid.uuid4(),
        "plan_name": "pro",
        "billing_status": "none",
        "past_due_since": None,
        "stripe_customer_id": None,
        "stripe_subscription_id": None,
        "period_start": None,
        "period_end": None,
    }
    assert db.from_row(OrgBilling, columns).billing_status is BillingStatus.NONE
    organization = db.from_row(
        Organization, {**columns, "billing_status": "past_due", "name": "o", "suspended_at": None, "created_at": None}
    )
    assert organization.billing_status is BillingStatus.PAST_DUE


def test_no_subscription_keeps_the_organisations_plan_and_never_blocks():
    policy = BillingPolicy(grace_seconds=0)
    now = datetime.now(UTC).timestamp()
    assert effective_plan("pro", BillingStatus.NONE, policy) == "pro"
    assert effective_plan("pro", BillingStatus.CANCELED, policy) == policy.fallback_plan
    assert not payment_blocks_billable(BillingStatus.NONE, now - 1, now, policy)
    assert payment_blocks_billable(BillingStatus.UNPAID, now - 1, now, policy)

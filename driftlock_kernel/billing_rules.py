"""Billing rules shared by authz, the usage API and the CLI: which plan applies, and when a payment is overdue.

Pure functions over plain values. The grace period comes from DRIFTLOCK_DUNNING_GRACE_DAYS and whether an
overdue organisation is blocked from DRIFTLOCK_DUNNING_POLICY (see Settings).
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    """What a billing status means for service. `DRIFTLOCK_DUNNING_GRACE_DAYS` sets the grace period."""

    grace_seconds: float = 7 * 86400
    # False: an overdue organisation keeps full service (dunning is then only Stripe's e-mails).
    block_billable_when_overdue: bool = True
    overdue_statuses: frozenset[str] = frozenset({"past_due", "unpaid"})
    # These mean no paid subscription is in force: the organisation is served as on the fallback plan.
    fallback_statuses: frozenset[str] = frozenset({"canceled", "incomplete", "incomplete_expired", "paused"})
    fallback_plan: str = "free"


DEFAULT_POLICY = BillingPolicy()


def effective_plan(plan: str, billing_status: str, policy: BillingPolicy = DEFAULT_POLICY) -> str:
    """The plan that applies: the organisation's, unless no paid subscription is in force."""
    return policy.fallback_plan if billing_status in policy.fallback_statuses else plan


def payment_overdue(
    billing_status: str, past_due_since: float | None, now: float, policy: BillingPolicy = DEFAULT_POLICY
) -> bool:
    """Past the grace period of a failed payment. An overdue status without a start time is still in grace."""
    if billing_status not in policy.overdue_statuses or past_due_since is None:
        return False
    return now >= past_due_since + policy.grace_seconds

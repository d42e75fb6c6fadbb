"""The billing vocabulary both services speak: subscription statuses and what each means for service, overage
modes, the free plan, and the rules that follow (which plan applies, when a payment is overdue).

Pure: plain values in, plain values out. The statuses are Stripe's; `organizations.billing_status` and
`stripe_subscriptions.status` accept exactly these (a test ties the schema's CHECK constraints to this enum).
The grace period comes from DRIFTLOCK_DUNNING_GRACE_DAYS, whether an overdue organisation is blocked from
DRIFTLOCK_DUNNING_POLICY and the fallback plan from DRIFTLOCK_FALLBACK_PLAN (see Settings).
"""

from dataclasses import dataclass
from enum import StrEnum


class SubscriptionStatus(StrEnum):
    """A Stripe subscription's status."""

    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"
    PAUSED = "paused"


class BillingStatus(StrEnum):
    """An organisation's billing status: its subscription's status, or NONE while Stripe has reported none.

    Every SubscriptionStatus under the same name and value (tests/unit/test_billing_status.py holds them together), so a
    BillingStatus compares equal to the SubscriptionStatus it came from."""

    NONE = "none"
    INCOMPLETE = "incomplete"
    INCOMPLETE_EXPIRED = "incomplete_expired"
    TRIALING = "trialing"
    ACTIVE = "active"
    PAST_DUE = "past_due"
    UNPAID = "unpaid"
    CANCELED = "canceled"
    PAUSED = "paused"

    @classmethod
    def of(cls, status: SubscriptionStatus | None) -> "BillingStatus":
        """The organisation's status while `status` is its subscription's (None: no subscription is known)."""
        return cls.NONE if status is None else cls(status)


NO_SUBSCRIPTION = BillingStatus.NONE
BILLING_STATUSES = frozenset(BillingStatus)

# Ended: no event brings such a subscription back.
TERMINAL_STATUSES = frozenset({SubscriptionStatus.CANCELED, SubscriptionStatus.INCOMPLETE_EXPIRED})
# Payment is overdue: dunning runs from the first failed payment of the episode. Typed as strings, like the fallback
# statuses below: each holds for a SubscriptionStatus and a BillingStatus alike.
OVERDUE_STATUSES: frozenset[str] = frozenset({SubscriptionStatus.PAST_DUE, SubscriptionStatus.UNPAID})
# A paid subscription is in force: its plan applies (while overdue, within the dunning rules).
IN_FORCE_STATUSES = frozenset(
    {SubscriptionStatus.TRIALING, SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE, SubscriptionStatus.UNPAID}
)
# No paid subscription is in force (ended, never paid, or paused): the organisation is served as on the
# fallback plan.
FALLBACK_STATUSES: frozenset[str] = frozenset(SubscriptionStatus) - IN_FORCE_STATUSES

# The plan every organisation starts on and falls back to; `migrate` creates it when it is missing.
FREE_PLAN = "free"


class Overage(StrEnum):
    """What a plan does past its included units."""

    SOFT = "soft"  # keep serving; what is beyond the included units is Stripe's price to charge
    BLOCK = "block"  # answer quota_exceeded


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """What a plan allows: the one plan model. authz decides with it; driftlock_kernel.plans.Plan adds what
    reporting to Stripe needs."""

    name: str
    included_units: int
    overage: Overage
    hard_cap_percent: int | None = None
    rate_limit_rps: float | None = None
    # What the organisation's test keys may use per period, and how fast (per organisation, not per key): enough
    # to try the API, not enough to run on it.
    test_included_units: int = 1000
    test_rate_limit_rps: float = 5.0
    # The Stripe meter (its event_name) this plan's billable units are reported to (None: not reported); recorded
    # with each unit counted, so that the unit is billed under this plan whatever the organisation moves to.
    stripe_meter: str | None = None
    # The products whose detect calls the plan includes (sorted, as stored); None: all of them.
    products: tuple[str, ...] | None = None

    @property
    def test_limits(self) -> "PlanLimits":
        """The plan as its test keys see it: their allowance as a block quota, their rate."""
        return PlanLimits(
            f"{self.name} (test)", self.test_included_units, Overage.BLOCK, rate_limit_rps=self.test_rate_limit_rps
        )

    @property
    def unit_cap(self) -> float | None:
        """Units this plan serves per period; None when it serves without end (a soft plan without a hard cap)."""
        caps = []
        if self.overage == Overage.BLOCK:
            caps.append(float(self.included_units))
        if self.hard_cap_percent is not None:
            caps.append(self.included_units * self.hard_cap_percent / 100)
        return min(caps) if caps else None


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    """What a billing status means for service."""

    grace_seconds: float = 7 * 86400
    # False: an overdue organisation keeps full service (dunning is then only Stripe's e-mails).
    block_billable_when_overdue: bool = True
    fallback_plan: str = FREE_PLAN


DEFAULT_POLICY = BillingPolicy()


def effective_plan(plan: str, billing_status: BillingStatus, policy: BillingPolicy = DEFAULT_POLICY) -> str:
    """The plan that applies: the organisation's, unless no paid subscription is in force."""
    return policy.fallback_plan if billing_status in FALLBACK_STATUSES else plan


def payment_overdue(
    billing_status: BillingStatus, past_due_since: float | None, now: float, policy: BillingPolicy = DEFAULT_POLICY
) -> bool:
    """Past the grace period of a failed payment. An overdue status without a start time is still in grace."""
    if billing_status not in OVERDUE_STATUSES or past_due_since is None:
        return False
    return now >= past_due_since + policy.grace_seconds


def payment_blocks_billable(
    billing_status: BillingStatus, past_due_since: float | None, now: float, policy: BillingPolicy = DEFAULT_POLICY
) -> bool:
    """Whether billable routes answer payment_required: overdue past grace, under a policy that blocks."""
    return policy.block_billable_when_overdue and payment_overdue(billing_status, past_due_since, now, policy)

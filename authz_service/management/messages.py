"""Our records as the management API's messages, shared by the services that answer with them."""

from datetime import datetime

from authz_service.management.admin_api import timestamp
from driftlock_api.management.v1 import orgs_pb2
from driftlock_kernel import orgs


def organization_message(org: orgs.Organization, now: datetime) -> orgs_pb2.Organization:
    period = org.billing_period(now)
    message = orgs_pb2.Organization(
        id=str(org.id),
        name=org.name,
        plan=org.plan,
        billing_status=org.billing_status,
        suspended=org.suspended_at is not None,
        stripe_customer_id=org.stripe_customer_id or "",
        stripe_subscription_id=org.stripe_subscription_id or "",
        period_start=timestamp(period.start),
        period_end=timestamp(period.end),
        cancel_at_period_end=org.cancel_at_period_end,
        created_at=timestamp(org.created_at),
    )
    for field, moment in (
        ("suspended_at", org.suspended_at),
        ("past_due_since", org.past_due_since),
        ("trial_end", org.trial_end),
    ):
        if moment is not None:
            getattr(message, field).CopyFrom(timestamp(moment))
    if org.max_overage_units is not None:
        message.max_overage_units = org.max_overage_units
    return message

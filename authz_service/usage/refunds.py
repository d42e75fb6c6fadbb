"""Which billed calls are refunded, decided over plain values: no gRPC, protobuf or database here.

A check that counted a call tells Envoy what it billed (`BilledUsage`, carried as ext_authz dynamic metadata);
Envoy's access log brings it back with the response's status and flags when the request is over
(`LoggedRequest`). A call is refunded when the customer got no service for it:

- any 5xx answer (from the backend, or Envoy's own on its behalf);
- an upstream failure Envoy flags, whatever the status: no healthy upstream (UH), connection failure (UF),
  connection terminated (UC), remote reset (UR), request timeout (UT), retry limit exceeded (URX), circuit
  breaker overflow (UO), upstream protocol error (UPE), max stream duration reached (UMSDR), stream idle
  timeout (SI);
- a refusal by Envoy's global rate-limit filter (RL), which runs after ext_authz and so after the count.

Not refunded: 2xx, 3xx and 4xx answers (the backend served the call, or refused it for the client's own
mistake), and a client that hung up (DC) before the answer: the backend did the work it was asked to do.

A 2xx is never refunded, whatever the flags. The status Envoy logs is the backend's own once the backend has
answered (Envoy forwards its headers as they come, and answers with its own status only before that), so a 2xx
with a failure flag is a call the backend answered in full and Envoy could not deliver: a client that reads the
headers and then stops reading holds the response in Envoy's buffers until the route timeout fires, which Envoy
logs as an upstream timeout (UT) on a 200. Refunding that would make any call free to a client that stalls.
"""

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

# The namespace Envoy puts ext_authz dynamic metadata under, and our key in it.
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
BILLED_KEY = "driftlock_billed"

# Envoy's short response-flag names (as `%RESPONSE_FLAGS%` prints them) of an upstream failure.
UPSTREAM_FAILURE_FLAGS = frozenset({"UH", "UF", "UC", "UR", "UT", "URX", "UO", "UPE", "UMSDR", "SI"})
RATE_LIMITED_FLAG = "RL"
REFUND_FLAGS = UPSTREAM_FAILURE_FLAGS | {RATE_LIMITED_FLAG}


class Terms(NamedTuple):
    """What a unit was used under, recorded when it is counted: the organisation's effective plan, that plan's
    Stripe meter and the organisation's Stripe customer ('' for none). Usage is reported to that meter and
    customer, whatever plan the organisation is on by the time it is reported."""

    plan: str
    meter: str
    customer: str


# Test keys' usage (never billed), and units counted before terms were recorded (see migration 0010).
NO_TERMS = Terms("", "", "")


# Not frozen (one is built for every billed check, and a frozen dataclass's __init__ costs about a microsecond
# more), but hashable: it keys cached responses, and nothing changes one after it is built.
@dataclass(slots=True, unsafe_hash=True)
class BilledUsage:
    """What a check counted: who pays, in which period, for which product, how many units."""

    org_id: str
    period_start: datetime
    product: str
    units: int
    terms: Terms = NO_TERMS
    # Which key made the call and the hour it was counted in (Unix seconds): the usage-history bucket a refund
    # of it lands in. None from an entry that predates them: the refund lands in the hour it arrives, keyless.
    key_id: str | None = None
    hour: int | None = None

    def as_metadata(self) -> dict[str, Any]:
        """The dynamic metadata a check hands Envoy (a protobuf Struct holds strings and doubles: the period as
        ISO 8601, exactly)."""
        billed: dict[str, Any] = {
            "org_id": self.org_id,
            "period_start": self.period_start.isoformat(),
            "product": self.product,
            "units": self.units,
            "plan": self.terms.plan,
            "meter": self.terms.meter,
            "customer": self.terms.customer,
        }
        if self.key_id is not None:
            billed["key_id"] = self.key_id
        if self.hour is not None:
            billed["hour"] = self.hour
        return {BILLED_KEY: billed}


def billed_from_metadata(metadata: Mapping[str, Any]) -> BilledUsage | None:
    """The usage a check billed, from the ext_authz namespace of an access log entry's metadata; None when the
    request was not billed (or the entry is not ours)."""
    billed = metadata.get(BILLED_KEY)
    if not isinstance(billed, Mapping):
        return None
    org_id, period, product, units = (billed.get(k) for k in ("org_id", "period_start", "product", "units"))
    if not (isinstance(org_id, str) and isinstance(period, str) and isinstance(product, str)):
        return None
    if not isinstance(units, int | float) or units != int(units) or not 1 <= units <= 1_000_000:
        return None
    try:
        period_start = datetime.fromisoformat(period)
    except ValueError:
        return None
    if period_start.tzinfo is None:
        return None
    # Absent from what a check of an older authz billed: the exporter treats '' as terms not recorded.
    terms = Terms(*(value if isinstance(value := billed.get(k), str) else "" for k in ("plan", "meter", "customer")))
    key_id, hour = billed.get("key_id"), billed.get("hour")
    if not isinstance(key_id, str) or not _is_uuid(key_id):
        key_id = None
    if not isinstance(hour, int | float) or hour != int(hour) or hour % 3600 or not 0 < hour < 2**40:
        hour = None
    return BilledUsage(
        org_id, period_start, product, int(units), terms, key_id=key_id, hour=None if hour is None else int(hour)
    )


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One finished request as Envoy's access log reports it."""

    request_id: str
    status: int | None  # None: no response was sent (the client or the upstream went away first)
    flags: frozenset[str]
    billed: BilledUsage | None


@dataclass(frozen=True, slots=True)
class Refund:
    request_id: str
    org_id: str
    period_start: datetime
    product: str
    units: int
    reason: str  # "status_5xx", "rate_limited", or the upstream failure flag
    terms: Terms = NO_TERMS  # what the call was counted under: its units come back from that counter
    key_id: str | None = None  # the key and hour of the call taken back (its usage-history bucket)
    hour: int | None = None


# A refusal at a cap that refunds of calls still under way may lift is asked again this soon (seconds), not at the
# period's end: a client that honours Retry-After would otherwise stop for the period because calls failed.
REFUNDS_PENDING_RETRY_AFTER = 2


def refunds_may_lift(last_counted: float | None, now: float, refund_window: float) -> bool:
    """Whether refunds may still lower a total: something was counted less than `refund_window` ago (the
    longest a call can last, so its refund may not have come yet)."""
    return last_counted is not None and now - last_counted < refund_window


def refund_reason(status: int | None, flags: Iterable[str]) -> str | None:
    """Why a call with this answer and these flags is not charged; None when it is."""
    if status is not None and 200 <= status <= 299:
        return None  # the backend answered: see the module docstring
    flags = frozenset(flags)
    upstream = sorted(flags & UPSTREAM_FAILURE_FLAGS)
    if upstream:
        return upstream[0]
    if RATE_LIMITED_FLAG in flags:
        return "rate_limited"
    if status is not None and 500 <= status <= 599:
        return "status_5xx"
    return None


def refund_for(entry: LoggedRequest, *, enabled: bool = True) -> Refund | None:
    """The refund a finished request earns: only a billed call (live key, billable route) that failed."""
    if not enabled or entry.billed is None or not entry.request_id:
        return None
    reason = refund_reason(entry.status, entry.flags)
    if reason is None:
        return None
    billed = entry.billed
    return Refund(
        entry.request_id,
        billed.org_id,
        billed.period_start,
        billed.product,
        billed.units,
        reason,
        billed.terms,
        key_id=billed.key_id,
        hour=billed.hour,
    )

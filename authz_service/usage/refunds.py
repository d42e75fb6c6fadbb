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
"""

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# The namespace Envoy puts ext_authz dynamic metadata under, and our key in it.
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
BILLED_KEY = "driftlock_billed"

# Envoy's short response-flag names (as `%RESPONSE_FLAGS%` prints them) of an upstream failure.
UPSTREAM_FAILURE_FLAGS = frozenset({"UH", "UF", "UC", "UR", "UT", "URX", "UO", "UPE", "UMSDR", "SI"})
RATE_LIMITED_FLAG = "RL"
REFUND_FLAGS = UPSTREAM_FAILURE_FLAGS | {RATE_LIMITED_FLAG}


# Not frozen (one is built for every billed check, and a frozen dataclass's __init__ costs about a microsecond
# more), but hashable: it keys cached responses, and nothing changes one after it is built.
@dataclass(slots=True, unsafe_hash=True)
class BilledUsage:
    """What a check counted: who pays, in which period, for which product, how many units."""

    org_id: str
    period_start: datetime
    product: str
    units: int
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
    key_id, hour = billed.get("key_id"), billed.get("hour")
    if not isinstance(key_id, str) or not _is_uuid(key_id):
        key_id = None
    if not isinstance(hour, int | float) or hour != int(hour) or hour % 3600 or not 0 < hour < 2**40:
        hour = None
    return BilledUsage(org_id, period_start, product, int(units), key_id, None if hour is None else int(hour))


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
    key_id: str | None = None  # the key and hour of the call taken back (its usage-history bucket)
    hour: int | None = None


def refund_reason(status: int | None, flags: Iterable[str]) -> str | None:
    """Why a call with this answer and these flags is not charged; None when it is."""
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
        billed.key_id,
        billed.hour,
    )

"""Usage history in memory: what this replica counted per organisation, period, hour, product and key since its
last flush, handed to the ledger's batches beside the counters. Plain state, no I/O.

The meter feeds it at the points it feeds the ledger (a served billed call, a denial of a known live key), with
no await in between, and the ledger moves it into a batch at the moments it moves the counters: so a batch's
buckets hold exactly the units of its counters, are flushed (and spilled, and replayed) under the same flush id,
and the database applies both or neither. Refunds and backend reports are not held here: the database applies
those once per request id, so their buckets are derived in the flush statement from what it actually applied.
"""

from datetime import datetime

NIL_KEY = "00000000-0000-0000-0000-000000000000"  # a unit no key made (reported by the backend)

# What a denial counts as: the family of its code. Codes not named here are an access refusal (401/403).
DENIAL_FAMILIES = ("access", "payment", "quota", "rate", "unavailable")
_FAMILY_OF_CODE = {
    "payment_required": "payment",
    "quota_exceeded": "quota",
    "key_quota_exceeded": "quota",
    "spend_cap_reached": "quota",
    "rate_limited": "rate",
    "auth_unavailable": "unavailable",
}

# (org_id, period_start, hour as Unix seconds, product, key_id)
RollupKey = tuple[str, datetime, int, str, str]
# Per bucket: [units, requests, denied_access, denied_payment, denied_quota, denied_rate, denied_unavailable]
UNITS, REQUESTS, FIRST_DENIED = 0, 1, 2
WIDTH = FIRST_DENIED + len(DENIAL_FAMILIES)
Buckets = dict[RollupKey, list[int]]


def denial_family(code: str) -> str:
    return _FAMILY_OF_CODE.get(code, "access")


def hour_of(unix_time: float) -> int:
    return int(unix_time) - int(unix_time) % 3600


def merge(into: Buckets, more: Buckets) -> None:
    for key, counts in more.items():
        found = into.get(key)
        if found is None:
            into[key] = counts
        else:
            for i, n in enumerate(counts):
                found[i] += n


class RollupBook:
    """Buckets counted since they were last taken into a batch."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: Buckets = {}

    def __bool__(self) -> bool:
        return bool(self.pending)

    def served(self, org_id: str, period_start: datetime, at: float, product: str, key_id: str, units: int) -> None:
        key = (org_id, period_start, hour_of(at), product, key_id)
        counts = self.pending.get(key)
        if counts is None:
            counts = self.pending[key] = [0] * WIDTH
        counts[UNITS] += units
        counts[REQUESTS] += 1

    def denied(self, org_id: str, period_start: datetime, at: float, product: str, key_id: str, code: str) -> None:
        key = (org_id, period_start, hour_of(at), product, key_id)
        counts = self.pending.get(key)
        if counts is None:
            counts = self.pending[key] = [0] * WIDTH
        counts[FIRST_DENIED + DENIAL_FAMILIES.index(denial_family(code))] += 1

    def take(self) -> Buckets:
        taken, self.pending = self.pending, {}
        return taken

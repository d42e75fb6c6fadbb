"""The limit headers a client reads on every reply of an API route: pure, no I/O.

- `RateLimit-Policy` and `RateLimit`, the IETF httpapi rate-limit header fields (draft-ietf-httpapi-ratelimit-
  headers, structured-field lists of items with parameters): the policy `"rate"` is the key's rate limit (`q`
  requests per `w` seconds), `"quota"` the organisation's period quota (`q` included units, `w` the period's
  length in seconds); in `RateLimit`, `r` is what is left and `t` the seconds until it is all back (the bucket
  full, the period over). A policy this replica cannot state from memory is left out.
- `x-ratelimit-limit|remaining|reset`: the key's rate limit, as before.
- `x-driftlock-overage-units`: on a soft plan past its included units, how many units past them the
  organisation is this period (billed as overage); absent otherwise.
"""

import math

from authz_service.check.controls import QuotaState
from authz_service.check.rate_limit import RateVerdict, bucket_capacity

RATE_POLICY = '"rate"'
QUOTA_POLICY = '"quota"'
OVERAGE_HEADER = "x-driftlock-overage-units"


def rate_policy(rate: RateVerdict) -> tuple[int, int]:
    """(q, w) of the key's rate limit: a full bucket's requests, and the seconds it takes to fill."""
    quota = max(1, int(bucket_capacity(rate.limit)))
    return quota, max(1, math.ceil(quota / rate.limit))


def limit_headers(rate: RateVerdict | None, quota: QuotaState | None) -> dict[str, str]:
    headers = rate.headers() if rate is not None else {}
    policies, states = [], []
    if rate is not None:
        q, w = rate_policy(rate)
        policies.append(f"{RATE_POLICY};q={q};w={w}")
        states.append(f"{RATE_POLICY};r={rate.remaining};t={rate.reset_seconds}")
    if quota is not None:
        policies.append(f"{QUOTA_POLICY};q={quota.included};w={quota.window_seconds}")
        states.append(f"{QUOTA_POLICY};r={quota.remaining};t={quota.reset_seconds}")
        if quota.overage_units > 0:
            headers[OVERAGE_HEADER] = str(quota.overage_units)
    if policies:
        headers["ratelimit-policy"] = ", ".join(policies)
        headers["ratelimit"] = ", ".join(states)
    return headers

"""The `x-driftlock-context` token: a JWT that tells the backend who is calling, signed by us with Ed25519
(EdDSA, `kid` in the header, the public key in the JWKS) or, by configuration, HS256.

Signing costs about as much as the rest of a check (HS256 ~13 µs, EdDSA ~26 µs here in PyJWT), so a token is
reused for the same grant and route kind for up to `reuse_seconds`; every token still expires
`lifetime_seconds` (at most 5 minutes) after it was minted.

The tokens kept for reuse cost ~750 bytes each: at most `max_entries` of them (as many as the allowed responses
built from them, ext_authz.AllowedResponses), and one past its reuse window, which can never be reused, is
dropped as soon as it is the least recently used. A replica that saw 100,000 keys in the last minutes keeps
the tokens of its busiest keys, not one per key it ever served.
"""

import time
from collections.abc import Callable

import jwt

from authz_service.check.decision import Grant
from driftlock_kernel.caches import LruCache
from driftlock_kernel.context_keys import ContextKeys
from driftlock_kernel.tokens import AUDIENCE, ISSUER, MAX_LIFETIME_SECONDS


class ContextSigner:
    def __init__(
        self,
        keys: ContextKeys,
        *,
        lifetime_seconds: int = MAX_LIFETIME_SECONDS,
        reuse_seconds: int = 60,
        clock: Callable[[], float] = time.time,
        max_entries: int = 10_000,
    ):
        if not 0 < lifetime_seconds <= MAX_LIFETIME_SECONDS:
            raise ValueError(f"token lifetime must be within 1..{MAX_LIFETIME_SECONDS} seconds")
        self._algorithm = keys.algorithm
        self._key = keys.signing_key()
        self._headers = {"kid": keys.signing_kid} if keys.signing_kid else None
        self._lifetime = lifetime_seconds
        self._reuse = min(reuse_seconds, lifetime_seconds // 2)
        self._clock = clock
        # (grant, plan, billable) -> (token, minted_at). A grant is immutable and replaced on every change, so a
        # changed plan, scope or status never reuses an old token.
        self._recent: LruCache[tuple[Grant, str, bool], tuple[str, int]] = LruCache(max_entries)

    def token(self, grant: Grant, plan: str, billable: bool) -> str:
        """The token for a call by this grant; `plan` is the effective plan the backend is told about."""
        now = int(self._clock())
        cache_key = (grant, plan, billable)
        recent = self._recent.get(cache_key)
        if recent is not None and now - recent[1] < self._reuse:
            return recent[0]
        token = jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": grant.org_id,
                "key_id": grant.key_id,
                "plan": plan,
                "scopes": sorted(grant.scopes),
                "env": grant.environment,
                "billable": billable,
                "iat": now,
                "exp": now + self._lifetime,
            },
            self._key,
            algorithm=self._algorithm,
            headers=self._headers,
        )
        self._recent.put(cache_key, (token, now))
        # Least recently used first, up to the first still within its window: each token is dropped once.
        while (oldest := self._recent.oldest()) is not None and now - oldest[1][1] >= self._reuse:
            self._recent.pop(oldest[0])
        return token

    def __len__(self) -> int:
        """Tokens kept for reuse."""
        return len(self._recent)

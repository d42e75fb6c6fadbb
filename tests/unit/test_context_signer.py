import dataclasses

import jwt
import pytest

from authz_service.check.context_signer import ContextSigner
from authz_service.check.decision import Grant
from driftlock_kernel.billing import BillingStatus
from driftlock_kernel.context_keys import EDDSA, HS256, ContextKeys, Ed25519Key, verify_with_jwks
from driftlock_kernel.keys import Environment, Scope
from driftlock_kernel.tokens import verify

SECRET = b"k" * 32
GRANT = Grant(
    "key-1",
    "org-1",
    Environment.LIVE,
    frozenset({Scope.READ, Scope.DETECT}),
    None,
    False,
    False,
    "pro",
    BillingStatus.ACTIVE,
)
HS = ContextKeys(HS256, hs256_secret=SECRET)
SIGNING, NEXT = Ed25519Key.generate("current"), Ed25519Key.generate("next")
ED = ContextKeys(EDDSA, (SIGNING, NEXT))


class Clock:
    now = 1_800_000_000.0

    def __call__(self):
        return self.now


def unverified(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.mark.parametrize("keys", [ED, HS], ids=["EdDSA", "HS256"])
def test_token_carries_the_contract_claims(keys):
    clock = Clock()
    token = ContextSigner(keys, clock=clock).token(GRANT, "pro", True)
    assert unverified(token) == {
        "iss": "driftlock-gateway",
        "aud": "driftlock-backend",
        "sub": "org-1",
        "key_id": "key-1",
        "plan": "pro",
        "scopes": ["detect", "read"],
        "env": "live",
        "billable": True,
        "iat": int(clock.now),
        "exp": int(clock.now) + 300,
    }


def test_an_eddsa_token_names_the_signing_key_and_verifies_with_the_published_jwks():
    token = ContextSigner(ED).token(GRANT, "pro", False)
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": "current", "typ": "JWT"}
    assert verify_with_jwks(token, ED.jwks())["billable"] is False
    assert [key["kid"] for key in ED.jwks()["keys"]] == ["current", "next"]
    # Not with the key being rotated in, and not as HS256 with anything public.
    with pytest.raises(jwt.InvalidSignatureError):
        verify(token, NEXT.public_key, algorithm=EDDSA)
    with pytest.raises(jwt.InvalidAlgorithmError):
        verify(token, SECRET)


def test_an_hs256_token_does_not_verify_with_another_secret_and_has_no_kid():
    token = ContextSigner(HS).token(GRANT, "pro", False)
    assert "kid" not in jwt.get_unverified_header(token)
    assert verify(token, SECRET)["billable"] is False
    with pytest.raises(jwt.InvalidSignatureError):
        verify(token, b"x" * 32)
    assert HS.jwks() == {"keys": []}


def test_token_is_reused_briefly_then_minted_again():
    clock = Clock()
    signer = ContextSigner(ED, clock=clock)
    first = signer.token(GRANT, "pro", True)
    clock.now += 59
    assert signer.token(GRANT, "pro", True) == first
    assert signer.token(GRANT, "pro", False) != first
    clock.now += 1
    renewed = signer.token(GRANT, "pro", True)
    assert renewed != first
    assert unverified(renewed)["iat"] == int(clock.now)


def test_tokens_past_their_reuse_window_are_not_kept():
    """A replica that served many keys once keeps no token it can no longer reuse (each costs ~750 bytes)."""
    clock = Clock()
    signer = ContextSigner(ED, clock=clock)
    for n in range(100):
        signer.token(dataclasses.replace(GRANT, key_id=f"key-{n}", scopes=frozenset({Scope.READ})), "pro", True)
    assert len(signer) == 100
    clock.now += 30
    signer.token(GRANT, "pro", True)
    assert len(signer) == 101
    clock.now += 30  # the first hundred are past their window
    signer.token(GRANT, "pro", False)
    assert len(signer) == 2
    assert signer.token(GRANT, "pro", True) == signer.token(GRANT, "pro", True)


def test_a_changed_grant_never_reuses_a_token():
    signer = ContextSigner(ED)
    first = signer.token(GRANT, "pro", True)
    changed = dataclasses.replace(GRANT, scopes=frozenset({Scope.READ}))
    assert unverified(signer.token(changed, "pro", True))["scopes"] == ["read"]
    assert signer.token(GRANT, "pro", True) == first


def test_a_reused_token_always_has_most_of_its_lifetime_left():
    clock = Clock()
    signer = ContextSigner(ED, clock=clock)
    signer.token(GRANT, "pro", True)
    clock.now += 59
    claims = unverified(signer.token(GRANT, "pro", True))
    assert claims["exp"] - clock.now >= 240


def test_lifetime_above_five_minutes_is_refused():
    with pytest.raises(ValueError):
        ContextSigner(ED, lifetime_seconds=301)

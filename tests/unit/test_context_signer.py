import jwt
import pytest

from authz_service.context_signer import ContextSigner
from authz_service.decision import Grant
from driftlock_kernel.tokens import verify

SECRET = b"k" * 32
GRANT = Grant("key-1", "org-1", "live", frozenset({"read", "detect"}), None, False, False, "pro", "active")


class Clock:
    now = 1_800_000_000.0

    def __call__(self):
        return self.now


def test_token_carries_the_contract_claims():
    clock = Clock()
    token = ContextSigner(SECRET, clock=clock).token(GRANT, "pro", True)
    claims = jwt.decode(
        token,
        SECRET,
        algorithms=["HS256"],
        audience="driftlock-backend",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
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
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_token_does_not_verify_with_another_secret():
    token = ContextSigner(SECRET).token(GRANT, "pro", False)
    assert verify(token, SECRET)["billable"] is False
    with pytest.raises(jwt.InvalidSignatureError):
        verify(token, b"x" * 32)


def test_token_is_reused_briefly_then_minted_again():
    clock = Clock()
    signer = ContextSigner(SECRET, clock=clock)
    first = signer.token(GRANT, "pro", True)
    clock.now += 59
    assert signer.token(GRANT, "pro", True) == first
    assert signer.token(GRANT, "pro", False) != first
    clock.now += 1
    renewed = signer.token(GRANT, "pro", True)
    assert renewed != first
    assert jwt.decode(renewed, options={"verify_signature": False})["iat"] == int(clock.now)


def test_a_changed_grant_never_reuses_a_token():
    signer = ContextSigner(SECRET)
    first = signer.token(GRANT, "pro", True)
    changed = Grant("key-1", "org-1", "live", frozenset({"read"}), None, False, False, "pro", "active")
    assert jwt.decode(signer.token(changed, "pro", True), options={"verify_signature": False})["scopes"] == ["read"]
    assert signer.token(GRANT, "pro", True) == first


def test_a_reused_token_always_has_most_of_its_lifetime_left():
    clock = Clock()
    signer = ContextSigner(SECRET, clock=clock)
    signer.token(GRANT, "pro", True)
    clock.now += 59
    claims = jwt.decode(signer.token(GRANT, "pro", True), options={"verify_signature": False})
    assert claims["exp"] - clock.now >= 240


def test_lifetime_above_five_minutes_is_refused():
    with pytest.raises(ValueError):
        ContextSigner(SECRET, lifetime_seconds=301)

"""The admin token of the management API and UsageService: what is accepted and why anything else is not."""

import uuid

import jwt
import pytest

from driftlock_kernel.tokens import InvalidAdminToken, mint_admin_token, verify_admin_token

SECRET = b"a" * 32
NOW = 1_800_000_000


def claims(**changes) -> dict:
    base = {"iss": "dashboard", "aud": "driftlock-gateway", "iat": NOW, "exp": NOW + 300}
    return {k: v for k, v in (base | changes).items() if v is not None}


def sign(body: dict, secret: bytes = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(body, secret, algorithm=algorithm)


def test_a_minted_token_names_its_caller_and_organisation():
    org_id = uuid.uuid4()
    token = mint_admin_token(SECRET, issuer="dashboard", subject="user-1", org_id=org_id, now=NOW)
    caller = verify_admin_token(token, SECRET, now=NOW + 10)
    assert (caller.issuer, caller.subject, caller.org_id) == ("dashboard", "user-1", org_id)
    assert caller.may_touch(org_id) and not caller.may_touch(uuid.uuid4())
    unrestricted = verify_admin_token(mint_admin_token(SECRET, issuer="ops", now=NOW), SECRET, now=NOW)
    assert unrestricted.org_id is None and unrestricted.may_touch(uuid.uuid4())


def test_a_token_without_iat_is_accepted_when_it_expires_within_five_minutes():
    assert verify_admin_token(sign(claims(iat=None, exp=NOW + 200)), SECRET, now=NOW).issuer == "dashboard"


@pytest.mark.parametrize(
    ("token", "why"),
    [
        (sign(claims(), b"b" * 32), "signature"),
        (sign(claims(aud="driftlock-backend")), "aud"),
        (sign(claims(aud=None)), "'aud'"),
        (sign(claims(iss=None)), "'iss'"),
        (sign(claims(iss="")), "iss"),
        (sign(claims(exp=None)), "'exp'"),
        (sign(claims(exp=NOW - 60)), "expired"),
        (sign(claims(iat=None, exp=NOW + 3600)), "5 minutes"),
        (sign(claims(iat=NOW + 120, exp=NOW + 300)), "future"),
        (sign(claims(exp="soon")), "number"),
        (sign(claims(org_id="acme")), "org_id"),
        (sign(claims(org_id=7)), "org_id"),
        (sign(claims(sub=["a"])), "sub"),
        (sign(claims(), b"a" * 64, algorithm="HS512"), "not valid"),
        ("not-a-token", "not valid"),
    ],
)
def test_refused_tokens_say_why(token, why):
    with pytest.raises(InvalidAdminToken) as caught:
        verify_admin_token(token, SECRET, now=NOW)
    assert why in str(caught.value)


def test_an_unsigned_token_is_refused():
    unsigned = jwt.encode(claims(), "", algorithm="none")
    with pytest.raises(InvalidAdminToken):
        verify_admin_token(unsigned, SECRET, now=NOW)


@pytest.mark.parametrize("org_id", [None, "", [], ["3f1c4e2a-0000-4000-8000-000000000000"], {}, 0, False])
def test_an_org_id_claim_that_is_not_a_uuid_string_is_a_bad_token_not_an_operator(org_id):
    # `claims | {"org_id": user.org_id}` for a user without an organisation mints "org_id": null: that must
    # never read as an operator token (no org_id claim at all).
    with pytest.raises(InvalidAdminToken, match="org_id"):
        verify_admin_token(sign(claims() | {"org_id": org_id}), SECRET, now=NOW)


def test_a_uuid_org_id_claim_in_any_case_restricts_the_token():
    org_id = uuid.uuid4()
    caller = verify_admin_token(sign(claims() | {"org_id": str(org_id).upper()}), SECRET, now=NOW)
    assert caller.org_id == org_id and not caller.may_touch(uuid.uuid4())

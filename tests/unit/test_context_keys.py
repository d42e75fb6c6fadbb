"""Context-token keys: how they are configured, published and checked."""

import secrets
import uuid
from datetime import UTC, datetime

import pytest

from driftlock_kernel import context_keys
from driftlock_kernel.context_keys import EDDSA, HS256, ContextKeys, Ed25519Key, parse_entries
from driftlock_kernel.paging import Cursor, page_size
from driftlock_kernel.settings import Settings, SettingsError


def env(**values: str) -> Settings:
    return Settings.from_env({f"DRIFTLOCK_{k.upper()}": v for k, v in values.items()})


def test_entries_parse_in_order_with_comments_commas_and_bare_keys():
    a, b, c = Ed25519Key.generate("a"), Ed25519Key.generate("b"), Ed25519Key.generate()
    bare = c.entry().split(":", 1)[1]
    text = f"# keys, in order\n{a.entry()}, {b.entry()}\n\n{bare}  # the thumbprint is its kid\n"
    parsed = parse_entries(text, what="X")
    assert [k.kid for k in parsed] == ["a", "b", context_keys.thumbprint(c.public_key)]
    assert [k.public_jwk() for k in parsed] == [a.public_jwk(), b.public_jwk(), c.public_jwk()]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "names no key"),
        ("# only a comment", "names no key"),
        ("k1:not-base64!", "not kid:key"),
        ("k1:" + "A" * 20, "not kid:key"),
        ("bad kid!:" + Ed25519Key.generate().entry().split(":")[1], "kid"),
    ],
)
def test_malformed_entries_are_one_line_without_the_key(text, why):
    with pytest.raises(SettingsError) as caught:
        parse_entries(text, what="DRIFTLOCK_CONTEXT_SIGNING_KEYS")
    message = str(caught.value)
    assert why in message and "DRIFTLOCK_CONTEXT_SIGNING_KEYS" in message and "\n" not in message


def test_a_kid_twice_is_refused():
    key = Ed25519Key.generate("same")
    with pytest.raises(SettingsError, match="twice"):
        parse_entries(f"{key.entry()},{Ed25519Key.generate('same').entry()}", what="X")


def test_the_jwks_publishes_every_key_and_the_first_signs():
    keys = ContextKeys(EDDSA, (Ed25519Key.generate("new"), Ed25519Key.generate("old")))
    assert keys.signing_kid == "new"
    assert [(k["kid"], k["kty"], k["crv"], k["alg"], k["use"]) for k in keys.jwks()["keys"]] == [
        ("new", "OKP", "Ed25519", "EdDSA", "sig"),
        ("old", "OKP", "Ed25519", "EdDSA", "sig"),
    ]
    assert "d" not in keys.jwks()["keys"][0]  # never the private part


def test_load_from_the_environment_or_a_file(tmp_path):
    key = Ed25519Key.generate("env-key")
    assert context_keys.load(env(context_signing_keys=key.entry())).signing_kid == "env-key"
    path = tmp_path / "keys"
    context_keys.write_key_file(path, (key,))
    assert path.stat().st_mode & 0o777 == 0o600
    assert context_keys.load(env(context_signing_keys_file=str(path))).jwks() == ContextKeys(EDDSA, (key,)).jwks()
    shared = secrets.token_urlsafe(32)  # a JWT secret must be random (secret_strength)
    hs = context_keys.load(env(context_token_algorithm="hs256", jwt_secret=shared))
    assert (hs.algorithm, hs.hs256_secret, hs.jwks()) == (HS256, shared.encode(), {"keys": []})


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({}, "need a signing key"),
        ({"context_signing_keys": "x", "context_signing_keys_file": "/k"}, "not both"),
        ({"context_signing_keys_file": "/nonexistent/keys"}, "cannot read"),
        ({"context_token_algorithm": "HS256"}, "DRIFTLOCK_JWT_SECRET is not set"),
        ({"context_token_algorithm": "HS256", "jwt_secret": "short"}, "32"),
    ],
)
def test_a_missing_or_conflicting_configuration_is_one_line(values, why):
    with pytest.raises(SettingsError) as caught:
        context_keys.load(env(**values))
    assert why in str(caught.value)


def test_the_algorithm_must_be_one_we_sign_with():
    with pytest.raises(SettingsError, match="DRIFTLOCK_CONTEXT_TOKEN_ALGORITHM"):
        env(context_token_algorithm="RS256")


SAME = "Zq3vK8pW2mX9rT4yB7nL1cF6hJ0dG5sA"


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"admin_token_secret": "short"}, "32"),
        ({"admin_token_secret": "a" * 48}, "openssl rand"),  # long but guessable: refused, saying how to make one
        ({"admin_token_secret": SAME, "jwt_secret": SAME}, "must differ"),
    ],
)
def test_the_admin_secret_is_checked(values, why):
    with pytest.raises(SettingsError, match=why):
        env(**values).admin_secret()


OTHER = "Wn5tR2qL8vX3kP7mY0cB4hF9jD1gS6aZ"


@pytest.mark.parametrize(
    ("values", "check"),
    [
        # The ext_authz secret sits in Envoy's rendered config and /config_dump: as the admin secret it would
        # let anyone who reads them call the management API.
        ({"admin_token_secret": SAME, "ext_authz_secret": SAME, "jwt_secret": OTHER}, "admin_secret"),
        ({"admin_token_secret": SAME, "ext_authz_secret": SAME, "jwt_secret": OTHER}, "require_ext_authz_secret"),
        ({"jwt_secret": SAME, "ext_authz_secret": SAME}, "require_ext_authz_secret"),
        ({"jwt_secret": SAME, "ext_authz_secret": SAME}, "require_jwt_secret"),
        ({"ext_authz_secret": SAME, "alert_webhook_secret": f"{OTHER},{SAME}"}, "require_ext_authz_secret"),
    ],
)
def test_no_two_signing_secrets_may_be_equal(values, check):
    with pytest.raises(SettingsError, match="must differ from"):
        getattr(env(**values), check)()


def test_distinct_signing_secrets_are_accepted():
    settings = env(admin_token_secret=SAME, ext_authz_secret=OTHER)
    assert settings.admin_secret() == SAME.encode() and settings.require_ext_authz_secret() == OTHER.encode()


def test_management_settings_are_read():
    settings = env(admin_host="0.0.0.0", admin_port="18082", key_last_used_interval_seconds="2.5")
    assert (settings.admin_host, settings.admin_port, settings.key_last_used_interval_seconds) == (
        "0.0.0.0",
        18082,
        2.5,
    )
    assert Settings().admin_secret() is None and Settings().admin_port == 8082


def test_page_tokens_round_trip_and_refuse_what_we_did_not_make():
    cursor = Cursor(datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC), uuid.uuid4())
    assert Cursor.from_token(cursor.token()) == cursor
    for bogus in ("bogus", "", "MjAyNi0wMS0wMnxub3QtYS11dWlk"):
        with pytest.raises(ValueError):
            Cursor.from_token(bogus)
    assert (page_size(0), page_size(1000)) == (100, 1000)
    with pytest.raises(ValueError):
        page_size(1001)
